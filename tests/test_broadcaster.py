"""Real WebSocket clients on 127.0.0.1 against the broadcaster."""

from __future__ import annotations

import contextlib
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from userstreamd.config import BroadcasterConfig
from userstreamd.produce.producer import Producer
from userstreamd.serve.broadcaster import OPEN_POLICY, Broadcaster, run_broadcaster
from userstreamd.sources.synthetic import SyntheticSource, synthetic_user
from userstreamd.stream.client import open_ws
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import CLOSE_GOING_AWAY, CLOSE_RATE, CLOSE_SLOW

from .helpers import eventually


async def _start(nursery: trio.Nursery, hub: Hub, **settings: Any) -> str:
    port = await nursery.start(run_broadcaster, hub, "127.0.0.1", 0, BroadcasterConfig(**settings))
    return f"ws://127.0.0.1:{port}/"


async def _receive(ws: Any) -> dict[str, Any]:
    return json.loads(await ws.get_message())


def _publish(hub: Hub, positions: range, seed: str = "s") -> None:
    for p in positions:
        hub.publish_nowait(synthetic_user(seed, p), "synthetic", p)


async def test_welcome_then_consecutive_users_and_two_clients_see_the_same() -> None:
    hub = Hub("epoch-1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            _publish(hub, range(1, 2))  # before anyone listens
            async with open_ws(url) as a, open_ws(url) as b:
                welcome_a, welcome_b = await _receive(a), await _receive(b)
                assert welcome_a["type"] == welcome_b["type"] == "welcome"
                assert welcome_a["epoch"] == "epoch-1" and welcome_a["seq"] == 1
                assert welcome_b["clients"] == 2
                _publish(hub, range(2, 12))
                got_a = [await _receive(a) for _ in range(10)]
                got_b = [await _receive(b) for _ in range(10)]
            nursery.cancel_scope.cancel()
    assert [m["seq"] for m in got_a] == list(range(2, 12))
    assert got_a == got_b
    assert [m["user"] for m in got_a] == [synthetic_user("s", p) for p in range(2, 12)]
    assert all(
        m["type"] == "user"
        and m["source"] == "synthetic"
        and m["epoch"] == "epoch-1"
        and m["produced_at"].endswith("Z")
        for m in got_a
    )


async def test_group_acks_move_the_watermark_and_bad_frames_are_counted() -> None:
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url + "?group=db") as member, open_ws(url) as plain:
                assert (await _receive(member))["group"] == "db"
                await _receive(plain)
                _publish(hub, range(1, 4))
                seqs = [(await _receive(member))["seq"] for _ in range(3)]
                for bad in ["not json", '{"type": "launch"}', '{"type": "ack", "seqs": [-1]}']:
                    await member.send_message(bad)
                await member.send_message(b"\x00binary")
                await plain.send_message('{"type": "ack", "seqs": [1]}')  # not a member
                await member.send_message(json.dumps({"type": "ack", "seqs": seqs}))
                checkpoint = await _receive(member)
                assert checkpoint == {
                    "type": "checkpoint",
                    "group": "db",
                    "epoch": "e",
                    "seq": 3,
                    "position": 3,
                }
                assert hub.bad_frames == 5
                _publish(hub, range(4, 5))
                assert (await _receive(member))["seq"] == 4  # still served
            nursery.cancel_scope.cancel()


async def test_resume_replays_what_was_missed_or_reports_the_gap() -> None:
    hub = Hub("e", buffer_messages=50)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as ws:
                await _receive(ws)
                _publish(hub, range(1, 11))
                got = [(await _receive(ws))["seq"] for _ in range(10)]
            _publish(hub, range(11, 31))  # missed while away
            async with open_ws(f"{url}?epoch=e&since={got[-1]}") as ws:
                await _receive(ws)
                _publish(hub, range(31, 36))
                resumed = [(await _receive(ws))["seq"] for _ in range(25)]
            assert got + resumed == list(range(1, 36)), "every message, in order, once"
            _publish(hub, range(36, 200))  # the buffer (50) moves past seq 35
            async with open_ws(f"{url}?epoch=e&since=35") as ws:
                await _receive(ws)
                gap = await _receive(ws)
                first = await _receive(ws)
            # (half the buffer behind: 25 users it can read before they are evicted)
            assert gap["type"] == "gap" and (gap["from_seq"], gap["to_seq"]) == (36, 174)
            assert first["seq"] == 175
            nursery.cancel_scope.cancel()


