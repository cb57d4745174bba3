"""``userstreamd bench e2e --bus nats``: the pipeline's parts as separate processes on a
local NATS JetStream cluster, synthetic users into PostgreSQL.

The processes (`cluster`): NODES nats-servers holding the stream with REPLICAS copies,
one PostgreSQL (the bench's own embedded server), consumer processes (``run --role
consumer``; `--consumers` consumers over `--consumer-processes` processes) and one
producer (``run --role producer``). Two runs:

1. throughput: the producer asked for THROUGHPUT_RATE_PER_S users/s. On this bus nothing
   holds it back to what the consumers commit: it is limited by the stream's
   acknowledgements (R3: each message stored on two nodes before its ack), and the
   consumers read the stream behind it. So two figures over ``--duration`` seconds,
   after a warm-up: users *committed* per second (rows counted in PostgreSQL at both
   ends: the end-to-end figure) and users *published* per second (the stream's last seq
   at both ends). Then SIGTERM to the producer, a bounded wait until the consumer group
   has committed everything the stream holds (its ack floor reaches the last seq), and
   zero loss is checked as ``bench e2e`` checks it: the epoch's rows are exactly seqs
   1..N, each once, N the stream's last seq.
2. latency: a new producer process at LATENCY_RATE_PER_S users/s (resuming the stream)
   for min(duration, 20) s after the same warm-up; produced -> committed for every user
   produced in that window, exactly as ``bench e2e`` measures it: the commit timestamp
   of the row's transaction minus its ``produced_at`` (``track_commit_timestamp`` is on
   from the start here: the server is the bench's own).

Both runs report each process's CPU over the window and its peak memory: the producer,
the consumer processes, PostgreSQL's, the nats-servers.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from . import procs
from .cluster import (
    NODES,
    REPLICAS,
    BenchPostgres,
    StreamProbe,
    nats_roots,
    open_nats,
    role,
    snapshot,
    sum_metrics,
    wait_event,
)
from .daemon_child import BenchError, DaemonChild
from .display import Steps, open_steps
from .e2e import (
    LATENCY_RATE_PER_S,
    LATENCY_S_MAX,
    THROUGHPUT_RATE_PER_S,
    _backends,
    _by_name,
    _histogram_quantiles,
    _latencies,
    _mib,
    _n,
    _quantile,
    _zero_loss,
)

START_TIMEOUT_S = 60.0  # a producer's lease and first users
DRAIN_MIN_S = 60.0  # the wait for the backlog: this, plus 3 times its time at the rate seen
DRAIN_MAX_S = 900.0
BATCH_ROWS = "userstreamd_consumer_batch_size_sum"  # rows the consumers committed


def shares(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as can be (the first ones get the rest)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _rows(dsn: str, epoch: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM incoming_users WHERE epoch = %s", (epoch,)
        ).fetchone()
    return int(found[0]) if found else 0


class _Run:
    """The processes of a run and how to read them."""

    def __init__(
        self, cluster_roots: list[tuple[int, str]], db: BenchPostgres, probe: StreamProbe
    ) -> None:
        self.cluster_roots, self.db, self.probe = cluster_roots, db, probe
        self.producer: DaemonChild | None = None
        self.consumers: list[DaemonChild] = []

    def roots(self) -> list[tuple[int, str]]:
        found = [(self.producer.pid, "producer")] if self.producer else []
        found += [(c.pid, f"consumer process {i}") for i, c in enumerate(self.consumers, 1)]
        return [*found, (self.db.pid, "postgres guard (lifeline)"), *self.cluster_roots]

    def start_producer(self, rate_per_s: float) -> None:
        """Start the producer at `rate_per_s`; return once it holds the lease and the
        stream has grown."""
        assert self.producer is not None
        self.producer.tables["producer"]["rate_per_s"] = rate_per_s
        last = self.probe.last_seq()
        self.producer.start()
        wait_event(self.producer, "producer.lease_acquired", START_TIMEOUT_S)
        self.probe.wait_beyond(last, START_TIMEOUT_S, "the producer")

    def measured(
        self, steps: Steps, label: str, seconds: float, epoch: str | None
    ) -> dict[str, Any]:
        """Wait `seconds` as a row of the display (its status the consumers' commits per
        second); users committed (the epoch's rows counted, unless `epoch` is None) and
        published (the stream) per second over them, each process's usage, the
        consumers' /metrics at both ends."""

        def rows() -> int:
            return _rows(self.db.dsn, epoch) if epoch is not None else 0

        first = sum_metrics(self.consumers)
        rows_before, seq, start = rows(), self.probe.last_seq(), time.monotonic()
        before = snapshot(self.roots())
        last = [first.get(BATCH_ROWS, 0.0), start]

        def rate() -> str:
            committed, now = sum_metrics(self.consumers).get(BATCH_ROWS, 0.0), time.monotonic()
            per_s = (committed - last[0]) / max(now - last[1], 1e-9)
            last[:] = [committed, now]
            return f"{per_s:,.0f} committed/s"

        steps.wait(label, seconds, rate)
        end_seq, end_rows = self.probe.last_seq(), rows()
        seconds = time.monotonic() - start
        after = snapshot(self.roots(), _backends(self.db.dsn))
        return {
            "committed_per_s": (end_rows - rows_before) / seconds,
            "published_per_s": (end_seq - seq) / seconds,
            "backlog": end_seq - end_rows,
            "usage": procs.usage(before, after, seconds),
            "metrics": (first, sum_metrics(self.consumers)),
        }


def run_e2e_nats(
    *,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    consumers: int = 2,
    consumer_processes: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Both runs of the module's docstring; the JSON report (``bench e2e``'s keys, and
    what this bus adds)."""
    if not 1 <= consumer_processes <= consumers:
        raise BenchError(f"--consumer-processes must be 1..{consumers} (--consumers)")
    latency_s = min(duration_s, LATENCY_S_MAX)
    per_process = shares(consumers, consumer_processes)
    e2e: dict[str, Any] = {
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rate_per_s_asked": THROUGHPUT_RATE_PER_S,
        "consumers": consumers,
        "consumer_processes": consumer_processes,
        "consumers_per_process": per_process,
        "nats_servers": NODES,
        "replicas": REPLICAS,
        "latency_rate_per_s": LATENCY_RATE_PER_S,
        "latency_s": latency_s,
    }
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
        contextlib.ExitStack() as stack,  # (closed before the folder goes)
    ):
        base = Path(folder)
        step = steps.step(f"start {NODES} nats-servers")
        cluster = stack.enter_context(open_nats(base / "nats"))
        step.done(", ".join(cluster.urls))
        step = steps.step("start PostgreSQL (initdb)")
        db = BenchPostgres(base / "db")
        stack.callback(db.stop)
        db.start()
        step.done(f"pid {db.pid}")
        probe = stack.enter_context(StreamProbe(cluster.urls))
        run = _Run(nats_roots(cluster), db, probe)
        step = steps.step(f"start {consumer_processes} consumer process(es)")
        database = {"dsn": db.dsn}
        for i, count in enumerate(per_process, 1):
            child = role(
                base / f"consumer-{i}",
                "consumer",
                cluster.urls,
                {"consumers": {"count": count}, "database": database},
            )
            stack.callback(child.close)
            run.consumers.append(child)
            child.spawn()
        for child in run.consumers:
            child.wait_ready()
        step.done(", ".join(f"pid {c.pid}" for c in run.consumers))
        run.producer = role(base / "producer", "producer", cluster.urls, {"database": database})
        stack.callback(run.producer.close)

        step = steps.step("start the producer")
        run.start_producer(THROUGHPUT_RATE_PER_S)
        step.done(f"pid {run.producer.pid}")
        epoch, _ = probe.state()
        steps.wait("throughput: warm-up", warmup_s)
        rate = f"{THROUGHPUT_RATE_PER_S:,.0f}"
        got = run.measured(
            steps, f"throughput: {duration_s:g} s, asking {rate}/s", duration_s, epoch
        )
        e2e["users_per_s"] = round(got["committed_per_s"], 1)
        e2e["published_per_s"] = round(got["published_per_s"], 1)
        e2e["backlog_at_end"] = got["backlog"]
        e2e["processes"] = got["usage"]

        step = steps.step("stop the producer (SIGTERM)")
        code = run.producer.stop()
        epoch, last = probe.state()
        step.done(f"exit code {code}, last seq {last:,}")
        if code != 0:
            raise BenchError(f"the producer exited with code {code}: {run.producer}")
        backlog = last - _rows(db.dsn, epoch)
        step = steps.step(f"commit the backlog ({backlog:,} users)")
        backlog_s = backlog / max(got["committed_per_s"], 500.0)  # (at the rate seen)
        timeout = min(DRAIN_MAX_S, DRAIN_MIN_S + 3 * backlog_s)
        start = time.monotonic()
        drained = probe.wait_committed(last, timeout)
        e2e["drain_s"] = round(time.monotonic() - start, 1)
        step.done(f"{e2e['drain_s']:g} s" if drained else f"NOT within {timeout:.0f} s")
        step = steps.step("check zero loss")
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            loss = _zero_loss(conn, {"epoch": epoch, "last_seq": last, "drained": drained})
        e2e["zero_loss"] = loss
        step.done("verified" if loss["verified"] else "NOT VERIFIED")

        step = steps.step("restart the producer")
        run.start_producer(LATENCY_RATE_PER_S)
        step.done(f"pid {run.producer.pid}")
        steps.wait("latency: warm-up", warmup_s)
        start_at = time.time()
        label = f"latency: {latency_s:g} s at {LATENCY_RATE_PER_S:,.0f}/s"
        got = run.measured(steps, label, latency_s, None)  # (no count(*) in the window)
        stop_at = time.time()
        e2e["latency_processes"] = got["usage"]
        step = steps.step("read latencies")
        probe.wait_committed(probe.last_seq(), DRAIN_MIN_S)  # (the window's last users)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            latencies, how = _latencies(conn, start_at, stop_at)
        step.done(f"{len(latencies):,} users")
        e2e["latency_ms"] = {
            "p50": _quantile(latencies, 0.50),
            "p99": _quantile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
        }
        e2e["latency_users"] = len(latencies)
        e2e["latency_source"] = how
        e2e["latency_ms_daemon_histogram"] = _histogram_quantiles(*got["metrics"])
        step = steps.step("stop (SIGTERM)")
        codes = [run.producer.stop(), *(c.stop() for c in run.consumers)]
        step.done(f"exit codes {codes}")
    return {**procs.report_head("e2e"), "e2e": e2e}


def _layout(e: dict[str, Any]) -> str:
    if e["consumer_processes"] == 1:
        return f"{e['consumers']} consumers in 1 process (consumers.count = {e['consumers']})"
    counts = "/".join(str(n) for n in e["consumers_per_process"])
    layout = f"{e['consumers']} consumers in {e['consumer_processes']} processes ({counts})"
    if e["consumer_processes"] == e["consumers"]:
        layout += " (the default: on 2 cores faster than one process with consumers.count = 2)"
    return layout


def print_e2e_nats(report: dict[str, Any]) -> None:
    e = report["e2e"]
    loss = e["zero_loss"]
    lat = e["latency_ms"]
    print(
        f"userstreamd {report['version']} bench e2e --bus nats: {e['duration_s']:g} s asking "
        f"{e['rate_per_s_asked']:,.0f} users/s, then {e['latency_s']:g} s at "
        f"{e['latency_rate_per_s']:,.0f} users/s; {e['nats_servers']} nats-servers (stream "
        f"R{e['replicas']}), 1 producer process, {_layout(e)}, embedded PostgreSQL; "
        f"Python {report['python']}, {report['cpus']} CPUs"
    )
    check = "verified" if loss["verified"] else "NOT VERIFIED"
    print(
        f"  sustained, committed      {e['users_per_s']:,.0f} users/s (rows counted in "
        f"PostgreSQL); zero loss {check}: {_n(loss.get('published'))} published, "
        f"{_n(loss.get('rows'))} rows, seqs {_n(loss.get('min_seq'))}.."
        f"{_n(loss.get('max_seq'))} each once"
    )
    print(
        f"  published, stream acks    {e['published_per_s']:,.0f} users/s; "
        f"{e['backlog_at_end']:,} not yet committed at the end, committed {e['drain_s']:g} s "
        "after the producer stopped"
    )
    if e["published_per_s"] > 1.1 * e["users_per_s"]:
        print(
            "  (the producer ran ahead of the consumers: the end-to-end figure is the "
            "committed one)"
        )
    print(
        f"  produced -> committed     p50 {_n(lat['p50'], 1)} ms, p99 {_n(lat['p99'], 1)} ms, "
        f"max {_n(lat['max'], 1)} ms: every one of {e['latency_users']:,} users at "
        f"{e['latency_rate_per_s']:,.0f}/s ({e['latency_source'].split(' - ')[0]})"
    )
    hist = e["latency_ms_daemon_histogram"]
    if hist.get("p50") is None:
        print("  the consumers' histogram  empty (not fed on the NATS bus)")
    else:
        print(
            f"  the consumers' histogram  p50 {_n(hist['p50'], 1)} ms, p99 "
            f"{_n(hist['p99'], 1)} ms (interpolated in its buckets)"
        )
    print(f"  {'process':<44} {'CPU (throughput)':>16} {'CPU (latency)':>14} {'peak RSS':>9}")
    runs = [_by_name(e["processes"]), _by_name(e["latency_processes"])]
    order = ("producer", "consumer", "postgres", "nats-server")
    for name in sorted(
        {*runs[0], *runs[1]},
        key=lambda n: (next((i for i, o in enumerate(order) if n.startswith(o)), 9), n),
    ):
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
