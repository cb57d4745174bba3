"""``userstreamd bench e2e``: the real daemon, synthetic users into its embedded PostgreSQL.

Two runs of one daemon (`DaemonChild`) on one state directory:

1. throughput: the producer asked for THROUGHPUT_RATE_PER_S users/s (more than the
   pipeline takes: the hub's backpressure holds it to what the consumers commit). After
   a warm-up, users committed per second over ``--duration`` seconds, from
   ``userstreamd_users_committed_total`` at both ends. Then SIGTERM: the daemon drains
   (every published user committed) and exits. Zero loss is checked in the database
   (during run 2): the epoch's rows up to the last published seq are exactly seqs
   1..last, each once.
2. latency: the same state directory at LATENCY_RATE_PER_S users/s for
   min(duration, 20) seconds after the same warm-up; produced -> committed for every user
   produced in that window, exactly: PostgreSQL's commit timestamp of the row's
   transaction (``track_commit_timestamp``, switched on with ALTER SYSTEM during run 1:
   it takes effect at the restart) minus its ``produced_at`` (one clock: the same
   machine). The daemon's own histogram (``userstreamd_end_to_end_latency_seconds``,
   production to the acknowledged commit, coarse buckets) is reported beside it,
   interpolated.

Both runs report each process's CPU over the measured window and its peak memory: the
daemon, its consumer workers, its page generator, PostgreSQL's processes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from . import procs
from .daemon_child import BenchError, DaemonChild
from .display import Steps, open_steps

THROUGHPUT_RATE_PER_S = 50_000.0
LATENCY_RATE_PER_S = 1000.0
LATENCY_S_MAX = 20.0
COMMITTED = "userstreamd_users_committed_total"
HISTOGRAM = "userstreamd_end_to_end_latency_seconds_bucket"


def _committed(daemon: DaemonChild) -> float:
    return daemon.metrics().get(COMMITTED, 0.0)


def _backends(dsn: str) -> dict[int, str]:
    """PostgreSQL backends by pid: their application names (the consumers name theirs)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        ).fetchall()
    return {pid: name or "client" for pid, name in rows}


def _measured(
    daemon: DaemonChild, steps: Steps, label: str, seconds: float
) -> tuple[float, list[dict[str, Any]], dict[str, float], dict[str, float]]:
    """Wait `seconds` as a row of the display (its status the committed rate); users
    committed per second over them, each process's usage, /metrics at both ends."""
    first, start = daemon.metrics(), time.monotonic()
    before = procs.snapshot(daemon.pid)
    last = [first.get(COMMITTED, 0.0), start]

    def rate() -> str:
        committed, now = _committed(daemon), time.monotonic()
        per_s = (committed - last[0]) / max(now - last[1], 1e-9)
        last[:] = [committed, now]
        return f"{per_s:,.0f} committed/s"

    steps.wait(label, seconds, rate)
    end, seconds = daemon.metrics(), time.monotonic() - start
    after = procs.snapshot(daemon.pid, _backends(daemon.dsn))
    per_s = (end.get(COMMITTED, 0.0) - first.get(COMMITTED, 0.0)) / seconds
    return per_s, procs.usage(before, after, seconds), first, end


def _stream_end(daemon: DaemonChild) -> dict[str, Any]:
    """What the stopped run's log says: its epoch, last seq, and whether it drained."""
    started = daemon.events("daemon.stream_started") or daemon.events("daemon.stream_resumed")
    drained = daemon.events("daemon.drained")
    if not started or not drained:
        return {"epoch": started[0]["epoch"] if started else None, "drained": False}
    return {
        "epoch": started[0]["epoch"],
        "last_seq": drained[0]["last_seq"],
        "committed_through": drained[0]["committed_through"],
        "drained": drained[0]["last_seq"] == drained[0]["committed_through"],
    }


def _zero_loss(conn: psycopg.Connection[Any], end: dict[str, Any]) -> dict[str, Any]:
    if end.get("last_seq") is None:
        return {**end, "verified": False}
    rows, seqs, low, high = conn.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM incoming_users "
        "WHERE epoch = %s AND seq <= %s",
        (end["epoch"], end["last_seq"]),
    ).fetchone() or (0, 0, None, None)
    last = end["last_seq"]
    verified = end["drained"] and rows == seqs == last and (last == 0 or (low, high) == (1, last))
    return {
        "verified": verified,
        "epoch": end["epoch"],
        "published": last,
        "rows": rows,
        "distinct_seqs": seqs,
        "min_seq": low,
        "max_seq": high,
        "drained": end["drained"],
    }


def _latencies(conn: psycopg.Connection[Any], start: float, end: float) -> tuple[list[float], str]:
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
    rows = conn.execute(
        f"SELECT extract(epoch FROM {column} - produced_at) * 1000 {window}", (start, end)
    ).fetchall()
    return sorted(float(r[0]) for r in rows if r[0] is not None), how


def _quantile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, max(0, round(q * len(sorted_ms)) - 1))], 2)


