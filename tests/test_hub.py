"""The hub's sequencing, fan-out and acks, without sockets."""

from __future__ import annotations

import json

import pytest
import trio

from userstreamd.hub import Hub


def _drain(receive: trio.MemoryReceiveChannel[str]) -> list[dict[str, object]]:
    frames = []
    while True:
        try:
            frames.append(json.loads(receive.receive_nowait()))
        except (trio.WouldBlock, trio.EndOfChannel):
            return frames


def test_publish_numbers_users_and_fans_out_one_encoding() -> None:
    hub = Hub("ep")
    a, b = hub.subscribe("a"), hub.subscribe("b")
    for n in range(3):
        hub.publish({"n": n, "login": {"uuid": str(n)}}, "synthetic")
    got_a, got_b = _drain(a.receive), _drain(b.receive)
    assert [m["seq"] for m in got_a] == [1, 2, 3]
    assert got_a == got_b
    assert {m["epoch"] for m in got_a} == {"ep"}


def test_late_subscriber_starts_after_the_last_seq() -> None:
    hub = Hub("ep")
    hub.publish({}, "s")
    late = hub.subscribe("late")
    assert late.start_seq == 1
    hub.publish({}, "s")
    assert [m["seq"] for m in _drain(late.receive)] == [2]


def test_full_queue_cuts_off_only_that_subscriber() -> None:
    hub = Hub("ep", client_queue=2)
    slow, fast = hub.subscribe("slow"), hub.subscribe("fast")
    hub.publish({}, "s")
    hub.publish({}, "s")
    _drain(fast.receive)
    hub.publish({}, "s")
    assert slow.overflowed and not fast.overflowed
    assert hub.clients == 1 and hub.slow_disconnects == 1
    assert [m["seq"] for m in _drain(slow.receive)] == [1, 2]  # then the channel ends
    assert [m["seq"] for m in _drain(fast.receive)] == [3]


def test_acks_only_move_forward_and_never_past_what_was_published() -> None:
    hub = Hub("ep")
    a, b = hub.subscribe("a"), hub.subscribe("b")
    assert hub.acked_through() is None  # nobody acks: nothing to wait for
    for _ in range(5):
        hub.publish({}, "s")
    hub.ack(a, 4)
    hub.ack(a, 2)
    assert a.acked == 4
    assert hub.acked_through() == 4  # b never acked: not an acking client
    hub.ack(b, 3)
    assert hub.acked_through() == 3
    with pytest.raises(ValueError, match="beyond"):
        hub.ack(b, 6)
    hub.unsubscribe(b)
    assert hub.acked_through() == 4


async def test_wait_drained_returns_when_every_acking_client_has_the_last_seq() -> None:
    hub = Hub("ep")
    a, b = hub.subscribe("a"), hub.subscribe("b")
    hub.ack(a, 0)
    hub.ack(b, 0)
    for _ in range(3):
        hub.publish({}, "s")
    done = False

    async def waiter() -> None:
        nonlocal done
        await hub.wait_drained()
        done = True

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            hub.ack(a, 3)
            await trio.testing.wait_all_tasks_blocked()
            assert not done
            hub.unsubscribe(b)  # a consumer that went away is not waited for
    assert done
