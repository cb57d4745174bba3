"""The one writer of plain clients (`serve/pump.py`) and the keep-alive wheel, over real
WebSocket connections on 127.0.0.1."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed

from userstreamd.config import BroadcasterConfig
from userstreamd.serve.broadcaster import OPEN_POLICY, Broadcaster
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.stream.client import open_ws
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import CLOSE_GOING_AWAY, CLOSE_SLOW

from .helpers import eventually
from .test_broadcaster import _open_stalling_ws


class _Spawned(trio.abc.Instrument):
    """Tasks the server spawns (the pump's, for a client whose socket is full)."""

    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("userstreamd."):
            self.count += 1


def _tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_tasks(child) for n in task.child_nurseries for child in n.child_tasks)


async def _serve(nursery: trio.Nursery, hub: Hub, **settings: Any) -> tuple[Broadcaster, str]:
    broadcaster = Broadcaster(hub, BroadcasterConfig(**settings), OPEN_POLICY)
    port = await nursery.start(partial(broadcaster.run, "127.0.0.1", 0))
    return broadcaster, f"ws://127.0.0.1:{port}/"


def _publish(hub: Hub, n: int) -> None:
    for _ in range(n):
        hub.publish_nowait(synthetic_user("p", hub.last_seq + 1), "synthetic", hub.last_seq + 1)


async def test_a_plain_client_costs_one_task_and_every_client_gets_every_user() -> None:
    """No task per client per user, and none beside its session: 30 plain clients add
    30 tasks to the daemon's; 500 users written to them in 50 bursts leave none behind."""
    hub = Hub("e")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, url = await _serve(nursery, hub)

            def server_tasks() -> int:
                return sum(_tasks(task) for task in nursery.child_tasks)

            await trio.testing.wait_all_tasks_blocked()
            before = server_tasks()
            received: dict[int, list[int]] = {}
            async with trio.open_nursery() as clients:

                async def client(i: int, task_status: trio.TaskStatus[None]) -> None:
                    async with open_ws(url) as ws:
                        await ws.get_message()  # the welcome
                        task_status.started()
                        seqs = received.setdefault(i, [])
                        while len(seqs) < 500:
                            seqs.append(json.loads(await ws.get_message())["seq"])

                for i in range(30):
                    await clients.start(client, i)
                await eventually(lambda: hub.clients == 30)
                await trio.testing.wait_all_tasks_blocked()
                assert server_tasks() - before == 30
                spawned = _Spawned()
                trio.lowlevel.add_instrument(spawned)
                for _ in range(50):
                    _publish(hub, 10)
                    await trio.sleep(0.001)
            trio.lowlevel.remove_instrument(spawned)
            # (a task only while a client's socket has no room for a whole write, as at
            # bursts like these: never one per user and client, and none left over)
            assert spawned.count < 30 * 50
            await trio.testing.wait_all_tasks_blocked()
            assert server_tasks() == before
            assert all(seqs == list(range(1, 501)) for seqs in received.values())
            assert len(received) == 30
            assert broadcaster.sent["plain"] == 30 * 500
            nursery.cancel_scope.cancel()


