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
from userstreamd.daemon import Daemon
from userstreamd.jetstream.bus import open_bus
from userstreamd.jetstream.lease import hold_lease
from userstreamd.jetstream.mirror import StreamMirror
from userstreamd.jetstream.outlet import Outlet, Resync, last_stored
from userstreamd.messages import Gap
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import PostgresStore, StreamCheckpoint

pytestmark = pytest.mark.cluster


def user_at(position: int) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(synthetic_user("test", position)))


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
        await publish(Outlet(bus, 0), 1, 10)
        stale = Outlet(bus, 5)  # a producer that missed seqs 6..10 (say, a lost lease)
        with pytest.RaisesGroup(Resync, allow_unwrapped=True, flatten_subgroups=True):
            await publish(stale, 106, 3)
        assert await last_stored(bus) == (10, 10)
        sixth = await bus.call(bus.js.get_msg, bus.stream, 6)
        assert msgspec.json.decode(sixth.data or b"")["position"] == 6
        assert (sixth.headers or {})["Nats-Msg-Id"] == f"{bus.epoch}:6"
        # From the stream's last message, a session goes on with no gap.
        await publish(Outlet(bus, 10), 11, 5)
        assert await last_stored(bus) == (15, 15)


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


async def test_a_mirror_skips_a_foreign_message_and_a_client_behind_it_is_told(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(Outlet(bus, 0), 1, 5)
        await bus.call(bus.js.publish, bus.subject, b"not a user")  # seq 6
        await bus.call(bus.js.publish, bus.subject, b'{"type":"user","seq":1}')  # seq 7
        await publish(Outlet(bus, 7), 6, 3)  # seqs 8..10
        mirror = StreamMirror(bus, config.broadcaster)
        async with trio.open_nursery() as nursery:
            hub = await nursery.start(mirror.run)
            assert hub.epoch == bus.epoch
            await eventually(lambda: hub.last_seq == 10, 10)
            nursery.cancel_scope.cancel()
    assert mirror.foreign == 2
    behind = hub.subscribe("test", since=(bus.epoch, 3))
    gap = behind.gap  # (what the broadcaster sends it first)
    assert isinstance(gap, Gap) and (gap.from_seq, gap.to_seq) == (4, 7)
    assert [msgspec.json.decode(f)["seq"] for f in hub.next_frames_nowait(behind, 10) or []] == [
        8,
        9,
        10,
    ]


async def test_consumers_store_each_seq_once_ack_a_foreign_message_and_checkpoint(
    tmp_path: Path, dsn: str, nats_config: Any
) -> None:
    config = nats_config(consumers={"count": 2, "batch_size": 50})
    async with open_bus(config, "test") as bus:
        await publish(Outlet(bus, 0), 1, 300)
        await bus.call(bus.js.publish, bus.subject, b"\xff garbage")  # seq 301
        await publish(Outlet(bus, 301), 301, 99)  # seqs 302..400
        daemon = Daemon(config, role="consumer")

        def checkpoints() -> list[tuple[Any, ...]]:
            return query(dsn, "SELECT group_name, epoch, seq, position FROM stream_checkpoints")

        async def until_committed() -> None:
            await eventually(lambda: daemon.counts().committed_total == 400, 30)
            # (written with a batch, or alone once the group is idle)
            await eventually(lambda: [c[2] for c in checkpoints()] == [400], 10)

        assert await run_until(daemon, until_committed) == 0
    seqs = [s for (s,) in query(dsn, "SELECT seq FROM incoming_users ORDER BY seq")]
    assert seqs == [*range(1, 301), *range(302, 401)]
    assert sum(c.foreign for c in daemon._stream_consumers()) == 1
    assert daemon.counts().rejected == {"unknown": 1}
    assert checkpoints() == [("db", bus.epoch, 400, 399)]  # (position: seq 301 was no user)


async def test_a_durable_consumer_made_anew_starts_after_the_stored_checkpoint(
    dsn: str, nats_config: Any
) -> None:
    config = nats_config(consumers={"count": 1})
    async with open_bus(config, "test") as bus:
        await publish(Outlet(bus, 0), 1, 100)
        store = PostgresStore(dsn, application_name="test")
        store.migrate()
        store.insert_users([], StreamCheckpoint("db", bus.epoch, 60, 60))
        store.close()
        daemon = Daemon(config, role="consumer")

        async def until_committed() -> None:
            await eventually(lambda: daemon.counts().committed_total == 40, 30)

        assert await run_until(daemon, until_committed) == 0
    assert query(dsn, "SELECT min(seq), max(seq), count(*) FROM incoming_users") == [(61, 100, 40)]


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
        checks = daemon.health.readiness().checks
        assert checks == {
            "daemon": "ok",
            "database": "ok",
            "broadcaster": "ok",
            "nats": "ok",
            "consumers": "ok",
        }

    assert await run_until(daemon, until_committed) == 0
    assert daemon.bus is not None
    epoch = daemon.bus.epoch
    rows = query(dsn, "SELECT seq, uuid::text FROM incoming_users ORDER BY seq")
    assert rows == [(p, synthetic_user(epoch, p)["login"]["uuid"]) for p in range(1, 801)]


async def test_a_broadcaster_alone_needs_neither_database_nor_consumers(
    tmp_path: Path, nats_config: Any
) -> None:
    config = nats_config(database={"dsn": "postgresql://nobody@127.0.0.1:1/none"})
    daemon = Daemon(config, role="broadcaster")

    async def ready() -> None:
        assert daemon.health.readiness().checks == {
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
