"""``userstreamd bench fanout --bus nats``: two broadcaster processes on a local NATS
JetStream cluster, N plain WebSocket clients split evenly between them.

The processes (`cluster`): NODES nats-servers holding the stream with REPLICAS copies,
one producer (``run --role producer``, with the embedded PostgreSQL it keeps its stream
record in) and BROADCASTERS broadcasters (``run --role broadcaster``, each on a port of
its own, each mirroring the stream into its own hub). No consumer runs: the stream is
only broadcast. The harness (`harness`) opens the clients round-robin over the
broadcasters' URLs, so client k goes to broadcaster k mod BROADCASTERS.

The steps are `fanout`'s: the producer at 1 user/s; the broadcasters' resident memory
before and after the clients connect (the difference over N: memory per idle client);
the rate raised to R with SIGHUP; a warm-up; then over ``--duration`` seconds users
delivered per second over all clients, latency from ``produced_at`` to the client's
read (which now includes the trip through the stream: producer -> nats-server ->
broadcaster), slow closes, missed users, clients connected at the end, and the CPU of
each process (each broadcaster, the producer, each nats-server; the harness's own).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from . import procs
from .cluster import NODES, REPLICAS, StreamProbe, nats_roots, open_nats, role, snapshot, wait_event
from .daemon_child import DaemonChild
from .display import open_steps
from .fanout import (
    CLIENTS_SPARE,
    HARNESS_CPU_WARNING_PCT,
    IDLE_RATE_PER_S,
    SETTLE_S,
    START_TIMEOUT_S,
    _Harnesses,
    _ms,
    figures,
)

BROADCASTERS = 2
CLIENTS_GAUGE = "userstreamd_websocket_clients"


def _serving(process: str) -> bool:
    """Whether a process row holds clients: a broadcaster (this bench runs them without
    fan-out workers: ``broadcaster.workers = 0``)."""
    return process.startswith("broadcaster ")


def run_fanout_nats(
    *,
    clients: int = 100,
    rate_per_s: float = 1000.0,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    harness_procs: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """The figures of the module's docstring, with `fanout`'s keys and this bus's."""
    report = procs.report_head("fanout")
    name = f"userstreamd {__version__}"
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
        contextlib.ExitStack() as stack,  # (closed before the folder goes)
    ):
        base = Path(folder)
        step = steps.step(f"start {NODES} nats-servers")
        cluster = stack.enter_context(open_nats(base / "nats"))
        step.done(", ".join(cluster.urls))
        probe = stack.enter_context(StreamProbe(cluster.urls))
        step = steps.step(f"{name}: start a producer and {BROADCASTERS} broadcasters")
        producer = role(
            base / "producer",
            "producer",
            cluster.urls,
            {"producer": {"rate_per_s": IDLE_RATE_PER_S}},
        )
        room = clients + CLIENTS_SPARE
        limits = {"max_connections": room, "max_connections_per_ip": room, "workers": 0}
        broadcasters = [
            role(base / f"broadcaster-{i}", "broadcaster", cluster.urls, {"broadcaster": limits})
            for i in range(1, BROADCASTERS + 1)
        ]
        children: list[DaemonChild] = [producer, *broadcasters]
        for child in children:
            stack.callback(child.close)
            child.spawn()
        for child in children:
            child.wait_ready()
        wait_event(producer, "producer.lease_acquired", START_TIMEOUT_S)
        probe.wait_beyond(0, START_TIMEOUT_S, "the producer")
        step.done(", ".join(f"pid {c.pid}" for c in children))

        roots = [(producer.pid, "producer")]
        roots += [(b.pid, f"broadcaster {i}") for i, b in enumerate(broadcasters, 1)]
        roots += nats_roots(cluster)

        def serving_rss_kib() -> int:
            tree = snapshot(roots).values()
            return sum(p.rss_kib for p in tree if _serving(p.name))

        time.sleep(SETTLE_S)
        rss_before = serving_rss_kib()
        step = steps.step(f"{name}: connect {clients} clients")
        harness = _Harnesses([b.url for b in broadcasters], clients, harness_procs)
        stack.callback(harness.close)
        connected = harness.connected(START_TIMEOUT_S + clients / 50)
        time.sleep(SETTLE_S)
        rss_after = serving_rss_kib()
        by_broadcaster = [int(b.metrics().get(CLIENTS_GAUGE, 0.0)) for b in broadcasters]
        step.done(f"{connected['clients']} connected ({'/'.join(map(str, by_broadcaster))})")
        producer.set_rate(rate_per_s)
        steps.wait(f"{name}: warm-up at {rate_per_s:,.0f} users/s", warmup_s)
        before, start = snapshot(roots), time.monotonic()
        label = f"{name}: {duration_s:g} s, {clients} clients"
        got = harness.measure(steps, label, duration_s)
        after, seconds = snapshot(roots), time.monotonic() - start
        seq = probe.last_seq()
    usage = procs.usage(before, after, seconds)

    def cpu(process: str) -> float:
        return round(sum(r["cpu_pct"] for r in usage if r["process"] == process), 1)

    per_broadcaster = [cpu(f"broadcaster {i}") for i in range(1, BROADCASTERS + 1)]
    server = f"{name} (nats, {BROADCASTERS} broadcasters)"
    report["fanout"] = {
        **figures(
            server,
            clients,
            rate_per_s,
            warmup_s,
            harness_procs,
            connected,
            got,
            usage,
            _serving,
            (rss_before, rss_after),
        ),
        "broadcasters": BROADCASTERS,
        "clients_by_broadcaster": by_broadcaster,
        "broadcaster_cpu_pct": per_broadcaster,
        "producer_cpu_pct": cpu("producer"),
        "nats_server_cpu_pct": [cpu(f"nats-server n{i + 1}") for i in range(NODES)],
        "nats_servers": NODES,
        "replicas": REPLICAS,
        "stream_last_seq": seq,
    }
    return report


