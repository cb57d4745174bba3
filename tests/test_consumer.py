"""Consumers against a real broadcaster and a real PostgreSQL, outages included."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import psycopg
import trio

from userstreamd.admission import Policy
from userstreamd.auth import Tokens
from userstreamd.broadcaster import run_broadcaster
from userstreamd.config import BroadcasterConfig
from userstreamd.consumer import Consumer
from userstreamd.hub import Hub
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import PostgresStore

from .conftest import query


def _block_connections(admin_dsn: str, dbname: str, blocked: bool) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {"false" if blocked else "true"}'
        )
        if blocked:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )


def _migrate(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    store.close()


def _own_group_hub() -> Hub:
    hub = Hub("e")
    hub.declare_group("db", holds_producer=True)  # as the daemon does
    return hub


async def _start_private(nursery: trio.Nursery, hub: Hub, tmp_path: Path) -> str:
    """The broadcaster as the daemon runs it; the consumers' URL (its private socket)."""
    policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    path = tmp_path / "b.sock"
    await nursery.start(
        partial(run_broadcaster, hub, "127.0.0.1", 0, BroadcasterConfig(), policy, path)
    )
    return f"ws+unix://{path}?group=db"


async def _wait_rows(dsn: str, count: int) -> None:
    sql = "SELECT count(*) FROM incoming_users"
    while (await trio.to_thread.run_sync(query, dsn, sql))[0][0] < count:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_database_outage_loses_nothing(dsn: str, pg_server: str, tmp_path: Path) -> None:
    _migrate(dsn)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    hub = _own_group_hub()
    consumer = Consumer("", PostgresStore(dsn), batch_size=20, batch_interval_s=0.05)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            for p in range(1, 51):
                hub.publish_nowait(synthetic_user("outage", p), "synthetic", p)
            await _wait_rows(dsn, 50)
            await trio.to_thread.run_sync(_block_connections, pg_server, dbname, True)
            for p in range(51, 151):
                hub.publish_nowait(synthetic_user("outage", p), "synthetic", p)
            while consumer.db_errors < 2:  # noqa: ASYNC110 (bounded by fail_after)
                await trio.sleep(0.05)
            await trio.to_thread.run_sync(_block_connections, pg_server, dbname, False)
            await _wait_rows(dsn, 150)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    uuids = {r[0] for r in query(dsn, "SELECT uuid::text FROM incoming_users")}
    assert uuids == {synthetic_user("outage", p)["login"]["uuid"] for p in range(1, 151)}
    assert consumer.statistics().acked_seq == 150


async def test_consumer_reconnects_after_the_broadcaster_restarts(dsn: str) -> None:
    _migrate(dsn)
    hub = _own_group_hub()
    consumer = Consumer(
        "", PostgresStore(dsn), batch_interval_s=0.05, reconnect_min_s=0.05, reconnect_max_s=0.2
    )

    async def broadcaster(
        scope: trio.CancelScope, port: int, task_status: trio.TaskStatus[int]
    ) -> None:
        with scope:
            await run_broadcaster(hub, "127.0.0.1", port, task_status=task_status)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()
            port = await nursery.start(broadcaster, first, 0)
            consumer.url = f"ws://127.0.0.1:{port}/?group=db"
            await nursery.start(consumer.run)
            hub.publish_nowait(synthetic_user("re", 1), "synthetic", 1)
            await _wait_rows(dsn, 1)
            first.cancel()
            while consumer.statistics().connected:  # noqa: ASYNC110 (bounded by fail_after)
                await trio.sleep(0.01)
            await nursery.start(broadcaster, trio.CancelScope(), port)
            while not consumer.statistics().connected:  # noqa: ASYNC110
                await trio.sleep(0.01)
            hub.publish_nowait(synthetic_user("re", 2), "synthetic", 2)
            await _wait_rows(dsn, 2)
            nursery.cancel_scope.cancel()
    assert consumer.statistics().reconnects >= 1


async def test_a_row_the_database_refuses_goes_to_dead_letters_and_the_rest_flows(
    dsn: str, tmp_path: Path
) -> None:
    _migrate(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE incoming_users ADD CONSTRAINT no_bob CHECK (first_name <> 'Bob')")
    users = [synthetic_user("refused", p) for p in range(1, 31)]
    users[9]["name"]["first"] = "Bob"  # valid for us, refused by the operator's constraint
    hub = _own_group_hub()
    consumer = Consumer("", PostgresStore(dsn), batch_size=50, batch_interval_s=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            for p, user in enumerate(users, 1):
                hub.publish_nowait(user, "synthetic", p)
            await hub.wait_drained()
            assert hub.watermark("db")[0] == 30, "the refused row does not hold the group up"
            nursery.cancel_scope.cancel()
    stored = {r[0] for r in query(dsn, "SELECT uuid::text FROM incoming_users")}
    assert stored == {u["login"]["uuid"] for i, u in enumerate(users) if i != 9}
    letters = query(dsn, "SELECT source, position, error, raw FROM dead_letters")
    assert len(letters) == 1
    source, position, error, raw = letters[0]
    assert (source, position) == ("consumer", 10) and "no_bob" in error
    assert raw["name"]["first"] == "Bob"


async def test_records_with_sql_or_script_in_them_are_stored_verbatim(
    dsn: str, tmp_path: Path
) -> None:
    _migrate(dsn)
    hostile = ["'); DROP TABLE incoming_users; --", "<script>alert(1)</script>", "Robert\\'); --"]
    users = [synthetic_user("verbatim", p) for p in range(1, 4)]
    for user, text in zip(users, hostile, strict=True):
        user["name"]["first"] = text
        user["location"]["city"] = text
    hub = _own_group_hub()
    consumer = Consumer("", PostgresStore(dsn), batch_size=10, batch_interval_s=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            for p, user in enumerate(users, 1):
                hub.publish_nowait(user, "synthetic", p)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    rows = query(
        dsn, "SELECT first_name, city, raw->'name'->>'first' FROM incoming_users ORDER BY seq"
    )
    assert rows == [(text, text, text) for text in hostile]
