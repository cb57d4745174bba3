"""``userstreamd bench e2e [--bus embedded|nats]``: synthetic users into PostgreSQL,
end to end, on either topology; what differs between them is one `E2ETopology`, chosen
once from `LAUNCHERS` by the bus's name.

Two runs:

1. throughput: the producer asked for THROUGHPUT_RATE_PER_S users/s. After a warm-up,
   users committed per second over ``--duration`` seconds (the topology says how it
   counts them, and what else it reports: the NATS bus adds the users published into
   the stream). Then the producer stops (SIGTERM) and the pipeline drains: every
   published user committed.
2. latency: the producer again at LATENCY_RATE_PER_S users/s for min(duration, 20)
   seconds after the same warm-up; produced -> committed for every user produced in that
   window, exactly: PostgreSQL's commit timestamp of the row's transaction
   (``track_commit_timestamp``) minus its ``produced_at`` (one clock: the same machine).
   The daemon's own histogram (``userstreamd_end_to_end_latency_seconds``) is reported
   beside it, interpolated. Then zero loss is checked in the database (`checks`): the
   first run's epoch holds exactly seqs 1..N, each once, N its last published seq.

Both runs report each process's CPU over the measured window and its peak memory.
The topologies are in `e2e_topologies`.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from . import checks, procs
from .display import open_steps
from .e2e_topologies import (
    LATENCY_RATE_PER_S,
    LATENCY_S_MAX,
    LAUNCHERS,
    THROUGHPUT_RATE_PER_S,
)


def run_e2e(
    *,
    bus: str = "embedded",
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    consumers: int = 2,
    consumer_processes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Both runs of the module's docstring on the `bus` topology; the JSON report."""
    topology = LAUNCHERS[bus](consumers, consumer_processes or consumers)
    latency_s = min(duration_s, LATENCY_S_MAX)
    e2e: dict[str, Any] = {
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rate_per_s_asked": THROUGHPUT_RATE_PER_S,
        "consumers": consumers,
        **topology.layout(),
        "latency_rate_per_s": LATENCY_RATE_PER_S,
        "latency_s": latency_s,
    }
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
        contextlib.ExitStack() as stack,  # (closed before the folder goes)
    ):
        topology.start(Path(folder), stack, steps, THROUGHPUT_RATE_PER_S)
        steps.wait("throughput: warm-up", warmup_s)
        rate = f"{THROUGHPUT_RATE_PER_S:,.0f}"
        got = topology.measured(
            steps, f"throughput: {duration_s:g} s, asking {rate}/s", duration_s, count=True
        )
        e2e["users_per_s"] = round(got.committed_per_s, 1)
        e2e.update(got.figures)
        e2e["processes"] = got.usage
        end = topology.drain(steps, got.committed_per_s)
        e2e.update(end.pop("figures", {}))

        topology.restart(steps, LATENCY_RATE_PER_S)
        steps.wait("latency: warm-up", warmup_s)
        start = time.time()
        label = f"latency: {latency_s:g} s at {LATENCY_RATE_PER_S:,.0f}/s"
        got = topology.measured(steps, label, latency_s, count=False)
        stop = time.time()
        e2e["latency_processes"] = got.usage
        step = steps.step("check zero loss, read latencies")
        topology.settle()  # (the window's last users: committed)
        with psycopg.connect(topology.dsn, autocommit=True) as conn:
            e2e["zero_loss"] = checks.zero_loss(conn, end)
            latencies, how = checks.latencies(conn, start, stop)
        step.done(
            f"{'verified' if e2e['zero_loss']['verified'] else 'NOT VERIFIED'}, "
            f"{len(latencies):,} users"
        )
        e2e["latency_ms"] = {
            "p50": checks.quantile(latencies, 0.50),
            "p99": checks.quantile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
        }
        e2e["latency_users"] = len(latencies)
        e2e["latency_source"] = how
        e2e["latency_ms_daemon_histogram"] = checks.histogram_quantiles(*got.metrics)
        topology.stop(steps)
    return {**procs.report_head("e2e"), "e2e": e2e, "bus": bus}


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
    topology = LAUNCHERS[report["bus"]]
    e = report["e2e"]
    loss = e["zero_loss"]
    lat = e["latency_ms"]
    print(
        f"userstreamd {report['version']} bench e2e{topology.option}: {e['duration_s']:g} s "
        f"asking {e['rate_per_s_asked']:,.0f} users/s, then {e['latency_s']:g} s at "
        f"{e['latency_rate_per_s']:,.0f} users/s; {topology.describe(e)}, embedded "
        f"PostgreSQL; Python {report['python']}, {report['cpus']} CPUs"
    )
    check = "verified" if loss["verified"] else "NOT VERIFIED"
    print(
        f"  sustained, committed      {e['users_per_s']:,.0f} users/s{topology.counted_by}; "
        f"zero loss {check}: {_n(loss.get('published'))} published, {_n(loss.get('rows'))} "
        f"rows, seqs {_n(loss.get('min_seq'))}..{_n(loss.get('max_seq'))} each once"
    )
    for line in topology.throughput_lines(e):
        print(line)
    print(
        f"  produced -> committed     p50 {_n(lat['p50'], 1)} ms, p99 {_n(lat['p99'], 1)} ms, "
        f"max {_n(lat['max'], 1)} ms: every one of {e['latency_users']:,} users at "
        f"{e['latency_rate_per_s']:,.0f}/s ({e['latency_source'].split(' - ')[0]})"
    )
    hist = e["latency_ms_daemon_histogram"]
    print(topology.histogram_line(hist, _n))
    print(f"  {'process':<44} {'CPU (throughput)':>16} {'CPU (latency)':>14} {'peak RSS':>9}")
    runs = [_by_name(e["processes"]), _by_name(e["latency_processes"])]
    order = topology.process_order

    def rank(name: str) -> tuple[int, str]:
        return next((i for i, o in enumerate(order) if name.startswith(o)), len(order)), name

    for name in sorted({*runs[0], *runs[1]}, key=rank):
        cpu = [run[name]["cpu_pct"] if name in run else None for run in runs]
        if all(c is None or c < 0.5 for c in cpu):
            continue  # PostgreSQL's idle helpers
        peak = max(run[name]["peak_rss_kib"] for run in runs if name in run)
        count = max(run[name]["count"] for run in runs if name in run)
        label = name if count == 1 else f"{name} x{count}"
        shown = [f"{c:.0f}%" if c is not None else "-" for c in cpu]
        print(f"  {label:<44} {shown[0]:>16} {shown[1]:>14} {_mib(peak):>9}")
    if not loss["verified"]:
        print("  zero loss NOT verified: " + str(loss), file=sys.stderr)
