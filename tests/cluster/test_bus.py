"""The NATS bus's parts against a real 3-node JetStream cluster: the producer's outlet
(fenced, deduplicated publishes), the lease, a broadcaster's mirror, the consumers, and
the daemon's roles in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import query
from tests.helpers import eventually, run_until
from userstreamd.runtime.daemon import Daemon
from userstreamd.serve.broadcaster import _in_frames
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import PostgresStore, StreamCheckpoint
from userstreamd.topology.nats.bus import Bus, open_bus
from userstreamd.topology.nats.consumer import _ack, _bind
from userstreamd.topology.nats.lease import hold_lease
from userstreamd.topology.nats.mirror import StreamMirror
from userstreamd.topology.nats.outlet import (
    PUBLISH_TIMEOUT_S,
    Entry,
    Outlet,
    PubAck,
    Publisher,
    Resync,
    last_stored,
)
from userstreamd.topology.nats.pull import PullError

pytestmark = pytest.mark.cluster


def user_at(position: int) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(synthetic_user("test", position)))


async def outlet(bus: Bus, last_seq: int) -> Outlet:
    """What a producer's session publishes into, at `last_seq`."""
    publisher = Publisher(bus)
    await bus.call(publisher.start)
    return Outlet(bus, last_seq, publisher)


async def publish(outlet: Outlet, first_position: int, count: int) -> None:
    """Queue `count` users and wait until the stream stored them (Resync if it refused)."""
    for position in range(first_position, first_position + count):
        outlet.publish_nowait(user_at(position), "synthetic", position)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.run)
        while outlet.stored_seq < outlet.last_seq:  # noqa: ASYNC110 (the outlet's own event)
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_stale_producer_is_fenced_and_the_stream_keeps_one_user_per_seq(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 10)
        stale = await outlet(bus, 5)  # a producer that missed seqs 6..10 (say, a lost lease)
        started = trio.current_time()
        with pytest.RaisesGroup(
            pytest.RaisesExc(Resync, match="wrong last sequence: 10"),
            allow_unwrapped=True,
            flatten_subgroups=True,
        ):
            await publish(stale, 106, 3)
        # The stream's refusal itself ends the batch (not a timeout waiting for answers).
        assert trio.current_time() - started < PUBLISH_TIMEOUT_S
        assert await last_stored(bus) == (10, 10)
        sixth = await bus.call(bus.js.get_msg, bus.stream, 6)
        assert msgspec.json.decode(sixth.data or b"")["position"] == 6
        assert (sixth.headers or {})["Nats-Msg-Id"] == f"{bus.epoch}:6"
        # From the stream's last message, a session goes on with no gap.
        await publish(await outlet(bus, 10), 11, 5)
        assert await last_stored(bus) == (15, 15)


class UnansweredOnce(Publisher):
    """Publishes every batch; the first one's answers are lost on the way back (a node
    lost mid-flight): stored, but the outlet cannot know it."""

    lost = False

    async def publish(self, batch: list[Entry]) -> list[PubAck | None]:
        answers = await super().publish(batch)
        if not self.lost:
            self.lost = True
            raise TimeoutError("no answer")
        return answers


async def positions(bus: Bus) -> list[int]:
    first, last = await bus.bounds()
    found = []
    for seq in range(first, last + 1):
        message = await bus.call(bus.js.get_msg, bus.stream, seq)
        found.append(msgspec.json.decode(message.data or b"")["position"])
    return found