def _histogram_quantiles(first: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
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


def run_e2e(
    *,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    consumers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Both runs of the module's docstring; the JSON report."""
    latency_s = min(duration_s, LATENCY_S_MAX)
    e2e: dict[str, Any] = {
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rate_per_s_asked": THROUGHPUT_RATE_PER_S,
        "consumers": consumers,
        "latency_rate_per_s": LATENCY_RATE_PER_S,
        "latency_s": latency_s,
    }
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
    ):
        daemon = DaemonChild(
            Path(folder),
            {
                "producer": {"rate_per_s": THROUGHPUT_RATE_PER_S},
                "consumers": {"count": consumers},
            },
        )
        try:
            step = steps.step("start the daemon (initdb on first use)")
            daemon.start()
            step.done(f"pid {daemon.pid}")
            with psycopg.connect(daemon.dsn, autocommit=True) as conn:  # for run 2
                conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
            steps.wait("throughput: warm-up", warmup_s)
            rate = f"{THROUGHPUT_RATE_PER_S:,.0f}"
            per_s, usage, _, _ = _measured(
                daemon, steps, f"throughput: {duration_s:g} s, asking {rate}/s", duration_s
            )
            e2e["users_per_s"] = round(per_s, 1)
            e2e["processes"] = usage
            step = steps.step("drain and stop (SIGTERM)")
            code = daemon.stop()
            end = _stream_end(daemon)
            step.done(f"exit code {code}, last seq {end.get('last_seq')}")
            if code != 0:
                raise BenchError(f"the daemon exited with code {code}: {daemon}")

            step = steps.step("restart the daemon")
            daemon.tables["producer"]["rate_per_s"] = LATENCY_RATE_PER_S
            daemon.start()
            step.done(f"pid {daemon.pid}")
            steps.wait("latency: warm-up", warmup_s)
            start = time.time()
            _, usage, first, last = _measured(
                daemon,
                steps,
                f"latency: {latency_s:g} s at {LATENCY_RATE_PER_S:,.0f}/s",
                latency_s,
            )
            stop = time.time()
            e2e["latency_processes"] = usage
            step = steps.step("check zero loss, read latencies")
            time.sleep(0.5)  # the window's last users: committed
            with psycopg.connect(daemon.dsn, autocommit=True) as conn:
                e2e["zero_loss"] = _zero_loss(conn, end)
                latencies, how = _latencies(conn, start, stop)
            step.done("verified" if e2e["zero_loss"]["verified"] else "NOT VERIFIED")
            e2e["latency_ms"] = {
                "p50": _quantile(latencies, 0.50),
                "p99": _quantile(latencies, 0.99),
                "max": latencies[-1] if latencies else None,
            }
            e2e["latency_users"] = len(latencies)
            e2e["latency_source"] = how
            e2e["latency_ms_daemon_histogram"] = _histogram_quantiles(first, last)
            step = steps.step("stop (SIGTERM)")
            step.done(f"exit code {daemon.stop()}")
        finally:
            daemon.close()
    return {**procs.report_head("e2e"), "e2e": e2e}


def _n(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Processes of one name together (PostgreSQL's backends): CPU summed, the largest
    peak, how many."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["process"], []).append(row)
    return {
        name: {
            "cpu_pct": sum(r["cpu_pct"] for r in group),
            "peak_rss_kib": max(r["peak_rss_kib"] for r in group),
            "count": len(group),
        }
        for name, group in groups.items()
    }


def print_e2e(report: dict[str, Any]) -> None:
    e = report["e2e"]
    loss = e["zero_loss"]
    lat = e["latency_ms"]
    print(
        f"userstreamd {report['version']} bench e2e: {e['duration_s']:g} s asking "
        f"{e['rate_per_s_asked']:,.0f} users/s, then {e['latency_s']:g} s at "
        f"{e['latency_rate_per_s']:,.0f} users/s; {e['consumers']} consumers, embedded "
        f"PostgreSQL; Python {report['python']}, {report['cpus']} CPUs"
    )
    check = "verified" if loss["verified"] else "NOT VERIFIED"
    print(
        f"  sustained, committed      {e['users_per_s']:,.0f} users/s; zero loss {check}: "
        f"{_n(loss.get('published'))} published, {_n(loss.get('rows'))} rows, seqs "
        f"{_n(loss.get('min_seq'))}..{_n(loss.get('max_seq'))} each once"
    )
    print(
        f"  produced -> committed     p50 {_n(lat['p50'], 1)} ms, p99 {_n(lat['p99'], 1)} ms, "
        f"max {_n(lat['max'], 1)} ms: every one of {e['latency_users']:,} users at "
        f"{e['latency_rate_per_s']:,.0f}/s ({e['latency_source'].split(' - ')[0]})"
    )
    hist = e["latency_ms_daemon_histogram"]
    print(
        f"  the daemon's histogram    p50 {_n(hist['p50'], 1)} ms, p99 {_n(hist['p99'], 1)} ms "
        "(production -> acknowledged commit; interpolated in its buckets)"
    )
    print(f"  {'process':<44} {'CPU (throughput)':>16} {'CPU (latency)':>14} {'peak RSS':>9}")
    runs = [_by_name(e["processes"]), _by_name(e["latency_processes"])]
    for name in sorted({*runs[0], *runs[1]}, key=lambda n: (n != "daemon", n)):
        cpu = [run[name]["cpu_pct"] if name in run else None for run in runs]
        if not any(cpu):
            continue  # PostgreSQL's idle helpers
        peak = max(run[name]["peak_rss_kib"] for run in runs if name in run)
        count = max(run[name]["count"] for run in runs if name in run)
        label = name if count == 1 else f"{name} x{count}"
        shown = [f"{c:.0f}%" if c is not None else "-" for c in cpu]
        print(f"  {label:<44} {shown[0]:>16} {shown[1]:>14} {_mib(peak):>9}")
    if not loss["verified"]:
        print("  zero loss NOT verified: " + str(loss), file=sys.stderr)
