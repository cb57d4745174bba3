"""LocalCluster runs a real JetStream cluster: an R3 stream takes writes and serves reads,
survives the loss of its leader's node, and the restarted node serves it again; stop
leaves no process and no open port behind. Checked with a real nats-py client."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError, ServerError, ServiceUnavailableError

from userstreamd.testing.nats import LocalCluster

pytestmark = pytest.mark.cluster

STREAM = "USERS"
GUARD_S = 25.0  # each test's client work, bounded; a failover takes 4-9 s (raft election)


async def connect(urls: list[str]) -> nats.NATS:
    return await nats.connect(servers=urls, connect_timeout=2, reconnect_time_wait=0.2)


async def add_stream(js: JetStreamContext, replicas: int) -> None:
    await js.add_stream(StreamConfig(name=STREAM, subjects=["users.>"], num_replicas=replicas))


async def publish(js: JetStreamContext, n: int, deadline: float) -> int:
    """Publish message `n` (idempotent by Msg-Id), retrying while the stream has no
    leader; returns its sequence number."""
    while True:
        try:
            ack = await js.publish(
                "users.new", f"user {n}".encode(), timeout=1, headers={"Nats-Msg-Id": f"m:{n}"}
            )
            return ack.seq
        except (NoStreamResponseError, NatsTimeoutError, ServiceUnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def read_all(js: JetStreamContext, count: int) -> list[bytes]:
    return [(await js.get_msg(STREAM, seq)).data or b"" for seq in range(1, count + 1)]


def expected(count: int) -> list[bytes]:
    return [f"user {n}".encode() for n in range(1, count + 1)]


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_r3_stream_takes_writes_and_stop_leaves_nothing(tmp_path: Path) -> None:
    async def scenario(urls: list[str]) -> tuple[list[bytes], int]:
        async with asyncio.timeout(GUARD_S):
            async with await connect(urls) as nc:
                js = nc.jetstream()
                await add_stream(js, replicas=3)
                seqs = [await publish(js, n, time.monotonic() + 5) for n in range(1, 6)]
                assert seqs == [1, 2, 3, 4, 5]
                info = await js.stream_info(STREAM)
            assert info.cluster is not None
            async with await connect(urls) as nc:  # a second client reads what the first wrote
                return await read_all(nc.jetstream(), 5), len(info.cluster.replicas or [])

    cluster = LocalCluster(tmp_path)
    with cluster:
        pids = cluster.pids()
        assert all(pids)
        data, followers = asyncio.run(scenario(cluster.urls))
        assert data == expected(5)
        assert followers == 2  # the leader plus two replicas
    assert cluster.pids() == [None, None, None]
    assert not any(alive(pid) for pid in pids if pid)
    assert not any(port_open(url) for url in cluster.urls + cluster.monitor_urls)
    cluster.stop()  # idempotent


def test_stream_survives_its_leaders_node_and_the_node_comes_back(tmp_path: Path) -> None:
    async def before_kill(urls: list[str]) -> int:
        """Three messages in an R3 stream; the index of the node leading it."""
        async with asyncio.timeout(GUARD_S), await connect(urls) as nc:
            js = nc.jetstream()
            await add_stream(js, replicas=3)
            for n in range(1, 4):
                await publish(js, n, time.monotonic() + 5)
            info = await js.stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader
        return int(info.cluster.leader.removeprefix("n")) - 1

    async def while_down(others: list[str]) -> list[bytes]:
        async with asyncio.timeout(GUARD_S), await connect(others) as nc:
            js = nc.jetstream()
            seqs = [await publish(js, n, time.monotonic() + 20) for n in range(4, 7)]
            assert seqs == [4, 5, 6]
            return await read_all(js, 6)

    async def from_only(url: str) -> tuple[list[bytes], int]:
        async with asyncio.timeout(GUARD_S), await connect([url]) as nc:
            assert nc.connected_url is not None
            assert nc.connected_url.port == urlsplit(url).port
            js = nc.jetstream()
            data = await read_all(js, 6)
            return data, (await js.stream_info(STREAM)).state.messages

    with LocalCluster(tmp_path) as cluster:
        urls = cluster.urls
        leader = asyncio.run(before_kill(urls))
        cluster.kill(leader)
        assert cluster.pids()[leader] is None
        others = [url for i, url in enumerate(urls) if i != leader]
        assert asyncio.run(while_down(others)) == expected(6)
        cluster.restart(leader, timeout_s=10)
        assert cluster.pids()[leader] is not None
        assert asyncio.run(from_only(urls[leader])) == (expected(6), 6)


def test_one_node_is_a_plain_jetstream_server(tmp_path: Path) -> None:
    async def scenario(url: str) -> list[bytes]:
        async with asyncio.timeout(GUARD_S), await connect([url]) as nc:
            js = nc.jetstream()
            with pytest.raises(ServerError) as refused:  # a 500, not a 400
                await add_stream(js, replicas=3)
            assert refused.value.err_code == 10074  # replicas > 1 not supported
            await add_stream(js, replicas=1)
            await publish(js, 1, time.monotonic() + 5)
            return await read_all(js, 1)

    with LocalCluster(tmp_path, nodes=1) as cluster:
        assert len(cluster.urls) == 1
        assert asyncio.run(scenario(cluster.urls[0])) == expected(1)