async def test_a_batch_whose_answers_are_lost_stores_nothing_twice_when_sent_again(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        publisher = UnansweredOnce(bus)
        await bus.call(publisher.start)
        with pytest.RaisesGroup(
            pytest.RaisesExc(Resync, match="batch from seq 1"),
            allow_unwrapped=True,
            flatten_subgroups=True,
        ):
            await publish(Outlet(bus, 0, publisher), 1, 10)
        assert await last_stored(bus) == (10, 10)  # (stored, though unanswered)
        # The same batch again (same seqs, same Nats-Msg-Id): the stream answers each as
        # a duplicate at its seq, so the outlet counts it stored; nothing is added.
        again = Outlet(bus, 0, publisher)
        await publish(again, 1, 10)
        assert again.stored_seq == 10
        # A session goes on after the last stored (`run_producer` after a Resync).
        await publish(await outlet(bus, 10), 11, 5)
        assert await positions(bus) == list(range(1, 16))


async def test_the_acks_of_a_batch_all_arrive_and_the_floor_reaches_its_last_seq(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 300)
        pull = await bus.call(_bind, bus, "db", 1000, 1, 500)
        messages: list[Any] = []
        with trio.fail_after(10):
            while len(messages) < 300:
                try:
                    messages += await bus.call(pull.take)
                except PullError:  # (503: the new durable's leader not elected yet)
                    await trio.sleep(0.1)
        await bus.call(_ack, bus, [m.reply for m in messages[:200]])
        info: Any = None

        async def floor_at(seq: int) -> None:
            nonlocal info
            with trio.fail_after(10):
                while True:
                    info = await bus.call(bus.js.consumer_info, bus.stream, "db")
                    if info.ack_floor.stream_seq == seq:
                        return
                    await trio.sleep(0.05)

        await floor_at(200)
        assert info.num_ack_pending == 100  # (the rest still held, not acknowledged)
        await bus.call(_ack, bus, [m.reply for m in messages[200:]])
        await floor_at(300)
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
        await bus.quietly(pull.stop)


async def test_a_stream_that_never_had_a_user_starts_at_position_1(nats_config: Any) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await bus.call(bus.js.publish, bus.subject, b"a stranger's")  # seq 1
        assert await last_stored(bus) == (1, 0)
        await publish(await outlet(bus, 1), 1, 3)
        assert await last_stored(bus) == (4, 3)


async def test_a_session_starts_after_the_last_user_whatever_else_ends_the_stream(
    nats_config: Any,
) -> None:
    """Garbage, a user of another seq, or nothing at all (purged, or expired by
    max_age_s) at the end: the next user still goes right after the last seq."""
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 5)
        await bus.call(bus.js.publish, bus.subject, b"garbage")  # seq 6
        assert await last_stored(bus) == (6, 5)
        await bus.call(bus.js.publish, bus.subject, b'{"epoch":"x","seq":7,"position":2}')
        assert await last_stored(bus) == (7, 5)
        await publish(await outlet(bus, 7), 6, 2)  # seqs 8, 9: positions 6, 7
        assert await last_stored(bus) == (9, 7)
        await bus.call(bus.js.purge_stream, bus.stream)
        assert await last_stored(bus) == (9, 9)  # (no user left: the seq stands for it)
        await publish(await outlet(bus, 9), 10, 1)
        assert await last_stored(bus) == (10, 10)
        mirror = StreamMirror(bus, config.broadcaster)  # (nor does a mirror wait for them)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                hub = await nursery.start(mirror.run)
            nursery.cancel_scope.cancel()
        assert hub.last_seq == 10


async def test_the_lease_has_one_holder_and_passes_to_the_standby_when_given_back(
    nats_config: Any,
) -> None:
    config = nats_config()
    holders: list[str] = []
    async with open_bus(config, "test") as bus:
        first_done = trio.Event()

        async def hold(name: str, until: trio.Event) -> None:
            async with hold_lease(bus, name):
                holders.append(name)
                await until.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "first", first_done)
            await eventually(lambda: holders == ["first"], 10)
            nursery.start_soon(hold, "second", trio.Event())
            await trio.sleep(3 * config.cluster.lease_ttl_s)  # renewed meanwhile
            assert holders == ["first"]
            first_done.set()
            with trio.fail_after(config.cluster.lease_ttl_s):  # given back, not expired
                await eventually(lambda: holders == ["first", "second"])
            nursery.cancel_scope.cancel()


async def test_a_mirror_keeps_a_foreign_message_as_a_hole_clients_are_told_of(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 5)
        await bus.call(bus.js.publish, bus.subject, b"not a user")  # seq 6
        await bus.call(bus.js.publish, bus.subject, b'{"type":"user","seq":1}')  # seq 7
        await publish(await outlet(bus, 7), 6, 3)  # seqs 8..10
        await bus.call(bus.js.publish, bus.subject, b"[]")  # seq 11: the last one
        mirror = StreamMirror(bus, config.broadcaster)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                hub = await nursery.start(mirror.run)
            nursery.cancel_scope.cancel()
    assert (hub.epoch, hub.last_seq, mirror.foreign) == (bus.epoch, 11, 3)
    assert hub.published == {"synthetic": 8}
    behind = hub.subscribe("test", since=(bus.epoch, 3))
    assert behind.gap is None  # (the buffer still holds everything after seq 3)
    frames = [msgspec.json.decode(f) for f in hub.next_frames_nowait(behind, 10) or []]
    assert [(f["type"], f.get("seq", f.get("from_seq"))) for f in frames] == [
        ("user", 4),
        ("user", 5),
        ("gap", 6),
        ("gap", 7),
        ("user", 8),
        ("user", 9),
        ("user", 10),
        ("gap", 11),
    ]
    # A client that asked for users frames gets the holes on their own, in order.
    packed = [
        msgspec.json.decode(f) for f in _in_frames([e.frame for e in hub._entries.values()][3:], 10)
    ]
    assert [f["type"] for f in packed] == ["users", "gap", "gap", "users", "gap"]


