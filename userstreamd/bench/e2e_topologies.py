"""What ``bench e2e`` runs on each bus: one `E2ETopology` per topology, in `LAUNCHERS`
by the bus's name (``--bus``). `e2e` drives any of them through the same two runs.

- `EmbeddedE2E`: one daemon (`DaemonChild`) on one state directory, its consumer
  workers and its embedded PostgreSQL. Users committed per second come from
  ``userstreamd_users_committed_total`` at both ends of the window; the producer is held
  by the hub's backpressure to what the consumers commit. Draining is the daemon's own:
  SIGTERM, and its log says the last seq and that everything up to it was committed.
  The latency run restarts the daemon on the same state directory (it resumes the
  stream); ``track_commit_timestamp`` is switched on with ALTER SYSTEM during the first
  run and takes effect at that restart.
- `NatsE2E`: the parts as processes on a local NATS JetStream cluster (`cluster`): NODES
  nats-servers holding the stream with REPLICAS copies, one PostgreSQL (the bench's own,
  ``track_commit_timestamp`` on from the start), consumer processes (``run --role
  consumer``; ``--consumers`` over ``--consumer-processes``) and one producer (``run
  --role producer``). Nothing holds the producer back to what the consumers commit
  (only the stream's acknowledgements), so it reports users *committed* (rows counted
  in PostgreSQL at both ends) and users *published* (the stream's last seq at both
  ends) per second. Draining: SIGTERM to the producer, then a bounded wait until the
  consumer group's ack floor reaches the stream's last seq. The latency run starts a new
  producer process (resuming the stream).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg

from . import checks, procs
from .cluster import (
    NODES,
    REPLICAS,
    BenchPostgres,
    StreamProbe,
    nats_roots,
    open_nats,
    role,
    shares,
    snapshot,
    sum_metrics,
    wait_event,
)
from .daemon_child import BenchError, DaemonChild
from .display import Steps

THROUGHPUT_RATE_PER_S = 50_000.0
LATENCY_RATE_PER_S = 1000.0
LATENCY_S_MAX = 20.0
COMMITTED = "userstreamd_users_committed_total"
BATCH_ROWS = "userstreamd_consumer_batch_size_sum"  # rows the consumers committed
SETTLE_S = 0.5  # the embedded daemon's last users of a window: committed by then
START_TIMEOUT_S = 60.0  # a producer's lease and first users
DRAIN_MIN_S = 60.0  # the wait for the backlog: this, plus 3 times its time at the rate seen
DRAIN_MAX_S = 900.0


@dataclass
class Measured:
    """A measured window: users committed per second, what else the topology counts
    (its JSON keys), each process's usage, the consumers' /metrics at both ends."""

    committed_per_s: float
    usage: list[dict[str, Any]]
    metrics: tuple[dict[str, float], dict[str, float]]
    figures: dict[str, Any] = field(default_factory=dict)


class E2ETopology(Protocol):
    option: str  # what the headline adds after ``bench e2e``
    counted_by: str  # how the committed users were counted, for the headline
    process_order: tuple[str, ...]  # process rows, by the start of their names

    def __init__(self, consumers: int, consumer_processes: int) -> None: ...
    def layout(self) -> dict[str, Any]: ...
    def start(
        self, base: Path, stack: contextlib.ExitStack, steps: Steps, rate_per_s: float
    ) -> None: ...
    @property
    def dsn(self) -> str: ...
    def measured(self, steps: Steps, label: str, seconds: float, *, count: bool) -> Measured: ...
    def drain(self, steps: Steps, committed_per_s: float) -> dict[str, Any]: ...
    def restart(self, steps: Steps, rate_per_s: float) -> None: ...
    def settle(self) -> None: ...
    def stop(self, steps: Steps) -> None: ...
    @staticmethod
    def describe(e: dict[str, Any]) -> str: ...
    @staticmethod
    def throughput_lines(e: dict[str, Any]) -> list[str]: ...
    @staticmethod
    def histogram_line(hist: dict[str, Any], n: Any) -> str: ...


def _rate_status(read: Any) -> Any:
    """A display status: the committed rate since the last call, from `read()`."""
    last = [read(), time.monotonic()]

    def rate() -> str:
        committed, now = read(), time.monotonic()
        per_s = (committed - last[0]) / max(now - last[1], 1e-9)
        last[:] = [committed, now]
        return f"{per_s:,.0f} committed/s"

    return rate


class EmbeddedE2E:
    option: str = ""
    counted_by: str = ""
    process_order: tuple[str, ...] = ("daemon",)

    def __init__(self, consumers: int, consumer_processes: int) -> None:
        self.consumers = consumers
        self.daemon: DaemonChild | None = None

    def layout(self) -> dict[str, Any]:
        return {}

    @property
    def dsn(self) -> str:
        assert self.daemon is not None
        return self.daemon.dsn

    def start(
        self, base: Path, stack: contextlib.ExitStack, steps: Steps, rate_per_s: float
    ) -> None:
        tables: dict[str, dict[str, Any]] = {
            "producer": {"rate_per_s": rate_per_s},
            "consumers": {"count": self.consumers},
        }
        self.daemon = daemon = DaemonChild(base, tables)
        stack.callback(daemon.close)
        step = steps.step("start the daemon (initdb on first use)")
        daemon.start()
        step.done(f"pid {daemon.pid}")
        with psycopg.connect(daemon.dsn, autocommit=True) as conn:  # for run 2
            conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")

    def measured(self, steps: Steps, label: str, seconds: float, *, count: bool) -> Measured:
        daemon = self.daemon
        assert daemon is not None
        first, start = daemon.metrics(), time.monotonic()
        before = procs.snapshot(daemon.pid)
        steps.wait(label, seconds, _rate_status(lambda: daemon.metrics().get(COMMITTED, 0.0)))
        end, seconds = daemon.metrics(), time.monotonic() - start
        after = procs.snapshot(daemon.pid, checks.backends(daemon.dsn))
        per_s = (end.get(COMMITTED, 0.0) - first.get(COMMITTED, 0.0)) / seconds
        return Measured(per_s, procs.usage(before, after, seconds), (first, end))

    def drain(self, steps: Steps, committed_per_s: float) -> dict[str, Any]:
        """SIGTERM: the daemon drains and exits; what its log says of the stream's end."""
        daemon = self.daemon
        assert daemon is not None
        step = steps.step("drain and stop (SIGTERM)")
        code = daemon.stop()
        started = daemon.events("daemon.stream_started") or daemon.events("daemon.stream_resumed")
        drained = daemon.events("daemon.drained")
        end: dict[str, Any]
        if not started or not drained:
            end = {"epoch": started[0]["epoch"] if started else None, "drained": False}
        else:
            end = {
                "epoch": started[0]["epoch"],
                "last_seq": drained[0]["last_seq"],
                "committed_through": drained[0]["committed_through"],
                "drained": drained[0]["last_seq"] == drained[0]["committed_through"],
            }
        step.done(f"exit code {code}, last seq {end.get('last_seq')}")
        if code != 0:
            raise BenchError(f"the daemon exited with code {code}: {daemon}")
        return end

    def restart(self, steps: Steps, rate_per_s: float) -> None:
        assert self.daemon is not None
        step = steps.step("restart the daemon")
        self.daemon.tables["producer"]["rate_per_s"] = rate_per_s
        self.daemon.start()
        step.done(f"pid {self.daemon.pid}")

    def settle(self) -> None:
        time.sleep(SETTLE_S)

    def stop(self, steps: Steps) -> None:
        assert self.daemon is not None
        step = steps.step("stop (SIGTERM)")
        step.done(f"exit code {self.daemon.stop()}")

    @staticmethod
    def describe(e: dict[str, Any]) -> str:
        return f"{e['consumers']} consumers"

    @staticmethod
    def throughput_lines(e: dict[str, Any]) -> list[str]:
        return []

    @staticmethod
    def histogram_line(hist: dict[str, Any], n: Any) -> str:
        return (
            f"  the daemon's histogram    p50 {n(hist['p50'], 1)} ms, p99 {n(hist['p99'], 1)} "
            "ms (production -> acknowledged commit; interpolated in its buckets)"
        )


