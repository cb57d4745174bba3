"""``userstreamd bench fanout [--bus embedded|nats]``: the real daemon broadcasting to N
plain WebSocket clients, on either topology; what differs between them is one server
object (`fanout_servers`), chosen once from `LAUNCHERS` by the bus's name.

For each server (userstreamd; with ``--compare`` also the references of `reference`):

1. start it producing 1 user/s (IDLE_RATE_PER_S); the resident memory (VmRSS) of the
   processes that hold clients, then again once N clients of the harness (`harness`, a
   separate process, or several with ``--harness-procs``, through `harnesses`) are
   connected and idle: the difference over N is the memory per idle client; then, for
   ``--idle-seconds``, the server processes' CPU and the latency of those idle users
   (p50, p99: the same figures as below, at 1 user/s);
2. raise the rate to R (the daemon: its config file rewritten and SIGHUP, as an operator
   would), warm up, then measure for ``--duration`` seconds: users delivered per second
   over all clients, latency from ``produced_at`` to the client's read (p50, p99, max;
   0.1 ms buckets), slow closes (code 3008, since the clients connected), users the
   clients missed (gaps in their seqs), clients still connected at the end, and CPU and
   memory of the server's processes (and what the topology adds: per broadcaster, the
   producer, the nats-servers on the NATS bus). With ``--stalled K``, K more clients
   connect just before this phase and never read (`stalled`): how many the server closed,
   how (a close frame's code, or none), after how many seconds of the phase (as the
   harness noticed), and how many were still open at the end; they count in no other
   figure.

Figures are reported, never judged: the machine is shared with the harness.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import procs, reference
from .cluster import snapshot
from .daemon_child import BenchError
from .display import Steps, open_steps
from .fanout_servers import LAUNCHERS, START_TIMEOUT_S, FanoutServer, ReferenceServer
from .harnesses import Harnesses
from .stalled import NO_CLOSE_FRAME

IDLE_RATE_PER_S = 1.0
SETTLE_S = 0.5  # after a start and after the clients connect, before memory is read
HARNESS_CPU_WARNING_PCT = 90.0


def percentile_ms(hist: dict[int, int], q: float, resolution_ms: float) -> float | None:
    """The `q` quantile (0..1) of a histogram of `resolution_ms` buckets: its bucket's
    middle; None if it is empty."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = max(1, round(q * total)), 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round((bucket + 0.5) * resolution_ms, 2)
    raise AssertionError("unreachable")


def measure_server(
    server: FanoutServer,
    steps: Steps,
    *,
    clients: int,
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    harness_procs: int,
    idle_s: float = 0.0,
    stalled: int = 0,
) -> dict[str, Any]:
    """One server through the steps of the module's docstring; its figures."""
    name = server.label
    stalled_figures: dict[str, Any] = {"stalled": 0}

    def serving_rss_kib() -> int:
        return sum(p.rss_kib for p in snapshot(server.roots()).values() if server.serving(p.name))

    try:
        server.start(steps, IDLE_RATE_PER_S)
        time.sleep(SETTLE_S)
        rss_before = serving_rss_kib()
        step = steps.step(f"{name}: connect {clients} clients")
        harness = Harnesses(server.urls, clients, harness_procs)
        try:
            connected = harness.connected(START_TIMEOUT_S + clients / 50)
            time.sleep(SETTLE_S)
            rss_after = serving_rss_kib()
            step.done(f"{connected['clients']} connected{server.connected()}")
            idle = _measure_idle(server, steps, harness, idle_s)
            server.set_rate(rate_per_s)
            steps.wait(f"{name}: warm-up at {rate_per_s:,.0f} users/s", warmup_s)
            if stalled:
                step = steps.step(f"{name}: connect {stalled} stalled clients")
                opened = harness.stall(stalled, START_TIMEOUT_S + stalled / 50)
                step.done(f"{opened['clients']} connected")
            before, start = snapshot(server.roots()), time.monotonic()
            label = f"{name}: {duration_s:g} s, {clients} clients"
            got = harness.measure(steps, label, duration_s)
            after, seconds = snapshot(server.roots()), time.monotonic() - start
            if stalled:
                stalled_figures = stalled_report(stalled, opened, harness.settle())
        finally:
            harness.close()
        usage = procs.usage(before, after, seconds)
        extra = {**server.figures(usage), **stalled_figures}
    finally:
        server.stop()
    return {
        **figures(
            server.name,
            clients,
            rate_per_s,
            warmup_s,
            harness_procs,
            connected,
            got,
            usage,
            server.serving,
            (rss_before, rss_after),
        ),
        **idle_report(idle_s, *idle, server.serving),
        **extra,
    }


