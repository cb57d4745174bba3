"""The WebSocket consumer groups' contract, the same tests on both buses.

A daemon (no consumers of its own) publishes N synthetic users; its named group ``g``
is owed them from its start (on the embedded bus the hub's group, on the NATS bus the
durable consumer ``ws~g``). Members are real WebSocket clients on 127.0.0.1: a member
gets its share of the users and acknowledges them; what a member held when it left or
fell silent goes to the others; a group the policy does not allow is refused. The
``nats`` case runs on the shared local cluster (marked ``cluster``), with an AckWait
longer than each test, so what is redelivered there was redelivered at once (NAKed),
not by the server's timeout.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from tests.helpers import eventually, run_until, write_config
from userstreamd.config import Config, load_config
from userstreamd.runtime.daemon import Daemon
from userstreamd.stream.client import open_ws
from userstreamd.stream.protocol import CLOSE_ACK_TIMEOUT

N = 60  # users published (seqs 1..N)
GROUP = "g"
RUN_S = 90  # each test's bound, the daemon's start and stop included
TABLES: dict[str, dict[str, Any]] = {
    "producer": {"source": "synthetic", "seed": "groups", "rate_per_s": 1000.0},
    "consumers": {"count": 0},
    "broadcaster": {"groups": [GROUP]},
}


@dataclass(frozen=True)
class Bus:
    name: str
    config: Callable[..., Config]  # config(**tables)


@pytest.fixture(params=["embedded", pytest.param("nats", marks=pytest.mark.cluster)])
def bus(request: pytest.FixtureRequest, tmp_path: Path, dsn: str) -> Bus:
    if request.param == "nats":
        make = request.getfixturevalue("nats_config")

        def nats(**tables: dict[str, Any]) -> Config:
            return make(**tables, cluster={"ack_wait_s": 300.0})

        return Bus("nats", nats)

    def embedded(**tables: dict[str, Any]) -> Config:
        return load_config(write_config(tmp_path, dsn, **tables))

    return Bus("embedded", embedded)


def config_of(bus: Bus, ack_timeout_s: float = 60.0, workers: int = 0) -> Config:
    """The daemon's config (with `workers`, its members are relayed by fan-out workers)."""
    broadcaster = {**TABLES["broadcaster"], "ack_timeout_s": ack_timeout_s, "workers": workers}
    producer = {**TABLES["producer"], "stop_at_position": N}
    return bus.config(**{**TABLES, "producer": producer, "broadcaster": broadcaster})


@dataclass
class Member:
    """A member's connection and what it got."""

    ws: WebSocketConnection
    seqs: list[int] = field(default_factory=list)  # users, in the order they came
    checkpoints: list[int] = field(default_factory=list)

    async def take(self, count: int, *, ack: bool) -> list[int]:
        """The next `count` users (acknowledging each frame's at once if `ack`)."""
        taken: list[int] = []
        while len(taken) < count:
            message = json.loads(await self.ws.get_message())
            kind = message["type"]
            if kind == "checkpoint":
                self.checkpoints.append(message["seq"])
            users = [message] if kind == "user" else message.get("users", [])
            seqs = [u["seq"] for u in users]
            taken += seqs
            if ack and seqs:
                await self.ws.send_message(json.dumps({"type": "ack", "seqs": seqs}))
        self.seqs += taken
        return taken

    async def wait_checkpoint(self, seq: int) -> None:
        while not self.checkpoints or self.checkpoints[-1] < seq:
            message = json.loads(await self.ws.get_message())
            assert message["type"] == "checkpoint", message  # (nothing else is left)
            self.checkpoints.append(message["seq"])


@asynccontextmanager
async def member(daemon: Daemon, window: int, group: str = GROUP) -> AsyncIterator[Member]:
    async with open_ws(f"{daemon.url}?group={group}&window={window}") as ws:
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome" and welcome["group"] == group
        yield Member(ws)


async def test_a_member_gets_the_users_and_its_acks_move_the_group_on(bus: Bus) -> None:
    daemon = Daemon(config_of(bus))
    got: list[Member] = []

    async def one_member() -> None:
        async with member(daemon, window=10) as m:  # (N > 10: only acks let it go on)
            await m.take(N, ack=True)
            await m.wait_checkpoint(N)
            got.append(m)

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, one_member) == 0
    (m,) = got
    assert sorted(m.seqs) == list(range(1, N + 1))
    assert m.checkpoints == sorted(m.checkpoints) and m.checkpoints[-1] == N