async def test_close_sends_what_is_queued_then_going_away() -> None:
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as ws:
                await _receive(ws)
                _publish(hub, range(1, 6))
                hub.close()
                seqs = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        seqs.append((await _receive(ws))["seq"])
                assert seqs == [1, 2, 3, 4, 5]
                assert closed.value.reason.code == CLOSE_GOING_AWAY
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _open_stalling_ws(url: str) -> AsyncIterator[Any]:
    """A client with a tiny receive buffer, so that not reading stalls the server's sends
    after kilobytes instead of the megabytes loopback TCP would otherwise absorb."""
    parts = urlsplit(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    async with trio.open_nursery() as nursery:
        resource = f"{parts.path or '/'}{'?' + parts.query if parts.query else ''}"
        ws = await wrap_client_stream(nursery, stream, f"{parts.hostname}:{parts.port}", resource)
        try:
            yield ws
        finally:
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_two_groups_and_three_plain_clients_with_one_stalled() -> None:
    """Each group receives every user, its members share them; the stalled plain client is
    closed with 3008 while the other two keep up; the buffer stays within its bounds."""
    # (everything here - 8 clients, the server, the producer - shares one Python thread:
    # the rate stays modest so that only the stalled client lags)
    hub = Hub("e", buffer_messages=2000, buffer_bytes=8 * 2**20, client_lag_max=1500)
    producer = Producer(
        hub, SyntheticSource("groups"), rate_per_s=400, page_size=200, stop_at_position=3000
    )
    received: dict[str, list[int]] = {}
    peak_bytes = 0

    async def member(group: str, name: str) -> None:
        async with open_ws(f"{url}?group={group}&window=200") as ws:
            await _receive(ws)
            while True:
                message = await _receive(ws)
                if message["type"] == "user":
                    received.setdefault(name, []).append(message["seq"])
                    await ws.send_message(json.dumps({"type": "ack", "seqs": [message["seq"]]}))

    async def plain(name: str) -> None:
        async with open_ws(url) as ws:
            await _receive(ws)
            while True:
                received.setdefault(name, []).append((await _receive(ws))["seq"])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub, max_messages_per_s=10_000)  # an ack per user
            for group, name in [
                ("g1", "g1-a"),
                ("g1", "g1-b"),
                ("g2", "g2-a"),
                ("g2", "g2-b"),
                ("g2", "g2-c"),
            ]:
                nursery.start_soon(member, group, name)
            nursery.start_soon(plain, "p1")
            nursery.start_soon(plain, "p2")
            async with _open_stalling_ws(url) as stalled:
                await _receive(stalled)
                await eventually(lambda: hub.clients >= 8)
                await nursery.start(producer.run)
                while hub.slow_disconnects == 0:
                    peak_bytes = max(peak_bytes, hub.statistics().buffered_bytes)
                    await trio.sleep(0.01)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await stalled.get_message()
                assert closed.value.reason.code == CLOSE_SLOW
            while len(received.get("p1", [])) < 3000 or len(received.get("p2", [])) < 3000:
                peak_bytes = max(peak_bytes, hub.statistics().buffered_bytes)
                await trio.sleep(0.01)
            # (no group here holds the producer: wait for their watermarks, not for a drain)
            await eventually(lambda: min(hub.watermark(g)[0] for g in ("g1", "g2")) >= 3000)
            nursery.cancel_scope.cancel()
    everything = list(range(1, 3001))
    assert received["p1"] == received["p2"] == everything
    for group, names in [("g1", ["g1-a", "g1-b"]), ("g2", ["g2-a", "g2-b", "g2-c"])]:
        seqs = [s for name in names for s in received[name]]
        assert sorted(seqs) == everything, f"{group}: every user exactly once"
        assert all(received[name] == sorted(received[name]) for name in names)
        shares = Counter({name: len(received[name]) for name in names})
        assert min(shares.values()) > 3000 / len(names) / 3, shares
    assert peak_bytes <= 8 * 2**20
    assert hub.statistics().buffered <= 2000


