"""What ``bench e2e`` reads back, whichever the topology: PostgreSQL's backends (to name
them in the process rows), zero loss (the epoch's rows are exactly seqs 1..N, each once),
produced -> committed latency of every user of a window, and the daemon's own latency
histogram between two reads of /metrics."""

from __future__ import annotations

from typing import Any

import psycopg

HISTOGRAM = "userstreamd_end_to_end_latency_seconds_bucket"


def backends(dsn: str) -> dict[int, str]:
    """PostgreSQL backends by pid: their application names (the consumers name theirs)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        ).fetchall()
    return {pid: name or "client" for pid, name in rows}


def rows(dsn: str, epoch: str) -> int:
    """The epoch's rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM incoming_users WHERE epoch = %s", (epoch,)
        ).fetchone()
    return int(found[0]) if found else 0


def zero_loss(conn: psycopg.Connection[Any], end: dict[str, Any]) -> dict[str, Any]:
    """Whether the rows of `end`'s epoch up to its last seq are seqs 1..last, each once
    (and the run drained), with what was counted."""
    if end.get("last_seq") is None:
        return {**end, "verified": False}
    count, seqs, low, high = conn.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM incoming_users "
        "WHERE epoch = %s AND seq <= %s",
        (end["epoch"], end["last_seq"]),
    ).fetchone() or (0, 0, None, None)
    last = end["last_seq"]
    verified = end["drained"] and count == seqs == last and (last == 0 or (low, high) == (1, last))
    return {
        "verified": verified,
        "epoch": end["epoch"],
        "published": last,
        "rows": count,
        "distinct_seqs": seqs,
        "min_seq": low,
        "max_seq": high,
        "drained": end["drained"],
    }


def latencies(conn: psycopg.Connection[Any], start: float, end: float) -> tuple[list[float], str]:
    """produced -> committed in ms for the users produced between `start` and `end`
    (epoch seconds), and what they are measured by."""
    window = (
        "FROM incoming_users "
        "WHERE produced_at >= to_timestamp(%s) AND produced_at < to_timestamp(%s)"
    )
    on = conn.execute("SHOW track_commit_timestamp").fetchone()
    if on and on[0] == "on":
        how = "PostgreSQL commit timestamps (track_commit_timestamp) - produced_at"
        column = "pg_xact_commit_timestamp(xmin)"
    else:
        how = "created_at (the insert transaction's start: a lower bound) - produced_at"
        column = "created_at"
    found = conn.execute(
        f"SELECT extract(epoch FROM {column} - produced_at) * 1000 {window}", (start, end)
    ).fetchall()
    return sorted(float(r[0]) for r in found if r[0] is not None), how


def quantile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, max(0, round(q * len(sorted_ms)) - 1))], 2)


def histogram_quantiles(first: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
    """p50/p99 of the daemon's latency histogram over the window, interpolated linearly
    within a bucket (as Prometheus' histogram_quantile does)."""
    bounds = sorted(
        (float(key.split("le=")[1].rstrip("}")), end[key] - first.get(key, 0.0))
        for key in end
        if key.startswith(HISTOGRAM + "{")
    )
    total = bounds[-1][1] if bounds else 0.0
    out: dict[str, Any] = {
        "source": "userstreamd_end_to_end_latency_seconds over the window: production to "
        "acknowledged commit, interpolated within its buckets (5, 10, 25, 50, 100 ms, ...)"
    }
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        value = None
        below, lower = 0.0, 0.0
        for upper, cumulative in bounds:
            if total and cumulative >= q * total:
                if upper == float("inf"):
                    value = lower
                else:
                    share = (q * total - below) / max(cumulative - below, 1e-9)
                    value = lower + (upper - lower) * share
                break
            below, lower = cumulative, upper
        out[name] = None if value is None else round(value * 1000, 2)
    return out
