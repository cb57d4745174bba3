"""A fan-out worker's parts in one process: the mirror fed from a real daemon-side
broadcaster over its private socket, and the relay of group members."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from userstreamd.config import BroadcasterConfig
from userstreamd.serve.broadcaster import OPEN_POLICY, Broadcaster
from userstreamd.serve.fanout import Mirror
from userstreamd.stream.client import open_ws
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import CLOSE_GOING_AWAY

from .helpers import eventually

SETTINGS = BroadcasterConfig(client_lag_max=1000, coalesce_ms=0)


def _publish(hub: Hub, n: int) -> None:
    for _ in range(n):
        hub.publish_nowait({"n": hub.last_seq + 1}, "synthetic", hub.last_seq + 1)


async def _daemon_side(nursery: trio.Nursery, hub: Hub, path: Path) -> Broadcaster:
    broadcaster = Broadcaster(hub, SETTINGS, OPEN_POLICY)
    await nursery.start(broadcaster.run, "127.0.0.1", 0, path)
    return broadcaster


async def _worker_side(nursery: trio.Nursery, mirror: Mirror, upstream: str) -> str:
    hub = await nursery.start(mirror.run)
    worker = Broadcaster(hub, SETTINGS, OPEN_POLICY, relay=upstream)
    port = await nursery.start(worker.run, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{port}/"


async def _seqs(ws: Any, until: int) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < until:
        message = json.loads(await ws.get_message())
        assert message["type"] == "user", message
        seqs.append(message["seq"])
    return seqs


async def test_a_mirror_starts_with_history_and_survives_a_lost_feed(tmp_path: Path) -> None:
    """It serves nobody before it holds the history (half of client_lag_max): a client
    resuming there gets what it missed, no gap. The daemon's broadcaster restarting
    (the feed lost) costs the clients nothing; the daemon's end is theirs, with 1001."""
    hub, path = Hub("e", client_lag_max=1000), tmp_path / "private.sock"
    _publish(hub, 3000)
    mirror = Mirror(f"ws+unix://{path}", SETTINGS)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as nursery_inner:
                await _daemon_side(nursery_inner, hub, path)
                url = await _worker_side(nursery, mirror, f"ws+unix://{path}")
                assert mirror.hub is not None and mirror.hub.last_seq == 3000
                async with open_ws(f"{url}?epoch=e&since=2700") as ws:
                    assert json.loads(await ws.get_message())["seq"] == 3000
                    assert await _seqs(ws, 3000) == list(range(2701, 3001))
                    nursery_inner.cancel_scope.cancel()  # the daemon's broadcaster stops
            _publish(hub, 100)  # meanwhile
            async with trio.open_nursery() as nursery_inner:
                await _daemon_side(nursery_inner, hub, path)  # and is back
                async with open_ws(f"{url}?epoch=e&since=3000") as ws:
                    await ws.get_message()
                    _publish(hub, 100)
                    assert await _seqs(ws, 3200) == list(range(3001, 3201))
                    assert mirror.reconnects >= 1
                    hub.close()  # the daemon stops: the stream ends
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == CLOSE_GOING_AWAY
                    nursery_inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert mirror.hub.closed


async def test_relayed_members_reach_the_daemon_but_cannot_pose_as_a_worker(
    tmp_path: Path,
) -> None:
    """A group member on the worker: its acks reach the daemon's hub; a fanout report it
    sends goes no further than the worker (a bad frame there); when the daemon goes
    away, the member is closed with 1011, not a normal closure."""
    hub, path = Hub("e"), tmp_path / "private.sock"
    hub.declare_group("audit")
    upstream = f"ws+unix://{path}"
    mirror = Mirror(upstream, SETTINGS)
    report = '{"type":"fanout","worker":1,"pid":1,"clients":1000000,"sent":9,"slow_closes":9}'
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as daemon_nursery:
                daemon = await _daemon_side(daemon_nursery, hub, path)
                url = await _worker_side(nursery, mirror, upstream)
                async with open_ws(f"{url}?group=audit&batch=10") as ws:
                    assert json.loads(await ws.get_message())["group"] == "audit"
                    _publish(hub, 30)
                    got: list[int] = []
                    while len(got) < 30:
                        message = json.loads(await ws.get_message())
                        items = message["items"] if message["type"] == "users" else [message]
                        got += [m["seq"] for m in items if m["type"] == "user"]
                    await ws.send_message(report)
                    await ws.send_message(json.dumps({"type": "ack", "seqs": got}))
                    await eventually(lambda: hub.watermark("audit")[0] == 30)
                    assert mirror.hub is not None and mirror.hub.bad_frames == 1
                    assert daemon.fanout == {}
                    daemon_nursery.cancel_scope.cancel()  # the daemon goes away
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await ws.get_message()
                    assert closed.value.reason.code == 1011
            nursery.cancel_scope.cancel()
    assert got == list(range(1, 31))