def print_fanout_nats(report: dict[str, Any]) -> None:
    row = report["fanout"]
    split = "/".join(str(n) for n in row["clients_by_broadcaster"])
    print(
        f"userstreamd {report['version']} bench fanout --bus nats: {row['clients']} clients "
        f"over {row['broadcasters']} broadcaster processes ({split}), "
        f"{row['rate_per_s']:,.0f} users/s ({row['clients'] * row['rate_per_s']:,.0f} "
        f"frames/s asked), {row['duration_s']:.0f} s after {row['warmup_s']:g} s warm-up; "
        f"{row['nats_servers']} nats-servers (stream R{row['replicas']}), 1 producer "
        f"process; Python {report['python']}, {report['cpus']} CPUs"
    )
    print(
        f"  {'server':<22} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'slow closes':>11} {'missed':>7} {'server CPU':>10} {'RSS/idle client':>15}"
    )
    per_client = row["rss_per_idle_client_kib"]
    memory = "-" if per_client is None else f"{per_client:,.1f} KiB"
    print(
        f"  {'userstreamd (nats)':<22} {row['delivered_per_s']:>12,.0f} {_ms(row['p50_ms']):>8} "
        f"{_ms(row['p99_ms']):>8} {_ms(row['max_ms']):>8} {row['slow_closes']:>11} "
        f"{row['missed']:>7} {row['server_cpu_pct']:>9.0f}% {memory:>15}"
    )
    each = ", ".join(
        f"broadcaster {i} {pct:.0f}%" for i, pct in enumerate(row["broadcaster_cpu_pct"], 1)
    )
    servers = ", ".join(f"n{i} {pct:.0f}%" for i, pct in enumerate(row["nats_server_cpu_pct"], 1))
    print(
        f"  CPU (of one core): {each}; producer {row['producer_cpu_pct']:.0f}%; "
        f"nats-servers {servers}; harness {row['harness_cpu_pct']:.0f}%"
    )
    print(
        f"  cut off: {row['slow_closes']} slow closes, {row['dropped']} dropped; "
        f"{row['connected_at_end']} of {row['clients']} clients connected at the end"
    )
    if row["clients_connected"] < row["clients"]:
        errors = "; ".join(row["connect_errors"][:3])
        print(f"  note: {row['clients_connected']} of {row['clients']} connected: {errors}")
    if row["harness_cpu_pct"] >= HARNESS_CPU_WARNING_PCT:
        print(
            f"  note: the harness used {row['harness_cpu_pct']:.0f}% of a core: its figures "
            "may be the harness's limit (try --harness-procs 2)"
        )