async def test_consumers_store_each_seq_once_ack_a_foreign_message_and_checkpoint(
    tmp_path: Path, dsn: str, nats_config: Any
) -> None:
    config = nats_config(consumers={"count": 2, "batch_size": 50})
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 300)
        await bus.call(bus.js.publish, bus.subject, b"\xff garbage")  # seq 301
        await publish(await outlet(bus, 301), 301, 99)  # seqs 302..400
        daemon = Daemon(config, role="consumer")

        def checkpoints() -> list[tuple[Any, ...]]:
            return query(dsn, "SELECT group_name, epoch, seq, position FROM stream_checkpoints")

        async def until_committed() -> None:
            await eventually(lambda: daemon.counts().committed_total == 400, 30)
            # (written with a batch, or alone once the group is idle)
            await eventually(lambda: [c[2] for c in checkpoints()] == [400], 10)
            text = daemon.metrics.exposition()[0].decode()  # (this node published nothing)
            assert 'userstreamd_users_committed_total{source="synthetic"} 399.0' in text

        assert await run_until(daemon, until_committed) == 0
    seqs = [s for (s,) in query(dsn, "SELECT seq FROM incoming_users ORDER BY seq")]
    assert seqs == [*range(1, 301), *range(302, 401)]
    assert sum(c.foreign for c in daemon.topology.receivers) == 1
    assert daemon.counts().rejected == {"unknown": 1}
    assert checkpoints() == [("db", bus.epoch, 400, 399)]  # (position: seq 301 was no user)


async def test_a_durable_consumer_made_anew_starts_after_the_stored_checkpoint(
    dsn: str, nats_config: Any
) -> None:
    config = nats_config(consumers={"count": 1})
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 100)
        store = PostgresStore(dsn, application_name="test")
        store.migrate()
        store.insert_users([], StreamCheckpoint("db", bus.epoch, 60, 60))
        store.close()
        daemon = Daemon(config, role="consumer")

        async def until_committed() -> None:
            await eventually(lambda: daemon.counts().committed_total == 40, 30)

        assert await run_until(daemon, until_committed) == 0
    assert query(dsn, "SELECT min(seq), max(seq), count(*) FROM incoming_users") == [(61, 100, 40)]


async def test_a_durable_consumer_deleted_under_running_consumers_is_made_again(
    dsn: str, nats_config: Any
) -> None:
    config = nats_config(consumers={"count": 1})
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 100)
        daemon = Daemon(config, role="consumer")

        async def delete_then_more() -> None:
            await eventually(lambda: daemon.counts().committed_total == 100, 30)
            await bus.call(bus.js.delete_consumer, bus.stream, "db")
            await publish(await outlet(bus, 100), 101, 50)
            await eventually(lambda: daemon.committed_through() == 150, 30)

        assert await run_until(daemon, delete_then_more) == 0
    assert query(dsn, "SELECT min(seq), max(seq), count(*) FROM incoming_users") == [(1, 150, 150)]


async def test_role_all_on_nats_streams_positions_in_order_into_the_table(
    dsn: str, nats_config: Any
) -> None:
    config = nats_config(
        producer={"rate_per_s": 500.0, "stop_at_position": 800}, consumers={"count": 2}
    )
    daemon = Daemon(config)

    async def until_committed() -> None:
        await eventually(lambda: daemon.counts().committed_total == 800, 30)
        text = daemon.metrics.exposition()[0].decode()
        assert 'userstreamd_users_broadcast_total{source="synthetic"} 800.0' in text
        assert 'userstreamd_users_committed_total{source="synthetic"} 800.0' in text
        assert "userstreamd_end_to_end_latency_seconds_count 800.0" in text
        checks = daemon.readiness().checks
        assert checks == {
            "daemon": "ok",
            "database": "ok",
            "broadcaster": "ok",
            "nats": "ok",
            "consumers": "ok",
        }

    assert await run_until(daemon, until_committed) == 0
    assert daemon.topology.bus is not None
    epoch = daemon.topology.bus.epoch
    rows = query(dsn, "SELECT seq, uuid::text FROM incoming_users ORDER BY seq")
    assert rows == [(p, synthetic_user(epoch, p)["login"]["uuid"]) for p in range(1, 801)]


async def test_a_broadcaster_alone_needs_neither_database_nor_consumers(
    tmp_path: Path, nats_config: Any
) -> None:
    config = nats_config(database={"dsn": "postgresql://nobody@127.0.0.1:1/none"})
    daemon = Daemon(config, role="broadcaster")

    async def ready() -> None:
        assert daemon.readiness().checks == {
            "daemon": "ok",
            "broadcaster": "ok",
            "nats": "ok",
        }

    assert await run_until(daemon, ready) == 0


async def test_a_changed_lease_ttl_changes_the_buckets_ttl(nats_config: Any) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus, hold_lease(bus, "first"):
        pass
    longer = nats_config(cluster={"lease_ttl_s": 3.0})
    async with open_bus(longer, "test") as bus, hold_lease(bus, "second"):
        info = await bus.call(bus.js.stream_info, f"KV_{bus.stream}_lease")
    assert info.config.max_age == 3.0
