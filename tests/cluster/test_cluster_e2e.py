"""The acceptance run of the NATS bus: every role twice or more, as separate processes,
on a real 3-node JetStream cluster, with kill -9 of each kind of part while 2,000 users
a second stream; then the table holds exactly positions 1..P, and a plain client that
was on the killed broadcaster has every user or was told of the gap."""

from __future__ import annotations

import asyncio
import itertools
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import nats
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.conftest import DaemonProcess, query
from tests.helpers import eventually
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.stream.client import open_ws
from userstreamd.stream.protocol import Gap, UserMessage, Users, Welcome, decode_server
from userstreamd.testing.nats import LocalCluster

pytestmark = pytest.mark.cluster

RATE = 2000
RUN_S = 30.0


def role_tables(tmp_path: Path, dsn: str, urls: list[str], name: str) -> dict[str, Any]:
    return {
        "daemon": {
            "state_dir": str(tmp_path / name),
            "log_format": "json",
            "stats_interval_s": 5.0,
        },
        "producer": {"source": "synthetic", "rate_per_s": RATE},
        "broadcaster": {"port": 0},
        "http": {"port": 0},
        "consumers": {"count": 1},
        "database": {"dsn": dsn},
        "cluster": {"bus": "nats", "servers": urls, "lease_ttl_s": 2.0, "ack_wait_s": 5.0},
    }


def last_seq(urls: list[str], stream: str = "USERSTREAM") -> int:
    async def ask() -> int:
        nc = await nats.connect(servers=urls)
        try:
            info = await nc.jetstream().stream_info(stream)
            return int(info.state.last_seq)
        finally:
            await nc.close()

    return asyncio.run(ask())


class Watcher:
    """A plain WebSocket client that resumes on another broadcaster when its own dies;
    it records every seq it got and every gap it was told of."""

    def __init__(self) -> None:
        self.epoch = ""
        self.seqs: list[int] = []
        self.gaps: list[tuple[int | None, int]] = []
        self.connections: list[str] = []

    def take(self, frame: str | bytes) -> None:
        message = decode_server(frame)
        if isinstance(message, Welcome):
            self.epoch = self.epoch or message.epoch
        elif isinstance(message, UserMessage):
            self.seqs.append(message.seq)
        elif isinstance(message, Users):
            self.seqs.extend(m.seq for m in message.items)
        elif isinstance(message, Gap):
            self.gaps.append((message.from_seq, message.to_seq))

    async def follow(self, urls: list[str]) -> None:
        """Read from the first broadcaster; whenever the connection ends, resume on the
        next one that answers (round robin), until cancelled."""
        for url in itertools.cycle(urls):
            query = {"epoch": self.epoch, "since": self.seqs[-1]} if self.seqs else {}
            try:
                async with open_ws(f"{url}?{urlencode(query)}" if query else url) as ws:
                    self.connections.append(url)
                    while True:
                        self.take(await ws.get_message())
            except (ConnectionClosed, HandshakeError, OSError):
                await trio.sleep(0.05)

    def untold_gaps(self) -> list[tuple[int, int]]:
        """(after, next) for each jump in seq that no gap message covered (a gap up to
        ``to_seq`` is followed by seq to_seq + 1)."""
        told = {to_seq for _, to_seq in self.gaps}
        return [
            (a, b)
            for a, b in zip(self.seqs, self.seqs[1:], strict=False)
            if b != a + 1 and b - 1 not in told
        ]


def port_of(daemon: DaemonProcess) -> int:
    return int(daemon.wait_for("broadcaster.listening", 60)["port"])


def holder_pid(daemon: DaemonProcess) -> int | None:
    acquired = daemon.events("producer.lease_acquired")
    return int(acquired[-1]["holder"].rsplit(":", 1)[1]) if acquired else None


async def test_every_role_survives_kill_9_and_the_table_holds_exactly_positions_1_to_p(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    cluster = LocalCluster(tmp_path / "nats", 3)
    await trio.to_thread.run_sync(cluster.start)
    try:
        urls = cluster.urls

        def start(name: str, role: str) -> DaemonProcess:
            tables = role_tables(tmp_path, dsn, urls, name)
            return daemon_factory(tables, name, args=["run", "--role", role])

        consumers = [start(f"consumer-{i}", "consumer") for i in (1, 2, 3)]
        broadcasters = [start(f"broadcaster-{i}", "broadcaster") for i in (1, 2)]
        producers = [start(f"producer-{i}", "producer") for i in (1, 2)]
        for daemon in [*consumers, *broadcasters, *producers]:
            await trio.to_thread.run_sync(daemon.wait_for, "daemon.ready", 60)
        ws_urls = [f"ws://127.0.0.1:{port_of(b)}/" for b in broadcasters]

        async def lease_holder() -> DaemonProcess:
            while True:
                for p in producers:
                    if p.proc.poll() is None and holder_pid(p) == p.proc.pid:
                        return p
                await trio.sleep(0.05)

        watcher = Watcher()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.follow, ws_urls)
            with trio.fail_after(30):
                first = await lease_holder()
            await trio.sleep(RUN_S / 6)
            first.kill()  # kill -9 the producer holding the lease
            await trio.sleep(RUN_S / 6)
            cluster.kill(0)  # one NATS node
            await trio.sleep(RUN_S / 6)
            broadcasters[0].kill()  # the watcher's broadcaster
            await trio.sleep(RUN_S / 6)
            consumers[0].kill()
            await trio.sleep(RUN_S / 3)
            second = next(p for p in producers if p is not first)
            assert holder_pid(second) == second.proc.pid, "the standby never took the lease"
            assert second.stop(signal.SIGTERM) == 0
            p = await trio.to_thread.run_sync(last_seq, urls[1:])
            await eventually(lambda: bool(watcher.seqs) and watcher.seqs[-1] >= p, 60)
            nursery.cancel_scope.cancel()

        assert p > 1000, f"only {p} users were streamed"
        assert watcher.connections[0] == ws_urls[0]
        assert watcher.connections[-1] == ws_urls[1], "the watcher never moved to the other one"
        assert watcher.untold_gaps() == []
        assert watcher.seqs[-1] == p

        def committed() -> int:
            return int(query(dsn, "SELECT count(*) FROM incoming_users")[0][0])

        await eventually(lambda: committed() >= p, 60)
        rows = query(dsn, "SELECT seq, epoch, uuid::text FROM incoming_users ORDER BY seq")
        assert [seq for seq, _, _ in rows] == list(range(1, p + 1))
        assert {epoch for _, epoch, _ in rows} == {watcher.epoch}
        # The users of positions 1..P, each once: the synthetic source makes the same user
        # for the same (seed, position), and the seed is the stream's epoch.
        expected = [synthetic_user(watcher.epoch, seq)["login"]["uuid"] for seq in range(1, p + 1)]
        assert [uuid for _, _, uuid in rows] == expected
    finally:
        await trio.to_thread.run_sync(cluster.stop)