async def _users_of(ws: Any, count: int, frames: list[dict[str, Any]]) -> list[int]:
    """The seqs of the next `count` users, whether one per frame or in ``users`` frames."""
    seqs: list[int] = []
    while len(seqs) < count:
        message = await _receive(ws)
        frames.append(message)
        items = message["items"] if message["type"] == "users" else [message]
        assert all(item["type"] == "user" for item in items)
        seqs += [item["seq"] for item in items]
    return seqs


async def test_batch_clients_get_users_frames_and_the_others_never_do() -> None:
    """Both clients resume 300 users behind and then follow bursts: the one that asked
    for ``batch=50`` gets ``users`` frames of at most 50, the plain one only ``user``
    frames; both get every seq once, in order, with the same records."""
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            _publish(hub, range(1, 301))
            async with (
                open_ws(f"{url}?epoch=e&since=0&batch=50") as batched,
                open_ws(f"{url}?epoch=e&since=0") as plain,
            ):
                await _receive(batched), await _receive(plain)
                got_batched: list[dict[str, Any]] = []
                got_plain: list[dict[str, Any]] = []
                seqs_b = await _users_of(batched, 300, got_batched)
                seqs_p = await _users_of(plain, 300, got_plain)
                for burst in range(301, 1001, 100):
                    _publish(hub, range(burst, burst + 100))
                    seqs_b += await _users_of(batched, 100, got_batched)
                    seqs_p += await _users_of(plain, 100, got_plain)
            nursery.cancel_scope.cancel()
    assert seqs_b == seqs_p == list(range(1, 1001))
    assert {m["type"] for m in got_plain} == {"user"}
    sizes = [len(m["items"]) for m in got_batched if m["type"] == "users"]
    assert sizes and max(sizes) == 50 and len(got_batched) < 1000 / 10
    records = [item for m in got_batched for item in (m.get("items") or [m])]
    assert records == got_plain


async def test_frames_of_every_length_class_reach_clients_intact() -> None:
    """Payloads up to 64 KiB and beyond (the two longer length encodings of the frame
    header; the welcome and gaps are shorter than 126 bytes), sent several per write,
    arrive whole and in order."""
    hub = Hub("e")
    notes = ["x" * 200, "y" * 70_000, "z" * 60_000, "é" * 40_000]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as ws:
                await _receive(ws)
                for p, note in enumerate(notes, 1):
                    hub.publish_nowait({"note": note}, "synthetic", p)
                got = [await _receive(ws) for _ in notes]
            nursery.cancel_scope.cancel()
    assert [m["user"]["note"] for m in got] == notes


async def test_a_close_never_tears_a_frame_that_was_being_written() -> None:
    """A client far behind stops reading while the server writes it a large backlog,
    then floods messages: the rate limit ends the session in the middle of that write.
    The write is finished first, so the client reads whole frames up to the 1008 close
    (a torn frame would make the close frame garbage: 1007 or 1002 on the client)."""
    hub = Hub("e", client_lag_max=50_000)
    _publish(hub, range(1, 20_001))  # 20 MB: more than the socket buffers hold
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub, max_messages_per_s=10.0)
            async with _open_stalling_ws(f"{url}?epoch=e&since=0") as ws:
                await trio.sleep(0.3)  # the server is stuck in a write to us
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(50):
                        await ws.send_message('{"type":"ack","seqs":[]}')
                seqs = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        message = await _receive(ws)
                        if message["type"] == "user":
                            seqs.append(message["seq"])
            nursery.cancel_scope.cancel()
    assert closed.value.reason.code == CLOSE_RATE
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10
    assert len(seqs) < 15_000, "the session went on sending after it was ended"


async def test_a_stranger_cannot_pose_as_a_fanout_worker() -> None:
    """Worker reports count only from the private socket; on the public port they are bad
    frames, and the daemon's fan-out figures stay zero."""
    hub = Hub("e")
    broadcaster = Broadcaster(hub, BroadcasterConfig(), OPEN_POLICY)
    report = '{"type":"fanout","clients":1000000,"sent":5,"slow_closes":7}'
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(broadcaster.run, "127.0.0.1", 0)
            async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
                await _receive(ws)
                await ws.send_message(report)
                await eventually(lambda: hub.bad_frames == 1)
            nursery.cancel_scope.cancel()
    assert broadcaster.fanout == {} and set(broadcaster.fanout_totals().values()) == {0}