async def test_garbage_floods_silence_and_early_hangups_on_a_worker_hurt_nobody(
    tmp_path: Path,
) -> None:
    """On a worker's port: bytes that are not HTTP, a connection that says nothing, a
    member that hangs up at once, a member sending garbage (relayed: the daemon counts
    it), a member flooding (closed by the worker with 1008). A plain client on the same
    worker gets every user, in order, meanwhile; the daemon keeps no stray member."""
    hub, path = Hub("e"), tmp_path / "private.sock"
    hub.declare_group("audit")
    upstream = f"ws+unix://{path}"
    settings = BroadcasterConfig(
        client_lag_max=1000, coalesce_ms=0, max_messages_per_s=20, handshake_timeout_s=1
    )
    mirror = Mirror(upstream, settings)
    seen: list[int] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(Broadcaster(hub, settings, OPEN_POLICY).run, "127.0.0.1", 0, path)
            worker_hub = await nursery.start(mirror.run)
            worker = Broadcaster(worker_hub, settings, OPEN_POLICY, relay=upstream)
            port = await nursery.start(worker.run, "127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/"

            async def plain() -> None:
                async with open_ws(url) as ws:
                    await ws.get_message()
                    seen.extend(await _seqs(ws, 400))

            nursery.start_soon(plain)
            await eventually(lambda: worker_hub.clients == 1)

            async def publish() -> None:
                for _ in range(40):
                    _publish(hub, 10)
                    await trio.sleep(0.02)

            nursery.start_soon(publish)
            garbage = await trio.open_tcp_stream("127.0.0.1", port)
            await garbage.send_all(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
            silent = await trio.open_tcp_stream("127.0.0.1", port)  # says nothing at all
            async with open_ws(f"{url}?group=audit"):
                pass  # hangs up right after the handshake
            async with open_ws(f"{url}?group=audit") as noisy:
                await noisy.get_message()
                await noisy.send_message("not json")
                await noisy.send_message(b"\x00\x01 binary")
                await eventually(lambda: hub.bad_frames == 2)
            async with open_ws(f"{url}?group=audit") as flooder:
                await flooder.get_message()
                with pytest.raises(ConnectionClosed) as flooded:
                    for _ in range(500):
                        await flooder.send_message('{"type":"ack","seqs":[]}')
                        await trio.lowlevel.checkpoint()
                    while True:
                        await flooder.get_message()
                assert flooded.value.reason.code == 1008
            assert await silent.receive_some(100) == b""  # closed at the handshake timeout
            await eventually(lambda: len(seen) >= 400)
            await eventually(lambda: hub.statistics().members == 0)
            for stream in (garbage, silent):
                await stream.aclose()
            nursery.cancel_scope.cancel()
    assert seen == list(range(1, 401))
    assert worker.edge.statistics().handler_errors == 0


def test_a_mirror_keeps_a_one_seq_hole_and_starts_over_after_a_real_gap() -> None:
    """A NATS broadcaster's feed carries a hole (a gap over one seq: a message that was
    no user) in its place; a gap over several seqs (the feed fell behind) starts the
    worker's buffer over at the next user, as before."""
    hub = Hub("e", first_seq=1, buffer_messages=100, buffer_bytes=2**20, client_lag_max=50)

    def user(seq: int) -> str:
        return json.dumps(
            {"type": "user", "epoch": "e", "seq": seq, "position": seq, "source": "synthetic"}
        )

    def gap(first: int, last: int) -> str:
        return json.dumps(
            {"type": "gap", "epoch": "e", "from_seq": first, "to_seq": last, "reason": "r"}
        )

    for frame in [user(1), gap(2, 2), user(3)]:
        Mirror._append(frame, hub)
    reader = hub.subscribe("test", since=("e", 0))
    assert [json.loads(f)["type"] for f in hub.next_frames_nowait(reader, 10) or []] == [
        "user",
        "gap",
        "user",
    ]
    assert hub.published == {"synthetic": 2}
    for frame in [gap(4, 9), user(10)]:
        Mirror._append(frame, hub)
    assert (hub.last_seq, hub.buffered) == (10, 1)
