"""Real WebSocket clients on 127.0.0.1 against the broadcaster."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from userstreamd.broadcaster import CLOSE_GOING_AWAY, CLOSE_SLOW, run_broadcaster
from userstreamd.hub import Hub
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.wsclient import open_ws


async def _start(nursery: trio.Nursery, hub: Hub) -> str:
    port = await nursery.start(run_broadcaster, hub, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{port}/"


async def _receive(ws: Any) -> dict[str, Any]:
    return json.loads(await ws.get_message())


async def test_welcome_then_consecutive_users_and_two_clients_see_the_same() -> None:
    hub = Hub("epoch-1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            hub.publish(synthetic_user("s", 1), "synthetic")  # before anyone listens
            async with open_ws(url) as a, open_ws(url) as b:
                welcome_a, welcome_b = await _receive(a), await _receive(b)
                assert welcome_a["type"] == welcome_b["type"] == "welcome"
                assert welcome_a["epoch"] == "epoch-1" and welcome_a["seq"] == 1
                assert welcome_b["clients"] == 2
                sent = [synthetic_user("s", p) for p in range(2, 12)]
                for user in sent:
                    hub.publish(user, "synthetic")
                got_a = [await _receive(a) for _ in sent]
                got_b = [await _receive(b) for _ in sent]
            nursery.cancel_scope.cancel()
    assert [m["seq"] for m in got_a] == list(range(2, 12))
    assert got_a == got_b
    assert [m["user"] for m in got_a] == sent
    assert all(
        m["type"] == "user"
        and m["source"] == "synthetic"
        and m["epoch"] == "epoch-1"
        and m["produced_at"].endswith("Z")
        for m in got_a
    )


async def test_acks_are_recorded_and_bad_frames_counted_without_disconnect() -> None:
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as ws:
                await _receive(ws)
                for p in range(1, 4):
                    hub.publish(synthetic_user("s", p), "synthetic")
                for _ in range(3):
                    await _receive(ws)
                for bad in ["not json", '{"type": "launch"}', '{"type": "ack", "seq": 99}']:
                    await ws.send_message(bad)
                await ws.send_message(b"\x00binary")
                await ws.send_message('{"type": "ack", "seq": 3}')
                while hub.acked_through() != 3:  # noqa: ASYNC110 (polls the hub, bounded above)
                    await trio.sleep(0.01)
                assert hub.bad_frames == 4
                hub.publish(synthetic_user("s", 4), "synthetic")
                assert (await _receive(ws))["seq"] == 4  # still served
            nursery.cancel_scope.cancel()


async def test_slow_client_is_closed_with_3008_and_others_keep_up() -> None:
    hub = Hub("e", client_queue=64)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as slow, open_ws(url) as fast:
                await _receive(slow), await _receive(fast)
                # The slow client never reads: once the kernel's socket buffers are full its
                # queue overflows. The fast one reads everything, in lockstep.
                user = synthetic_user("s", 1)
                published = 0
                while hub.slow_disconnects == 0 and published < 50_000:
                    for _ in range(32):
                        hub.publish(user, "synthetic")
                    published += 32
                    for _ in range(32):
                        assert (await _receive(fast))["seq"] > published - 32
                assert hub.slow_disconnects == 1 and hub.clients == 1
                hub.publish(user, "synthetic")
                assert (await _receive(fast))["seq"] == published + 1
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await slow.get_message()
                assert closed.value.reason.code == CLOSE_SLOW
            nursery.cancel_scope.cancel()


async def test_close_sends_what_is_queued_then_going_away() -> None:
    hub = Hub("e")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery, hub)
            async with open_ws(url) as ws:
                await _receive(ws)
                for p in range(1, 6):
                    hub.publish(synthetic_user("s", p), "synthetic")
                hub.close()
                seqs = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        seqs.append((await _receive(ws))["seq"])
                assert seqs == [1, 2, 3, 4, 5]
                assert closed.value.reason.code == CLOSE_GOING_AWAY
            nursery.cancel_scope.cancel()