class NatsE2E:
    option: str = " --bus nats"
    counted_by: str = " (rows counted in PostgreSQL)"
    process_order: tuple[str, ...] = ("producer", "consumer", "postgres", "nats-server")

    def __init__(self, consumers: int, consumer_processes: int) -> None:
        if not 1 <= consumer_processes <= consumers:
            raise BenchError(f"--consumer-processes must be 1..{consumers} (--consumers)")
        self.per_process = shares(consumers, consumer_processes)
        self.producer: DaemonChild | None = None
        self.consumers: list[DaemonChild] = []
        self.epoch = ""

    def layout(self) -> dict[str, Any]:
        return {
            "consumer_processes": len(self.per_process),
            "consumers_per_process": self.per_process,
            "nats_servers": NODES,
            "replicas": REPLICAS,
        }

    @property
    def dsn(self) -> str:
        return self.db.dsn

    def start(
        self, base: Path, stack: contextlib.ExitStack, steps: Steps, rate_per_s: float
    ) -> None:
        step = steps.step(f"start {NODES} nats-servers")
        cluster = stack.enter_context(open_nats(base / "nats"))
        step.done(", ".join(cluster.urls))
        step = steps.step("start PostgreSQL (initdb)")
        self.db = BenchPostgres(base / "db")
        stack.callback(self.db.stop)
        self.db.start()
        step.done(f"pid {self.db.pid}")
        self.probe = stack.enter_context(StreamProbe(cluster.urls))
        self.cluster_roots = nats_roots(cluster)
        step = steps.step(f"start {len(self.per_process)} consumer process(es)")
        database = {"dsn": self.db.dsn}
        for i, count in enumerate(self.per_process, 1):
            tables: dict[str, dict[str, Any]] = {
                "consumers": {"count": count},
                "database": database,
            }
            child = role(base / f"consumer-{i}", "consumer", cluster.urls, tables)
            stack.callback(child.close)
            self.consumers.append(child)
            child.spawn()
        for child in self.consumers:
            child.wait_ready()
        step.done(", ".join(f"pid {c.pid}" for c in self.consumers))
        self.producer = role(base / "producer", "producer", cluster.urls, {"database": database})
        stack.callback(self.producer.close)
        step = steps.step("start the producer")
        self._start_producer(rate_per_s)
        step.done(f"pid {self.producer.pid}")
        self.epoch, _ = self.probe.state()

    def _start_producer(self, rate_per_s: float) -> None:
        """Start the producer at `rate_per_s`; return once it holds the lease and the
        stream has grown."""
        assert self.producer is not None
        self.producer.tables["producer"]["rate_per_s"] = rate_per_s
        last = self.probe.last_seq()
        self.producer.start()
        wait_event(self.producer, "producer.lease_acquired", START_TIMEOUT_S)
        self.probe.wait_beyond(last, START_TIMEOUT_S, "the producer")

    def _roots(self) -> list[tuple[int, str]]:
        found = [(self.producer.pid, "producer")] if self.producer else []
        found += [(c.pid, f"consumer process {i}") for i, c in enumerate(self.consumers, 1)]
        return [*found, (self.db.pid, "postgres guard (lifeline)"), *self.cluster_roots]

    def measured(self, steps: Steps, label: str, seconds: float, *, count: bool) -> Measured:
        """`count`: the epoch's rows counted at both ends (not in the latency window)."""

        def rows() -> int:
            return checks.rows(self.db.dsn, self.epoch) if count else 0

        first = sum_metrics(self.consumers)
        rows_before, seq, start = rows(), self.probe.last_seq(), time.monotonic()
        before = snapshot(self._roots())
        committed = _rate_status(lambda: sum_metrics(self.consumers).get(BATCH_ROWS, 0.0))
        steps.wait(label, seconds, committed)
        end_seq, end_rows = self.probe.last_seq(), rows()
        seconds = time.monotonic() - start
        after = snapshot(self._roots(), checks.backends(self.db.dsn))
        return Measured(
            (end_rows - rows_before) / seconds,
            procs.usage(before, after, seconds),
            (first, sum_metrics(self.consumers)),
            {
                "published_per_s": round((end_seq - seq) / seconds, 1),
                "backlog_at_end": end_seq - end_rows,
            },
        )

    def drain(self, steps: Steps, committed_per_s: float) -> dict[str, Any]:
        """SIGTERM to the producer, then wait until the group committed the stream."""
        assert self.producer is not None
        step = steps.step("stop the producer (SIGTERM)")
        code = self.producer.stop()
        epoch, last = self.probe.state()
        step.done(f"exit code {code}, last seq {last:,}")
        if code != 0:
            raise BenchError(f"the producer exited with code {code}: {self.producer}")
        backlog = last - checks.rows(self.db.dsn, epoch)
        step = steps.step(f"commit the backlog ({backlog:,} users)")
        backlog_s = backlog / max(committed_per_s, 500.0)  # (at the rate seen)
        timeout = min(DRAIN_MAX_S, DRAIN_MIN_S + 3 * backlog_s)
        start = time.monotonic()
        drained = self.probe.wait_committed(last, timeout)
        drain_s = round(time.monotonic() - start, 1)
        step.done(f"{drain_s:g} s" if drained else f"NOT within {timeout:.0f} s")
        return {
            "epoch": epoch,
            "last_seq": last,
            "drained": drained,
            "figures": {"drain_s": drain_s},
        }

    def restart(self, steps: Steps, rate_per_s: float) -> None:
        assert self.producer is not None
        step = steps.step("restart the producer")
        self._start_producer(rate_per_s)
        step.done(f"pid {self.producer.pid}")

    def settle(self) -> None:
        self.probe.wait_committed(self.probe.last_seq(), DRAIN_MIN_S)

    def stop(self, steps: Steps) -> None:
        assert self.producer is not None
        step = steps.step("stop (SIGTERM)")
        codes = [self.producer.stop(), *(c.stop() for c in self.consumers)]
        step.done(f"exit codes {codes}")

    @staticmethod
    def describe(e: dict[str, Any]) -> str:
        if e["consumer_processes"] == 1:
            layout = f"{e['consumers']} consumers in 1 process (consumers.count = {e['consumers']})"
        else:
            counts = "/".join(str(n) for n in e["consumers_per_process"])
            layout = f"{e['consumers']} consumers in {e['consumer_processes']} processes ({counts})"
            if e["consumer_processes"] == e["consumers"]:
                layout += (
                    " (the default: on 2 cores faster than one process with consumers.count = 2)"
                )
        return (
            f"{e['nats_servers']} nats-servers (stream R{e['replicas']}), 1 producer process, "
            + layout
        )

    @staticmethod
    def throughput_lines(e: dict[str, Any]) -> list[str]:
        lines = [
            f"  published, stream acks    {e['published_per_s']:,.0f} users/s; "
            f"{e['backlog_at_end']:,} not yet committed at the end, committed "
            f"{e['drain_s']:g} s after the producer stopped"
        ]
        if e["published_per_s"] > 1.1 * e["users_per_s"]:
            lines.append(
                "  (the producer ran ahead of the consumers: the end-to-end figure is the "
                "committed one)"
            )
        return lines

    @staticmethod
    def histogram_line(hist: dict[str, Any], n: Any) -> str:
        if hist.get("p50") is None:
            return "  the consumers' histogram  empty (not fed on the NATS bus)"
        return (
            f"  the consumers' histogram  p50 {n(hist['p50'], 1)} ms, p99 "
            f"{n(hist['p99'], 1)} ms (interpolated in its buckets)"
        )


LAUNCHERS: dict[str, type[E2ETopology]] = {"embedded": EmbeddedE2E, "nats": NatsE2E}
