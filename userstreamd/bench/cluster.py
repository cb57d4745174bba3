"""What ``bench e2e --bus nats`` and ``bench fanout --bus nats`` share: a local NATS
JetStream cluster, the pipeline's roles as child processes on it, the database they
share, and what the bench reads from the stream.

- `open_nats` starts a `LocalCluster` of NODES nats-servers in the bench's folder
  (127.0.0.1 only; from the main thread, so the servers die with the bench) and stops
  it at the end;
- `role` is a `DaemonChild` running one part (``run --role R``) on that cluster, the
  stream replicated as in production (REPLICAS);
- `BenchPostgres` is an embedded PostgreSQL the bench owns (under a lifeline guard: it
  stops when the bench does), with ``track_commit_timestamp`` on; the producer and every
  consumer process share it through its Unix socket (``database.dsn``);
- `StreamProbe` reads the stream's epoch and last seq and the consumer group's ack
  floor, with nats-py on an event loop of its own;
- `snapshot` reads every process of a run at once (`procs`), each tree under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors

from ..errors import EmbeddedPostgresError, InUseError
from ..store.embedded import EmbeddedPostgres
from ..testing.nats import LocalCluster
from ..topology.nats.bus import epoch_of
from . import procs
from .daemon_child import BenchError, DaemonChild

NODES = 3
REPLICAS = 3
STREAM = "USERSTREAM"  # (the config's default)
GROUP = "db"  # (the consumer group's default: its durable consumer's name)
CLUSTER_START_S = 60.0
PROBE_TIMEOUT_S = 10.0
POLL_S = 0.25
POSTGRES_STOP_S = 40.0  # the guard's 30 s, then SIGKILL


@contextlib.contextmanager
def open_nats(folder: Path) -> Iterator[LocalCluster]:
    """A running NODES-node cluster until the block ends (BenchError if it does not
    start)."""
    cluster = LocalCluster(folder, NODES)
    try:
        cluster.start(CLUSTER_START_S)
    except RuntimeError as exc:
        cluster.stop()
        raise BenchError(str(exc)) from exc
    try:
        yield cluster
    finally:
        cluster.stop()


def role(
    folder: Path, name: str, urls: list[str], tables: dict[str, dict[str, Any]]
) -> DaemonChild:
    """A daemon running role `name` on the cluster at `urls`, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster = {"bus": "nats", "servers": urls, "stream": STREAM, "replicas": REPLICAS}
    return DaemonChild(folder, {**tables, "cluster": cluster}, ["--role", name])


def wait_event(child: DaemonChild, event: str, timeout_s: float) -> dict[str, Any]:
    """The first `event` of the child's run; BenchError with its log's tail if it does
    not come within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (found := child.events(event)):
        if time.monotonic() > deadline:
            raise BenchError(f"no {event} within {timeout_s:.0f} s: {child}")
        time.sleep(0.05)
    return found[0]


class BenchPostgres:
    """An embedded server in `folder`/postgres, started by `start`, stopped by `stop`."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder, folder.parent):  # (the bench's temporary folder is 0700; a
            path.chmod(path.stat().st_mode | 0o011)  # server run as another user must pass)
        self.server = EmbeddedPostgres(folder / "postgres")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return self.server.dsn

    @property
    def pid(self) -> int:
        """The lifeline guard's (the server and its backends are below it)."""
        return self.proc.pid if self.proc else 0

    def start(self) -> None:
        try:
            self.server.prepare()
            command = [*self.server.command(), "-c", "track_commit_timestamp=on"]
            with self.server.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    command, stdin=subprocess.PIPE, **self.server.process_options(log)
                )
            self.server.wait_ready(self.proc)
        except (EmbeddedPostgresError, InUseError) as exc:
            self.stop()
            raise BenchError(f"PostgreSQL: {exc}") from exc

    def stop(self) -> None:
        """Close the guard's lifeline (a fast shutdown), wait; SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(POSTGRES_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StreamProbe:
    """The bench's own client of the cluster (blocking calls)."""

    def __init__(self, urls: list[str]) -> None:
        self._runner = asyncio.Runner()
        try:
            self._nc = self._runner.run(
                nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=10)
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            self._runner.close()
            raise BenchError(f"cannot connect to the NATS cluster: {exc}") from exc
        self._js = self._nc.jetstream(timeout=PROBE_TIMEOUT_S)

    def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            self._runner.run(self._nc.close())
        self._runner.close()

    def __enter__(self) -> StreamProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def state(self) -> tuple[str, int]:
        """The stream's epoch (as the roles derive it) and its last seq."""
        try:
            info = self._runner.run(self._js.stream_info(STREAM))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BenchError(f"stream {STREAM}: {type(exc).__name__}: {exc}") from exc
        return epoch_of(info), int(info.state.last_seq)

    def last_seq(self) -> int:
        return self.state()[1]

    def ack_floor(self) -> int:
        """The consumer group's ack floor: every seq up to it is committed (0 before the
        group's durable consumer exists)."""
        try:
            info = self._runner.run(self._js.consumer_info(STREAM, GROUP))
        except nats.js.errors.NotFoundError:
            return 0
        except (nats.errors.Error, TimeoutError) as exc:
            raise BenchError(f"consumer {GROUP}: {type(exc).__name__}: {exc}") from exc
        return int(info.ack_floor.stream_seq) if info.ack_floor else 0

    def wait_committed(self, seq: int, timeout_s: float) -> bool:
        """Wait until the group committed everything up to `seq`; whether it did in time."""
        deadline = time.monotonic() + timeout_s
        while self.ack_floor() < seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def wait_beyond(self, seq: int, timeout_s: float, what: str) -> None:
        """Wait until the stream holds more than `seq` users (a producer publishing)."""
        deadline = time.monotonic() + timeout_s
        while self.last_seq() <= seq:
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: nothing published within {timeout_s:.0f} s")
            time.sleep(0.05)


def shares(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as can be (the first ones get the rest)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def nats_roots(cluster: LocalCluster) -> list[tuple[int, str]]:
    return [(pid, f"nats-server n{i + 1}") for i, pid in enumerate(cluster.pids()) if pid]


def snapshot(
    roots: list[tuple[int, str]], backends: dict[int, str] | None = None
) -> dict[int, procs.Proc]:
    """Each (pid, name) root and its descendants now, in the order of `roots` (the first
    one's row comes first in `procs.usage`)."""
    tree: dict[int, procs.Proc] = {}
    for pid, name in roots:
        for child, proc in procs.snapshot(pid, backends, root_name=name).items():
            tree.setdefault(child, proc)
    return tree


def sum_metrics(children: list[DaemonChild]) -> dict[str, float]:
    """The children's /metrics, each sample summed over them."""
    total: dict[str, float] = {}
    for child in children:
        for key, value in child.metrics().items():
            total[key] = total.get(key, 0.0) + value
    return total