async def test_a_client_resuming_past_a_full_buffer_at_1000_per_s_receives_users() -> None:
    """buffer_messages = 1000 at about 1,000 users/s: a client resuming 1,500 behind
    gets its welcome, a gap naming exactly what it skipped, then users, and is not
    closed slow (each of 5 tries)."""
    hub = Hub("e", buffer_messages=1000)
    _publish(hub, range(1, 3001))

    async def produce() -> None:
        position = 3001
        while True:  # about 1,000 users/s, one at a time
            _publish(hub, range(position, position + 1))
            position += 1
            await trio.sleep(0.001)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            nursery.start_soon(produce)
            for _ in range(5):
                since = hub.last_seq - 1500
                async with open_ws(f"{url}?epoch=e&since={since}") as ws:
                    welcome = await _receive(ws)
                    gap = await _receive(ws)
                    assert gap["type"] == "gap" and gap["from_seq"] == since + 1
                    seqs = [(await _receive(ws))["seq"] for _ in range(600)]
                    assert seqs[0] == gap["to_seq"] + 1 > welcome["seq"] - 1000
                    assert seqs == list(range(seqs[0], seqs[0] + 600)), "in order, no hole"
            nursery.cancel_scope.cancel()


async def test_a_member_of_an_ad_hoc_group_that_leaves_and_rejoins_gets_what_it_held() -> None:
    """An unconfigured group's only member holds 50 users, leaves, and rejoins 0.5 s
    later: 50 of 50 redelivered (as for a configured group)."""
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub, ad_hoc_group_grace_s=30.0)
            async with open_ws(url + "?group=adhoc") as member:
                await _receive(member)
                _publish(hub, range(1, 51))
                held = [(await _receive(member))["seq"] for _ in range(50)]
            await trio.sleep(0.5)
            async with open_ws(url + "?group=adhoc") as member:
                await _receive(member)
                again = [(await _receive(member))["seq"] for _ in range(50)]
            assert held == again == list(range(1, 51))
            nursery.cancel_scope.cancel()


async def test_a_reader_that_takes_nothing_for_write_timeout_s_is_dropped_and_counted() -> None:
    """A client that stops reading while users keep coming: once a write to it has
    taken write_timeout_s, it is dropped and counted in write_timeouts: closed with 3008
    when the write stopped between two frames, else (a torn frame, which no close frame
    can follow) its TCP connection is closed, 1006 for the client. The others are
    served on."""
    hub = Hub("e")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            settings = BroadcasterConfig(write_timeout_s=0.5, coalesce_ms=0)
            broadcaster = Broadcaster(hub, settings, OPEN_POLICY)
            port = await nursery.start(partial(broadcaster.run, "127.0.0.1", 0))
            url = f"ws://127.0.0.1:{port}/"
            async with _open_stalling_ws(url) as stalled:
                position = 0
                while not broadcaster.write_timeouts:  # one user per write, as at a low rate
                    position += 1
                    _publish(hub, range(position, position + 1))
                    await trio.sleep(0.002)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await stalled.get_message()
            stats = broadcaster.statistics()
            assert stats.write_timeouts == 1
            if closed.value.reason.code == CLOSE_SLOW:
                assert stats.closed == {"closed_3008": 1}
            else:
                assert closed.value.reason.code == 1006
                assert stats.closed == {"write_timeout": 1}
            assert hub.slow_disconnects == 0, "it was never too far behind: the write timed out"
            async with open_ws(url) as good:  # the others are served on
                await _receive(good)
                _publish(hub, range(position + 1, position + 2))
                assert (await _receive(good))["seq"] == position + 1
            nursery.cancel_scope.cancel()


async def test_the_listening_line_says_who_can_reach_the_port_and_what_they_need() -> None:
    hub = Hub("e")
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            nursery.cancel_scope.cancel()
    (line,) = [e for e in logs if e["event"] == "broadcaster.listening"]
    assert line["url"] == url and line["port"] == int(url.rsplit(":", 1)[1].strip("/"))
    assert line["reachable_from"] == "this machine only", "loopback is not public"
    assert line["access"] == "no token needed" and line["served_by"] == "this process"
    assert "public" not in line and "auth" not in line