async def test_a_lone_user_goes_out_at_once_and_users_coalesce_only_behind_a_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With coalesce_ms = 100: a user published to an idle pump is written in the pass
    it wakes, at once; users published within 100 ms of that pass wait for the next one,
    and go out together; after a quiet spell, a lone user is again not held back."""
    hub = Hub("e")
    arrivals: list[tuple[float, int]] = []
    async with trio.open_nursery() as nursery:
        _, url = await _serve(nursery, hub, coalesce_ms=100)
        async with open_ws(url) as ws:
            await ws.get_message()

            async def read() -> None:
                while True:
                    seq = json.loads(await ws.get_message())["seq"]
                    arrivals.append((trio.current_time(), seq))

            nursery.start_soon(read)
            await trio.sleep(1)  # (the pump's first pass is long past)
            t0 = trio.current_time()
            _publish(hub, 1)  # idle: at once
            for _ in range(4):  # within the 100 ms after that pass: the next pass
                await trio.sleep(0.01)
                _publish(hub, 1)
            await trio.sleep(1)
            t1 = trio.current_time()
            _publish(hub, 1)  # idle again
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert [seq for _, seq in arrivals] == [1, 2, 3, 4, 5, 6]
    assert arrivals[0][0] == t0
    assert {at for at, _ in arrivals[1:5]} == {t0 + 0.1}
    assert arrivals[5][0] == t1


async def test_a_stalled_reader_is_set_aside_and_closed_while_the_others_get_everything() -> None:
    """A client that reads nothing among readers: its write is finished by a task of its
    own (the pump goes on), and it is closed as slow (3008) when it falls client_lag_max
    behind; the readers get every user in order."""
    hub = Hub("e", client_lag_max=300)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broadcaster, url = await _serve(nursery, hub, write_timeout_s=30)
            got: dict[int, list[int]] = {0: [], 1: [], 2: []}
            async with _open_stalling_ws(url) as stalled:
                await stalled.get_message()
                async with trio.open_nursery() as readers:

                    async def reader(i: int, task_status: trio.TaskStatus[None]) -> None:
                        async with open_ws(url) as ws:
                            await ws.get_message()
                            task_status.started()
                            while len(got[i]) < 1000:
                                got[i].append(json.loads(await ws.get_message())["seq"])

                    for i in got:
                        await readers.start(reader, i)
                    for _ in range(100):
                        _publish(hub, 10)
                        await trio.sleep(0.005)
                assert broadcaster.pump.set_aside >= 1
                try:
                    while True:
                        await stalled.get_message()
                except ConnectionClosed as closed:
                    assert closed.reason.code == CLOSE_SLOW
            assert all(seqs == list(range(1, 1001)) for seqs in got.values())
            assert broadcaster.closed["closed_3008"] == 1
            assert hub.slow_disconnects == 1 and broadcaster.write_timeouts == 0
            nursery.cancel_scope.cancel()


async def test_a_client_that_pings_while_it_receives_gets_every_frame_whole() -> None:
    """Pongs (written by the session's reader) and pings (the wheel's raw frames) share
    the socket with the pump's writes: none is ever written into another frame."""
    hub = Hub("e")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            _, url = await _serve(nursery, hub, ping_interval_s=0.01, pong_timeout_s=5)
            async with open_ws(url) as ws:
                await ws.get_message()
                pongs = 0

                async def ping() -> None:
                    nonlocal pongs
                    while True:
                        await ws.ping()
                        pongs += 1

                nursery.start_soon(ping)
                seqs: list[int] = []
                for _ in range(40):
                    _publish(hub, 50)
                    while len(seqs) < hub.last_seq:
                        seqs.append(json.loads(await ws.get_message())["seq"])
                # (gone without a close: trio-websocket's client would fail answering a
                # ping of ours in the middle of its closing handshake)
                nursery.cancel_scope.cancel()
    assert seqs == list(range(1, 2001))
    assert pongs > 10


class _Scheduled(trio.abc.Instrument):
    def __init__(self, name: str) -> None:
        self.name, self.count = name, 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.count += 1


async def test_idle_clients_are_pinged_by_one_task_waking_once_a_second_at_most(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """40 idle clients that connected over 12 s, pinged every 20 s for 80 s: 160 pings
    answered (none dropped), from the wheel's one task, which woke far fewer times than
    it pinged: no timer per client."""
    hub = Hub("e")
    wheel = _Scheduled("KeepAlive.run")
    async with trio.open_nursery() as nursery:
        broadcaster, url = await _serve(nursery, hub, ping_interval_s=20, pong_timeout_s=10)
        async with trio.open_nursery() as clients:

            async def client() -> None:
                async with open_ws(url) as ws:
                    await ws.get_message()
                    await trio.sleep_forever()

            for _ in range(40):
                clients.start_soon(client)
                await trio.sleep(0.3)
            pongs = broadcaster.keepalive  # (the wheel's view: each peer's pong count)
            trio.lowlevel.add_instrument(wheel)
            await trio.sleep(80)
            trio.lowlevel.remove_instrument(wheel)
            assert hub.clients == 40 and not broadcaster.closed
            assert pongs.pinged >= 40 * 3
            assert wheel.count <= 90
            clients.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_the_stream_ends_with_everything_then_1001_though_it_closed_right_after_a_publish() -> (
    None
):
    """The last users and the end of the stream with no checkpoint between them: the
    pump's one wake-up covers both (coalescing or not)."""
    for coalesce_ms in (0, 5):
        hub = Hub("e")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                _, url = await _serve(nursery, hub, coalesce_ms=coalesce_ms)
                async with open_ws(url) as ws:
                    await ws.get_message()
                    await trio.sleep(0.05)
                    _publish(hub, 3)
                    hub.close()
                    seqs = [json.loads(await ws.get_message())["seq"] for _ in range(3)]
                    try:
                        await ws.get_message()
                    except ConnectionClosed as closed:
                        assert closed.reason.code == CLOSE_GOING_AWAY
                    else:
                        raise AssertionError("the stream did not end")
                assert seqs == [1, 2, 3]
                nursery.cancel_scope.cancel()