async def test_two_members_share_the_users_each_to_one_of_them(bus: Bus) -> None:
    daemon = Daemon(config_of(bus))
    got: list[Member] = []

    async def two_members() -> None:
        async with member(daemon, window=5) as a, member(daemon, window=5) as b:
            async with trio.open_nursery() as nursery:
                for m in (a, b):
                    nursery.start_soon(_ack_forever, m)
                await eventually(lambda: len(a.seqs) + len(b.seqs) >= N, RUN_S)
                nursery.cancel_scope.cancel()
            got.extend([a, b])

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, two_members) == 0
    a, b = got
    assert a.seqs and b.seqs, "each member got some"
    assert not set(a.seqs) & set(b.seqs)
    assert sorted(a.seqs + b.seqs) == list(range(1, N + 1))


async def test_what_a_member_held_when_it_left_goes_to_another(bus: Bus) -> None:
    daemon = Daemon(config_of(bus))
    got: list[list[int]] = []

    async def leave_then_another() -> None:
        async with member(daemon, window=10) as a:
            held = await a.take(10, ack=False)
        async with member(daemon, window=100) as b:
            await b.take(N, ack=True)
        got.extend([held, b.seqs])

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, leave_then_another) == 0
    held, seqs = got
    assert set(held) <= set(seqs)
    assert sorted(seqs) == list(range(1, N + 1))


async def test_a_silent_member_is_closed_4000_and_its_users_go_to_another(bus: Bus) -> None:
    daemon = Daemon(config_of(bus, ack_timeout_s=1.0))
    got: list[Any] = []

    async def silent_then_another() -> None:
        async with member(daemon, window=10) as a:
            held = await a.take(10, ack=False)
            with pytest.raises(ConnectionClosed) as closed:
                await a.take(1, ack=False)
        async with member(daemon, window=100) as b:
            await b.take(N, ack=True)
        got.extend([held, closed.value.reason, b.seqs])

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, silent_then_another) == 0
    held, reason, seqs = got
    assert (reason.code, reason.reason) == (CLOSE_ACK_TIMEOUT, "ack timeout")
    assert set(held) <= set(seqs)
    assert sorted(seqs) == list(range(1, N + 1))


async def test_a_group_the_policy_does_not_allow_is_refused(bus: Bus) -> None:
    daemon = Daemon(config_of(bus))
    statuses: list[int] = []

    async def refused() -> None:
        for group in ("others", "db"):  # (not in broadcaster.groups; the daemon's own)
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_ws(f"{daemon.url}?group={group}"):
                    pass
            statuses.append(rejected.value.status_code)

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, refused) == 0
    assert statuses == [403, 403]


async def _ack_forever(m: Member) -> None:
    while True:
        await m.take(1, ack=True)


def _stored(path: Path) -> list[int]:
    """The seqs a member's store holds, in the order it stored them."""
    text = path.read_text() if path.exists() else ""
    return [int(line.split()[0]) for line in text.splitlines()]


@pytest.mark.parametrize("workers", [0, 1], ids=["direct", "relayed"])
async def test_a_member_killed_mid_window_and_the_survivor_stores_every_user_once(
    bus: Bus, tmp_path: Path, workers: int
) -> None:
    """Two members in processes of their own; one, holding a full window it stored but
    did not acknowledge, is killed with SIGKILL: the survivor stores every user the
    killed one did not acknowledge, each once (also through a fan-out worker, which
    relays its members to the daemon)."""
    acked, window = 20, 10
    daemon = Daemon(config_of(bus, workers=workers))
    victim_store, survivor_store = tmp_path / "victim.txt", tmp_path / "survivor.txt"
    victim_seqs: list[int] = []

    async def spawn(store: Path, *args: str) -> trio.Process:
        url = f"{daemon.url}?group={GROUP}&window={window}"
        command = [sys.executable, "-m", "tests.group_member", url, str(store), *args]
        return await trio.lowlevel.open_process(command, cwd=Path(__file__).parent.parent)

    async def kill_one_mid_window() -> None:
        victim = await spawn(victim_store, "--ack-first", str(acked))
        survivor = None
        try:
            # Its first users acknowledged, then a full window stored and held.
            await eventually(lambda: len(_stored(victim_store)) == acked + window, 30)
            survivor = await spawn(survivor_store)
            await eventually(lambda: len(_stored(survivor_store)) > 0, 30)  # (both at work)
            victim.kill()  # SIGKILL
            assert await victim.wait() == -signal.SIGKILL
            victim_seqs.extend(_stored(victim_store))
            await eventually(lambda: len(_stored(survivor_store)) >= N - acked, 60)
        finally:
            for process in (victim, survivor):
                if process is not None and process.returncode is None:
                    process.kill()
                    await process.wait()

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, kill_one_mid_window) == 0
    first, held = victim_seqs[:acked], victim_seqs[acked:]
    survivor_seqs = _stored(survivor_store)
    assert len(held) == window
    assert len(survivor_seqs) == len(set(survivor_seqs)) == N - acked  # each once
    assert sorted(first + survivor_seqs) == list(range(1, N + 1))  # every user
    assert set(held) <= set(survivor_seqs)  # what it held went to the survivor