def _measure_idle(
    server: FanoutServer, steps: Steps, harness: Harnesses, idle_s: float
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """What the harness got over `idle_s` at the idle rate, and each process's CPU
    meanwhile (nothing with `idle_s` 0)."""
    if idle_s <= 0:
        return None, []
    before, start = snapshot(server.roots()), time.monotonic()
    got = harness.measure(steps, f"{server.label}: idle, {idle_s:g} s", idle_s)
    after, seconds = snapshot(server.roots()), time.monotonic() - start
    return got, procs.usage(before, after, seconds)


def idle_report(
    idle_s: float,
    got: dict[str, Any] | None,
    usage: list[dict[str, Any]],
    serving: Callable[[str], bool],
) -> dict[str, Any]:
    """The idle figures: the serving processes' CPU (% of one core) and the latency of
    the idle users over `idle_s` (None when not measured or no user came)."""
    if got is None:
        return dict.fromkeys(("idle_s", "idle_server_cpu_pct", "idle_p50_ms", "idle_p99_ms"))
    hist, resolution = got["hist"], got["resolution_ms"]
    return {
        "idle_s": got["seconds"],
        "idle_server_cpu_pct": round(sum(r["cpu_pct"] for r in usage if serving(r["process"])), 1),
        "idle_p50_ms": percentile_ms(hist, 0.50, resolution),
        "idle_p99_ms": percentile_ms(hist, 0.99, resolution),
        "idle_delivered": got["users"],
    }


def stalled_report(asked: int, opened: dict[str, Any], settled: dict[str, Any]) -> dict[str, Any]:
    """The stalled clients' figures: how many were closed and how (``"none"``: without a
    close frame), after how many seconds of the measured phase (min, max), how many were
    still open at the end."""
    after = settled["stalled_closed_after_s"]
    return {
        "stalled": asked,
        "stalled_connected": opened["clients"],
        "stalled_connect_errors": opened["errors"],
        "stalled_closed": sum(settled["stalled_closes"].values()),
        "stalled_closes": settled["stalled_closes"],
        "stalled_closed_after_s": {"min": after[0], "max": after[-1]} if after else None,
        "stalled_open_at_end": settled["stalled_open"],
    }


def figures(
    name: str,
    clients: int,
    rate_per_s: float,
    warmup_s: float,
    harness_procs: int,
    connected: dict[str, Any],
    got: dict[str, Any],
    usage: list[dict[str, Any]],
    serving: Callable[[str], bool],
    rss_kib: tuple[int, int],
) -> dict[str, Any]:
    """The figures of one measured run: `connected` and `got` are what the
    harness said, `usage` each process's CPU, `serving` which processes hold clients,
    `rss_kib` theirs before and after the idle clients connected."""
    hist, resolution = got["hist"], got["resolution_ms"]
    rss_before, rss_after = rss_kib
    return {
        "server": name,
        "clients": clients,
        "clients_connected": connected["clients"],
        "connect_errors": connected["errors"],
        "rate_per_s": rate_per_s,
        "duration_s": got["seconds"],
        "warmup_s": warmup_s,
        "delivered": got["users"],
        "delivered_per_s": round(got["users"] / got["seconds"], 1),
        "expected_per_s": round(connected["clients"] * rate_per_s, 1),
        "p50_ms": percentile_ms(hist, 0.50, resolution),
        "p99_ms": percentile_ms(hist, 0.99, resolution),
        "max_ms": percentile_ms(hist, 1.0, resolution),
        "latency_resolution_ms": resolution,
        "slow_closes": got["slow_closes"],
        "closes": got["closes"],
        "dropped": got["dropped"],
        "missed": got["missed"],
        "connected_at_end": got["connected"],
        "server_cpu_pct": round(sum(r["cpu_pct"] for r in usage if serving(r["process"])), 1),
        "server_processes": sum(serving(r["process"]) for r in usage),
        "server_rss_kib": {"idle": rss_before, "with_idle_clients": rss_after},
        "rss_per_idle_client_kib": (
            round((rss_after - rss_before) / connected["clients"], 2)
            if connected["clients"]
            else None
        ),
        "harness_processes": harness_procs,
        "harness_cpu_pct": got["harness_cpu_pct"],
        "processes": usage,
    }


def run_fanout(
    *,
    bus: str = "embedded",
    clients: int = 100,
    rate_per_s: float = 1000.0,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    harness_procs: int = 1,
    idle_s: float = 5.0,
    stalled: int = 0,
    compare: bool = False,
    install_node_ws: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The figures of userstreamd's fan-out on the `bus` topology (and with `compare`
    the references'), as the JSON report has them."""
    topology = LAUNCHERS[bus]
    if compare and not topology.compares:
        raise BenchError(f"--compare does not run beside --bus {bus}")
    report = procs.report_head("fanout")
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
    ):
        base = Path(folder)
        measure = partial(
            measure_server,
            steps=steps,
            clients=clients,
            rate_per_s=rate_per_s,
            duration_s=duration_s,
            warmup_s=warmup_s,
            harness_procs=harness_procs,
            idle_s=idle_s,
            stalled=stalled,
        )
        report["fanout"] = measure(topology(base, clients))
        if compare:
            report["fanout_compare"] = _compare(measure, steps, base, install_node_ws)
    return {**report, "bus": bus}


def _compare(
    measure: Callable[[FanoutServer], dict[str, Any]],
    steps: Steps,
    base: Path,
    install_node_ws: bool,
) -> dict[str, Any]:
    """The reference servers' figures (or why one is unavailable)."""
    pool = base / "users.jsonl"
    reference.write_pool(pool)
    compared: dict[str, Any] = {}
    python = [sys.executable, "-m", "userstreamd.bench.reference"]
    label = f"websockets {reference.websockets_version()}"
    compared["websockets"] = _measure_reference(
        measure, ReferenceServer(label, python, dict(os.environ), pool)
    )
    step = steps.step("node ws: find node and ws")
    found = reference.node_ws(install=install_node_ws)
    if isinstance(found, str):
        step.done("unavailable")
        compared["node_ws"] = {"unavailable": found}
    else:
        command, env, version = found
        step.done(f"ws {version}")
        server = ReferenceServer(f"node ws {version}", command, env, pool)
        compared["node_ws"] = _measure_reference(measure, server)
    return compared


def _measure_reference(
    measure: Callable[[FanoutServer], dict[str, Any]], server: ReferenceServer
) -> dict[str, Any]:
    """Its figures; or, when it fails, why (userstreamd's figures still count)."""
    try:
        return measure(server)
    except BenchError as exc:
        return {"unavailable": str(exc)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _print_idle(labels: list[str], rows: list[dict[str, Any]]) -> None:
    """The idle figures, a small table of their own (when they were measured)."""
    measured = [
        (label, row)
        for label, row in zip(labels, rows, strict=True)
        if "unavailable" not in row and row.get("idle_server_cpu_pct") is not None
    ]
    if not measured:
        return
    seconds = measured[0][1]["idle_s"]
    print(
        f"  {f'idle ({IDLE_RATE_PER_S:g} user/s, {seconds:.0f} s)':<22} {'server CPU':>12} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    for label, row in measured:
        print(
            f"  {label:<22} {row['idle_server_cpu_pct']:>11.1f}% {_ms(row['idle_p50_ms']):>8} "
            f"{_ms(row['idle_p99_ms']):>8}"
        )


def _stalled(row: dict[str, Any]) -> str:
    """What became of the stalled clients, in words."""
    how = ", ".join(
        f"{'no close frame' if code == NO_CLOSE_FRAME else code}: {n}"
        for code, n in row["stalled_closes"].items()
    )
    text = f"{row['stalled_closed']} of {row['stalled_connected']} closed"
    if row["stalled_closed"]:
        first, last = row["stalled_closed_after_s"].values()
        span = f"{first:g}" if first == last else f"{first:g}-{last:g}"
        text += f" ({how}) after {span} s"
    text += f", {row['stalled_open_at_end']} still open at the end"
    if row["stalled_connected"] < row["stalled"]:
        errors = "; ".join(row["stalled_connect_errors"][:3])
        text += f" ({row['stalled']} asked: {errors})"
    return text


def print_fanout(report: dict[str, Any]) -> None:
    topology = LAUNCHERS[report["bus"]]
    main = report["fanout"]
    print(
        f"userstreamd {report['version']} bench fanout{topology.option}: {main['clients']} "
        f"clients{topology.spread(main)}, {main['rate_per_s']:,.0f} users/s "
        f"({main['clients'] * main['rate_per_s']:,.0f} frames/s asked), "
        f"{main['duration_s']:.0f} s after {main['warmup_s']:g} s warm-up; "
        f"{topology.servers(main)}Python {report['python']}, {report['cpus']} CPUs"
    )
    print(
        f"  {'server':<22} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'slow closes':>11} {'missed':>7} {'server CPU':>10} {'RSS/idle client':>15}"
    )
    rows = [main, *report.get("fanout_compare", {}).values()]
    names = ["userstreamd", *report.get("fanout_compare", {})]
    labels = [  # (each row's first column)
        topology.row_label if row is main and topology.row_label else row.get("server", name)
        for name, row in zip(names, rows, strict=True)
    ]
    for name, label, row in zip(names, labels, rows, strict=True):
        if "unavailable" in row:
            print(f"  {name:<22} unavailable ({row['unavailable']})")
            continue
        per_client = row["rss_per_idle_client_kib"]
        memory = "-" if per_client is None else f"{per_client:,.1f} KiB"
        print(
            f"  {label:<22} {row['delivered_per_s']:>12,.0f} {_ms(row['p50_ms']):>8} "
            f"{_ms(row['p99_ms']):>8} {_ms(row['max_ms']):>8} {row['slow_closes']:>11} "
            f"{row['missed']:>7} {row['server_cpu_pct']:>9.0f}% {memory:>15}"
        )
    for line in topology.lines(main):
        print(line)
    _print_idle(labels, rows)
    for label, row in zip(labels, rows, strict=True):
        if row.get("stalled"):
            print(f"  stalled clients (never read), {label}: {_stalled(row)}")
    for name, row in zip(names, rows, strict=True):
        if "unavailable" in row:
            continue
        if row["clients_connected"] < row["clients"]:
            errors = "; ".join(row["connect_errors"][:3])
            connected = f"{row['clients_connected']} of {row['clients']} connected"
            print(f"  note: {name}: {connected}: {errors}")
        if row["harness_cpu_pct"] >= HARNESS_CPU_WARNING_PCT:
            print(
                f"  note: {name}: the harness used {row['harness_cpu_pct']:.0f}% of a core: "
                "its figures may be the harness's limit (try --harness-procs 2)"
            )
    if "fanout_compare" in report:
        print(
            "  (the references only broadcast a pool of pre-built users; userstreamd's server "
            "CPU is its daemon process, producer, hub and broadcaster, and any fan-out workers)"
        )
