"""``bench replays``: many clients resuming from far back at once, against the live stream.

The real daemon (embedded bus, synthetic source) is started as a child process and fills
its stream with `back` + 10,000 users at 20,000 users/s, then is slowed to 1,000 users/s
(SIGHUP, `producer.rate_per_s`). Two windows of `window_s` seconds follow:

1. **Without replays:** `live` clients at the live end measure the latency of each user
   (produced_at -> received); the consumers' commit rate (``/status.json``'s committed
   users) and the daemon's RSS are read.
2. **With `replays` clients resuming `back` users behind the live end at once**, in a
   process of their own (raw sockets that read and discard, so that their cost is not
   the live clients'): the same figures, from ``CONNECT_S`` after they connected (500
   handshakes at once are a burst of their own, whatever the clients ask for), and the
   users the daemon replayed from storage and from its buffer (its metrics).

The history keys (``[history]``) are the defaults unless given. Bounded: everything on
127.0.0.1, `replays` connections, two windows.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from ..config import toml_text
from ..stream.protocol import decode_timed
from .daemon_child import BenchError

FILL_RATE = 20_000.0
LIVE_RATE = 1_000.0
SETTLE_S = 20.0  # after the slow-down (the fill's commits and vacuum done)
CONNECT_S = 3.0  # after the replaying clients connect, before a window begins


def _config(state: Path, ws: int, http: int, rate: float, history: dict[str, Any]) -> str:
    return toml_text(
        {
            "daemon": {"state_dir": str(state), "log_level": "warning"},
            "producer": {"source": "synthetic", "rate_per_s": rate},
            "broadcaster": {
                "port": ws,
                "buffer_messages": 20_000,  # (most of a replay from storage)
                "max_connections_per_ip": 4096,
            },
            "http": {"port": http},
            "history": history,
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


async def _live(url: str, latencies: list[float]) -> None:
    async with open_websocket_url(url, message_queue_size=100_000) as ws:
        await ws.get_message()  # welcome
        while True:
            frame = decode_timed(await ws.get_message())
            if frame.type == "user" and frame.produced_at is not None:
                latencies.append((datetime.now(UTC) - frame.produced_at).total_seconds())


async def _drain(port: int, epoch: str, since: int) -> None:
    """One replaying client: the handshake, then every byte read and dropped."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await sock.send(
        (
            f"GET /?epoch={epoch}&since={since}&batch=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    with sock:
        while await sock.recv(1 << 20):
            pass


async def _drainers(port: int, epoch: str, since: int, count: int) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(_drain, port, epoch, since)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class _Daemon:
    def __init__(self, root: Path, history: dict[str, Any]) -> None:
        self.ws, self.http = _free_port(), _free_port()
        self.path, self.state, self.history = root / "config.toml", root / "state", history
        self.path.write_text(_config(self.state, self.ws, self.http, FILL_RATE, history))
        self.log = (root / "daemon.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userstreamd", "--config", str(self.path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(
            f"http://127.0.0.1:{self.http}/status.json", timeout=5
        ).json()
        return answer

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http}/metrics", timeout=5).text

    def slow_down(self) -> None:
        self.path.write_text(_config(self.state, self.ws, self.http, LIVE_RATE, self.history))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _window(
    daemon: _Daemon, live: int, window_s: float, replays: int, back: int
) -> dict[str, Any]:
    latencies: list[float] = []
    stream = (await trio.to_thread.run_sync(daemon.status))["stream"]
    drainers = None
    rss = 0
    async with trio.open_nursery() as nursery:
        for _ in range(live):
            nursery.start_soon(_live, f"ws://127.0.0.1:{daemon.ws}/", latencies)
        await trio.sleep(3)
        latencies.clear()
        if replays:
            since = max(
                0, (await trio.to_thread.run_sync(daemon.status))["stream"]["last_seq"] - back
            )
            drainers = await trio.to_thread.run_sync(
                subprocess.Popen,
                [
                    sys.executable,
                    "-m",
                    __name__,
                    str(daemon.ws),
                    stream["epoch"],
                    str(since),
                    str(replays),
                ],
            )
            await trio.sleep(CONNECT_S)  # (their handshakes: a burst of its own)
            latencies.clear()
        before = (await trio.to_thread.run_sync(daemon.status))["stream"]["committed"]
        started = time.monotonic()
        while time.monotonic() - started < window_s:
            await trio.sleep(0.5)
            rss = max(rss, _rss_kib(daemon.proc.pid))
        committed = (await trio.to_thread.run_sync(daemon.status))["stream"]["committed"] - before
        elapsed = time.monotonic() - started
        metrics = await trio.to_thread.run_sync(daemon.metrics)
        nursery.cancel_scope.cancel()
    if drainers is not None:
        drainers.terminate()  # (SIGTERM: gone, without a word)
        drainers.wait(30)
    latencies.sort()
    if not latencies:
        raise BenchError("the live clients received nothing")

    def ms(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)

    return {
        "replays": replays,
        "commit_rate_per_s": round(committed / elapsed, 1),
        "live_p50_ms": ms(0.5),
        "live_p99_ms": ms(0.99),
        "live_samples": len(latencies),
        "daemon_rss_max_mib": round(rss / 1024, 1),
        "replayed_from_storage": int(
            _metric(metrics, 'userstreamd_history_users_replayed_total{source="stored"}')
        ),
        "replaying": int(_metric(metrics, "userstreamd_history_replays_active")),
        "waiting": int(_metric(metrics, "userstreamd_history_replays_waiting")),
    }


def run_replay_load(
    replays: int = 500,
    back: int = 100_000,
    window_s: float = 30.0,
    live: int = 2,
    history: dict[str, Any] | None = None,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """The two windows' figures (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="userstreamd-replays-") as root:
        daemon = _Daemon(Path(root), history or {})
        try:
            deadline = time.monotonic() + 120 + back / 2000
            while True:
                time.sleep(1)
                if daemon.proc.poll() is not None:
                    raise BenchError(f"the daemon exited with {daemon.proc.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError("the stream was not filled in time")
                try:
                    if daemon.status()["stream"]["committed_through"] >= back + 10_000:
                        break
                except httpx.HTTPError:
                    continue
            daemon.slow_down()
            time.sleep(settle_s)
            without = trio.run(_window, daemon, live, window_s, 0, back)
            with_replays = trio.run(_window, daemon, live, window_s, replays, back)
        finally:
            daemon.stop()
    return {
        "back": back,
        "window_s": window_s,
        "live_rate_per_s": LIVE_RATE,
        "history": history or "defaults",
        "without": without,
        "with": with_replays,
    }


def print_replay_load(report: dict[str, Any]) -> None:
    print(
        f"{report['with']['replays']} clients resuming {report['back']:,} users back at "
        f"once, {report['window_s']:g} s windows, live stream {report['live_rate_per_s']:g}"
        f" users/s (history: {report['history']})"
    )
    head = ("commits/s", "live p50", "live p99", "RSS MiB", "from storage")
    print(f"{'':>16} {head[0]:>10} {head[1]:>9} {head[2]:>9} {head[3]:>8} {head[4]:>13}")
    for name in ("without", "with"):
        r = report[name]
        print(
            f"{name + ' replays':>16} {r['commit_rate_per_s']:>10,.0f}"
            f" {r['live_p50_ms']:>7.1f}ms {r['live_p99_ms']:>7.1f}ms"
            f" {r['daemon_rss_max_mib']:>8.0f} {r['replayed_from_storage']:>13,}"
        )


if __name__ == "__main__":  # (the replaying clients' own process, until SIGTERM)
    trio.run(_drainers, int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
