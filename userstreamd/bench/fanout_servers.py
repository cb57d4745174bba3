"""The servers ``bench fanout`` measures, each a `FanoutServer`: the daemon on either
topology (`LAUNCHERS`, by the bus's name: ``--bus``) and, with ``--compare``, the
reference servers (`ReferenceServer`, of `reference`).

- `DaemonServer` (embedded): the real daemon as configured by default but for its own
  state directory, ports 0, the synthetic source and room for N connections from one
  address; its consumers write the stream into its embedded PostgreSQL meanwhile. Its
  clients are held by its process and any fan-out workers.
- `NatsServers` (nats): a local NATS JetStream cluster (`cluster`: NODES nats-servers,
  the stream with REPLICAS copies), one producer (``run --role producer``, with the
  embedded PostgreSQL it keeps its stream record in) and BROADCASTERS broadcasters
  (``run --role broadcaster``, each on a port of its own, each mirroring the stream into
  its own hub, no fan-out workers). No consumer runs: the stream is only broadcast. The
  harness opens the clients round-robin over the broadcasters' URLs, so client k goes to
  broadcaster k mod BROADCASTERS; latency includes the trip through the stream.
- `ReferenceServer`: a reference as a child process; its stdin is its lifeline.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from .cluster import NODES, REPLICAS, StreamProbe, nats_roots, open_nats, role, wait_event
from .daemon_child import DaemonChild
from .display import Steps
from .harnesses import Lines, end_process

START_TIMEOUT_S = 60.0
CLIENTS_SPARE = 64  # connections allowed beyond N (the daemon's own, the live page)
BROADCAST_WORKER = "fanout-worker"  # the daemon's processes that serve clients, if any
BROADCASTERS = 2
CLIENTS_GAUGE = "userstreamd_websocket_clients"
NAME = f"userstreamd {__version__}"


class FanoutServer(Protocol):
    label: str  # its rows on the display
    name: str  # its row in the report ("server")
    urls: list[str]  # where the harness connects, round-robin

    def start(self, steps: Steps, rate_per_s: float) -> None: ...
    def roots(self) -> list[tuple[int, str]]: ...
    def serving(self, process: str) -> bool: ...
    def set_rate(self, rate_per_s: float) -> None: ...
    def connected(self) -> str: ...
    def figures(self, usage: list[dict[str, Any]]) -> dict[str, Any]: ...
    def stop(self) -> None: ...


class Topology(FanoutServer, Protocol):
    """The daemon on one bus: also how its report is printed."""

    compares: bool  # whether --compare runs beside it
    option: str  # what the headline adds after ``bench fanout``
    row_label: str | None  # its table row's first column (None: the report's "server")

    def __init__(self, folder: Path, clients: int) -> None: ...
    @staticmethod
    def spread(row: dict[str, Any]) -> str: ...
    @staticmethod
    def servers(row: dict[str, Any]) -> str: ...
    @staticmethod
    def lines(row: dict[str, Any]) -> list[str]: ...


def _room(clients: int) -> dict[str, int]:
    room = clients + CLIENTS_SPARE
    return {"max_connections": room, "max_connections_per_ip": room}


class DaemonServer:
    compares: bool = True
    option: str = ""
    row_label: str | None = None

    def __init__(self, folder: Path, clients: int) -> None:
        self.child = DaemonChild(folder, {"broadcaster": _room(clients)})
        self.label = self.name = NAME
        self.urls: list[str] = []

    def start(self, steps: Steps, rate_per_s: float) -> None:
        step = steps.step(f"{self.label}: start")
        self.child.tables["producer"]["rate_per_s"] = rate_per_s
        self.child.start()
        self.urls = [self.child.url]
        step.done(f"pid {self.child.pid}")

    def roots(self) -> list[tuple[int, str]]:
        return [(self.child.pid, "daemon")]

    def serving(self, process: str) -> bool:
        return process == "daemon" or process.startswith(BROADCAST_WORKER)

    def set_rate(self, rate_per_s: float) -> None:
        self.child.set_rate(rate_per_s)

    def connected(self) -> str:
        return ""

    def figures(self, usage: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self.child.close()

    @staticmethod
    def spread(row: dict[str, Any]) -> str:
        return ""

    @staticmethod
    def servers(row: dict[str, Any]) -> str:
        return ""

    @staticmethod
    def lines(row: dict[str, Any]) -> list[str]:
        return []


class NatsServers:
    compares: bool = False
    option: str = " --bus nats"
    row_label: str | None = "userstreamd (nats)"

    def __init__(self, folder: Path, clients: int) -> None:
        self.folder, self.clients = folder, clients
        self.label = NAME
        self.name = f"{NAME} (nats, {BROADCASTERS} broadcasters)"
        self.urls: list[str] = []
        self.stack = contextlib.ExitStack()
        self.by_broadcaster: list[int] = []
        self.broadcaster: dict[str, Any] = {}  # more of the broadcasters' [broadcaster] table

    def start(self, steps: Steps, rate_per_s: float) -> None:
        stack, base = self.stack, self.folder
        step = steps.step(f"start {NODES} nats-servers")
        cluster = stack.enter_context(open_nats(base / "nats"))
        step.done(", ".join(cluster.urls))
        self.probe = stack.enter_context(StreamProbe(cluster.urls))
        step = steps.step(f"{self.label}: start a producer and {BROADCASTERS} broadcasters")
        tables = {"producer": {"rate_per_s": rate_per_s}}
        self.producer = role(base / "producer", "producer", cluster.urls, tables)
        limits = {**_room(self.clients), "workers": 0, **self.broadcaster}
        self.broadcasters = [
            role(base / f"broadcaster-{i}", "broadcaster", cluster.urls, {"broadcaster": limits})
            for i in range(1, BROADCASTERS + 1)
        ]
        children: list[DaemonChild] = [self.producer, *self.broadcasters]
        for child in children:
            stack.callback(child.close)
            child.spawn()
        for child in children:
            child.wait_ready()
        wait_event(self.producer, "producer.lease_acquired", START_TIMEOUT_S)
        self.probe.wait_beyond(0, START_TIMEOUT_S, "the producer")
        self.urls = [b.url for b in self.broadcasters]
        self._roots = [(self.producer.pid, "producer")]
        self._roots += [(b.pid, f"broadcaster {i}") for i, b in enumerate(self.broadcasters, 1)]
        self._roots += nats_roots(cluster)
        step.done(", ".join(f"pid {c.pid}" for c in children))

    def roots(self) -> list[tuple[int, str]]:
        return self._roots

    def serving(self, process: str) -> bool:
        """A broadcaster (run here without fan-out workers: ``broadcaster.workers = 0``)."""
        return process.startswith("broadcaster ")

    def set_rate(self, rate_per_s: float) -> None:
        self.producer.set_rate(rate_per_s)

    def connected(self) -> str:
        self.by_broadcaster = [int(b.metrics().get(CLIENTS_GAUGE, 0.0)) for b in self.broadcasters]
        return f" ({'/'.join(map(str, self.by_broadcaster))})"

    def figures(self, usage: list[dict[str, Any]]) -> dict[str, Any]:
        def cpu(process: str) -> float:
            return round(sum(r["cpu_pct"] for r in usage if r["process"] == process), 1)

        return {
            "broadcasters": BROADCASTERS,
            "clients_by_broadcaster": self.by_broadcaster,
            "broadcaster_cpu_pct": [cpu(f"broadcaster {i}") for i in range(1, BROADCASTERS + 1)],
            "producer_cpu_pct": cpu("producer"),
            "nats_server_cpu_pct": [cpu(f"nats-server n{i + 1}") for i in range(NODES)],
            "nats_servers": NODES,
            "replicas": REPLICAS,
            "stream_last_seq": self.probe.last_seq(),
        }

    def stop(self) -> None:
        self.stack.close()

    @staticmethod
    def spread(row: dict[str, Any]) -> str:
        split = "/".join(str(n) for n in row["clients_by_broadcaster"])
        return f" over {row['broadcasters']} broadcaster processes ({split})"

    @staticmethod
    def servers(row: dict[str, Any]) -> str:
        return (
            f"{row['nats_servers']} nats-servers (stream R{row['replicas']}), 1 producer process; "
        )

    @staticmethod
    def lines(row: dict[str, Any]) -> list[str]:
        each = ", ".join(
            f"broadcaster {i} {pct:.0f}%" for i, pct in enumerate(row["broadcaster_cpu_pct"], 1)
        )
        servers = ", ".join(
            f"n{i} {pct:.0f}%" for i, pct in enumerate(row["nats_server_cpu_pct"], 1)
        )
        return [
            f"  CPU (of one core): {each}; producer {row['producer_cpu_pct']:.0f}%; "
            f"nats-servers {servers}; harness {row['harness_cpu_pct']:.0f}%",
            f"  cut off: {row['slow_closes']} slow closes, {row['dropped']} dropped; "
            f"{row['connected_at_end']} of {row['clients']} clients connected at the end",
        ]


LAUNCHERS: dict[str, type[Topology]] = {"embedded": DaemonServer, "nats": NatsServers}


class ReferenceServer:
    """A reference server as a child process; its stdin is its lifeline."""

    def __init__(self, label: str, command: list[str], env: dict[str, str], pool: Path) -> None:
        self.label = self.name = label
        self.command, self.env, self.pool = command, env, pool
        self.urls: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, steps: Steps, rate_per_s: float) -> None:
        step = steps.step(f"{self.label}: start")
        self.proc = subprocess.Popen(
            [*self.command, str(self.pool), str(rate_per_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # (read only if it fails: it writes nothing otherwise)
            env=self.env,
            start_new_session=True,
        )
        line = Lines(self.proc).next(START_TIMEOUT_S, self.label)
        self.urls = [f"ws://127.0.0.1:{int(line.split()[1])}/"]
        self.pid = self.proc.pid
        step.done(f"pid {self.pid}")

    def roots(self) -> list[tuple[int, str]]:
        return [(self.pid, "server")]

    def serving(self, process: str) -> bool:
        return process == "server"

    def set_rate(self, rate_per_s: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"rate {rate_per_s}\n".encode())
        self.proc.stdin.flush()

    def connected(self) -> str:
        return ""

    def figures(self, usage: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc)
