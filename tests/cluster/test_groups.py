"""The NATS bus's WebSocket groups' consumers against the local cluster (the groups'
behaviour, the same on both buses, is in tests/test_group_contract.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
import structlog
import trio
from nats.js.api import DeliverPolicy

from tests.cluster.test_bus import outlet, publish
from tests.conftest import DaemonProcess
from tests.helpers import eventually
from tests.test_group_contract import Member as WebSocketMember
from userstreamd.stream.client import open_ws
from userstreamd.stream.groups import Member
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import decode_head
from userstreamd.topology.nats.bus import open_bus
from userstreamd.topology.nats.groups import (
    NatsGroups,
    _ensure,
    consumer_config,
    consumer_name,
    declare_groups,
)

pytestmark = pytest.mark.cluster


def test_a_groups_consumer_is_named_apart_from_the_daemons_own() -> None:
    # (`~` is in no group name, so no ``consumers.group`` can be one of these)
    assert consumer_name("audit") == "ws~audit"
    assert consumer_name("eu.audit") == "ws~eu~audit"
    assert consumer_name("eu.audit") != consumer_name("eu_audit")


async def test_an_ad_hoc_groups_consumer_expires_and_stays_once_the_group_is_named(
    nats_config: Any,
) -> None:
    ad_hoc = nats_config(
        broadcaster={
            "allow_ad_hoc_groups": True,
            "ad_hoc_group_grace_s": 7.0,
            "ack_timeout_s": 2.0,
        },
        cluster={"ack_wait_s": 11.0},
    )
    named = nats_config(broadcaster={"groups": ["x.y"], "group_lag_max": 500})
    name = consumer_name("x.y")
    async with open_bus(ad_hoc, "test") as bus:
        await bus.call(_ensure, bus, name, consumer_config(bus, ad_hoc, "x.y"))
        info = await bus.call(bus.js.consumer_info, bus.stream, name)
        # (inactive: the grace and ack_timeout_s; AckWait: never below ack_timeout_s + 5)
        assert (info.config.inactive_threshold, info.config.ack_wait) == (9.0, 11.0)
        assert info.config.deliver_policy == DeliverPolicy.NEW
        await bus.call(_ensure, bus, name, consumer_config(bus, named, "x.y"))
        info = await bus.call(bus.js.consumer_info, bus.stream, name)
        assert not info.config.inactive_threshold
        assert info.config.max_ack_pending == 500


async def test_a_member_that_left_with_a_pull_outstanding_takes_none_of_the_next_users(
    nats_config: Any,
) -> None:
    """Its pull request still open at the server when it leaves, a member is sent none of
    what is published next (the server drops a request nobody listens for): the member
    after it gets every user at once, not after AckWait."""
    config = nats_config(broadcaster={"groups": ["g"]}, cluster={"ack_wait_s": 300.0})
    async with open_bus(config, "test") as bus:
        await declare_groups(bus, config)
        groups = NatsGroups(bus, config, Hub(bus.epoch))
        first = groups.join("g", "first", 10)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(groups.next_member_frames, first)
                await eventually(lambda: _outstanding(groups, first) == 10, 10)
                nursery.cancel_scope.cancel()
            groups.leave(first)
            await publish(await outlet(bus, 0), 1, 20)
            second = groups.join("g", "second", 100)
            seqs: list[int] = []
            while len(seqs) < 20:
                due = await groups.next_member_frames(second)
                taken = [decode_head(user).seq for user in due.users]
                groups.ack(second, taken)
                seqs += taken
        groups.leave(second)
    assert sorted(seqs) == list(range(1, 21))


def _outstanding(groups: NatsGroups, member: Member) -> int:
    pull = groups._states[member.id].taker.pull
    return pull.outstanding if pull is not None else 0


async def test_a_member_keeps_what_it_holds_across_a_leader_change_of_its_consumer(
    nats_config: Any,
) -> None:
    """The consumer's leader steps down while a member holds users and its pull request
    waits for more: the request fails, a new one is made, what the member holds stays its
    own (acknowledged once the new leader is in place, never redelivered), and it gets
    what is published next."""
    config = nats_config(broadcaster={"groups": ["g"]}, cluster={"ack_wait_s": 300.0})
    async with open_bus(config, "test") as bus:
        await declare_groups(bus, config)
        publishing = await outlet(bus, 0)
        await publish(publishing, 1, 5)
        groups = NatsGroups(bus, config, Hub(bus.epoch))
        member = groups.join("g", "member", 10)
        consumer = consumer_name("g")
        with trio.fail_after(30), structlog.testing.capture_logs() as logs:
            held = await _take(groups, member, 5)
            await eventually(lambda: _outstanding(groups, member) == 5, 10)
            stepdown = f"$JS.API.CONSUMER.LEADER.STEPDOWN.{bus.stream}.{consumer}"
            await bus.call(bus.nc.request, stepdown, b"", 5.0)
            await publish(publishing, 6, 5)
            rest = await _take(groups, member, 5)  # (through the new request)
            groups.ack(member, held + rest)
            info = await bus.call(bus.js.consumer_info, bus.stream, consumer)
            while info.ack_floor.stream_seq < 10:  # (the server's state: polled)
                await trio.sleep(0.05)
                info = await bus.call(bus.js.consumer_info, bus.stream, consumer)
        groups.leave(member)
    assert any(e["event"] == "broadcaster.group_pull_failed" for e in logs)
    assert sorted(held + rest) == list(range(1, 11))
    assert (info.num_redelivered, info.num_ack_pending) == (0, 0)


async def _take(groups: NatsGroups, member: Member, count: int) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        due = await groups.next_member_frames(member)
        seqs += [decode_head(user).seq for user in due.users]
    return seqs


async def test_a_group_across_two_broadcasters_one_killed_and_its_members_users_redelivered(
    tmp_path: Path, dsn: str, nats_urls: list[str], daemon_factory: Any
) -> None:
    """A group with a member on each of two broadcaster processes; the one whose member
    holds a full window unacknowledged is killed with SIGKILL (nothing NAKs what it
    held): the servers redeliver it after AckWait, and the other member gets every user
    the first did not acknowledge, each once."""
    n, acked, window = 300, 20, 10

    def tables(name: str) -> dict[str, Any]:
        return {
            "daemon": {"state_dir": str(tmp_path / name), "log_format": "json"},
            "producer": {"source": "synthetic", "rate_per_s": 200.0, "stop_at_position": n},
            "broadcaster": {
                "port": 0,
                "groups": ["g"],
                "max_messages_per_s": 10_000.0,
                "ack_timeout_s": 1.0,  # (so AckWait, 6 s: ack_timeout_s + 5)
            },
            "http": {"port": 0},
            "consumers": {"count": 0},
            "database": {"dsn": dsn},
            "cluster": {
                "bus": "nats",
                "servers": nats_urls,
                "stream": "GROUPS2",
                "lease_ttl_s": 2.0,
                "ack_wait_s": 3.0,
            },
        }

    def start(name: str, role: str) -> DaemonProcess:
        return daemon_factory(tables(name), name, args=["run", "--role", role])

    broadcasters = [start(f"broadcaster-{i}", "broadcaster") for i in (1, 2)]
    for daemon in broadcasters:  # (the group is made as each starts: before any user)
        await trio.to_thread.run_sync(daemon.wait_for, "daemon.ready", 60)
    start("producer", "producer")
    ports = [int(b.wait_for("broadcaster.listening")["port"]) for b in broadcasters]
    urls = [f"ws://127.0.0.1:{port}/?group=g&window={window}" for port in ports]
    with trio.fail_after(90):
        async with open_ws(urls[0]) as first_ws, open_ws(urls[1]) as second_ws:
            first, second = WebSocketMember(first_ws), WebSocketMember(second_ws)
            for ws in (first_ws, second_ws):
                await ws.get_message()  # (the welcome)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ack_forever, second)
                await first.take(acked, ack=True)
                held = await first.take(window, ack=False)
                broadcasters[0].kill()  # SIGKILL, while its member holds a full window
                await eventually(lambda: len(second.seqs) >= n - acked, 60)
                nursery.cancel_scope.cancel()
    assert len(second.seqs) == len(set(second.seqs)) == n - acked  # each once
    assert sorted(first.seqs[:acked] + second.seqs) == list(range(1, n + 1))
    assert set(held) <= set(second.seqs)


async def _ack_forever(m: WebSocketMember) -> None:
    while True:
        await m.take(1, ack=True)


async def test_an_ad_hoc_groups_consumer_is_deleted_by_the_servers_once_left_for_the_grace(
    nats_config: Any,
) -> None:
    config = nats_config(
        broadcaster={
            "allow_ad_hoc_groups": True,
            "ad_hoc_group_grace_s": 1.0,
            "ack_timeout_s": 1.0,  # (the inactive threshold: 2 s)
        }
    )
    async with open_bus(config, "test") as bus:
        groups = NatsGroups(bus, config, Hub(bus.epoch))
        member = groups.join("passing", "member", 10)
        name = consumer_name("passing")

        async def exists() -> bool:
            try:
                await bus.call(bus.js.consumer_info, bus.stream, name)
            except nats.js.errors.NotFoundError:
                return False
            return True

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(groups.next_member_frames, member)
                await eventually(lambda: _outstanding(groups, member) == 10, 10)
                nursery.cancel_scope.cancel()
            assert await exists()  # (made by its first member)
            groups.leave(member)
            while await exists():  # noqa: ASYNC110 (the servers' state: polled)
                await trio.sleep(0.1)
