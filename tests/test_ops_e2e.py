"""The ops port under attack, the daemon a real process with a low descriptor limit.

Issue 22, item 20: connections that pipeline ``GET /metrics`` and never read their
answers used to take every descriptor of the daemon (new WebSocket clients and
/healthz refused) and, after the attacker left, minutes of CPU spent answering the dead
connections' queued requests. Here the same attack, scaled to ``LimitNOFILE=1024``:
more connections than the limit, each with a 4 KiB receive buffer, from 127.0.0.2
(127/8 is all loopback on Linux: another local client).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from .conftest import DaemonProcess, daemon_tables, query, toml_text

pytestmark = pytest.mark.e2e

NOFILE = 1024
ATTACKERS = NOFILE + 100  # connections: more than the daemon's descriptor limit
PIPELINED = 20
WINDOW_S = 8.0  # rows are counted over this long, without and with the attack
RATE_PER_S = 200


class LimitedDaemon(DaemonProcess):
    """The daemon as a child process whose RLIMIT_NOFILE is (NOFILE, NOFILE)."""

    def start(self) -> LimitedDaemon:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userstreamd", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)),
        )
        return self


def cpu_s(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM incoming_users")[0][0])


async def attack(port: int, held: list[trio.socket.SocketType]) -> None:
    """Open ATTACKERS connections, each sending PIPELINED requests and reading nothing."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * PIPELINED

    async def one() -> None:
        sock = trio.socket.socket()
        held.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await sock.bind(("127.0.0.2", 0))
            await sock.connect(("127.0.0.1", port))
            await sock.send(request)
        except (OSError, trio.ClosedResourceError):
            pass  # (refused or reset: the daemon's business)

    async with trio.open_nursery() as nursery:
        for _ in range(ATTACKERS):
            nursery.start_soon(one)


async def _cancellable(scope: trio.CancelScope, *args: Any) -> None:
    with scope:
        await args[0](*args[1:])


async def test_an_ops_port_attack_starves_neither_the_stream_nor_health(
    tmp_path: Path, dsn: str
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": RATE_PER_S, "seed": "ops"}
    tables["daemon"]["log_level"] = "info"
    config = tmp_path / "daemon.toml"
    config.write_text(toml_text(tables))
    daemon = LimitedDaemon(config, tmp_path / "daemon.log").start()
    try:
        await _attack_and_measure(daemon, dsn)
    finally:
        daemon.kill()


async def _attack_and_measure(daemon: LimitedDaemon, dsn: str) -> None:
    ready: dict[str, Any] = await trio.to_thread.run_sync(daemon.wait_for, "daemon.ready")
    pid = daemon.proc.pid
    http_port = int(ready["http_url"].rstrip("/").rsplit(":", 1)[1])
    seqs: list[int] = []
    health: list[int | str] = []
    fds: list[int] = []
    attacking = trio.Event()

    async def read_stream() -> None:
        async with open_websocket_url(ready["url"]) as ws:
            while True:
                message = json.loads(await ws.get_message())
                assert message["type"] in ("welcome", "user"), message
                if message["type"] == "user":
                    seqs.append(message["seq"])

    async def poll_health() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # (a new connection each time)
        async with httpx.AsyncClient(limits=limits, timeout=3) as client:  # (a probe's)
            await attacking.wait()
            while True:
                try:
                    health.append((await client.get(f"{ready['http_url']}healthz")).status_code)
                except httpx.HTTPError as exc:
                    health.append(type(exc).__name__)
                fds.append(len(os.listdir(f"/proc/{pid}/fd")))
                await trio.sleep(0.25)

    async def new_client_receives_a_user() -> bool:
        with trio.move_on_after(10):
            async with open_websocket_url(ready["url"]) as ws:
                while json.loads(await ws.get_message())["type"] != "user":
                    pass
                return True
        return False

    held: list[trio.socket.SocketType] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stream)
            nursery.start_soon(poll_health)
            await trio.sleep(2)  # (warm)
            rows0, cpu0 = rows(dsn), cpu_s(pid)
            await trio.sleep(WINDOW_S)
            rows1, cpu1 = rows(dsn), cpu_s(pid)
            attacking.set()
            attacker = trio.CancelScope()
            nursery.start_soon(_cancellable, attacker, attack, http_port, held)
            await trio.sleep(WINDOW_S / 2)
            newcomer = await new_client_receives_a_user()
            await trio.sleep(WINDOW_S / 2)
            rows2 = rows(dsn)
            attacker.cancel()
            for sock in held:  # the attacker leaves (unread answers: resets)
                sock.close()
            cpu2 = cpu_s(pid)
            await trio.sleep(5)
            cpu3 = cpu_s(pid)
            nursery.cancel_scope.cancel()
    assert daemon.stop() == 0
    baseline, attacked = rows1 - rows0, rows2 - rows1
    idle_cpu_per_s, after_cpu = (cpu1 - cpu0) / WINDOW_S, cpu3 - cpu2
    accept_failed = len(daemon.events("http.accept_failed"))
    print(
        f"rows in {WINDOW_S:.0f} s: {baseline} without the attack, {attacked} with it "
        f"({attacked / baseline:.0%}); daemon CPU {idle_cpu_per_s:.2f} s/s before, "
        f"{after_cpu:.2f} s in the 5 s after the attacker left; descriptors at most "
        f"{max(fds)} of {NOFILE}; /healthz polls {len(health)}; "
        f"http.accept_failed lines {accept_failed}"
    )
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # (none missing)
    assert health and set(health) == {200}, health
    assert newcomer, "a new WebSocket client got no user during the attack"
    assert max(fds) < NOFILE // 2  # (the ops port's budget: the rest is the data path's)
    assert attacked >= 0.75 * baseline  # (loose: CI machines are shared; printed above)
    assert after_cpu < idle_cpu_per_s * 5 + 1.0  # (back to idle: no dead peer answered)
