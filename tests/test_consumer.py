"""Consumers against a real broadcaster and a real PostgreSQL, outages included."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import psycopg
import pytest
import trio
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from trio.testing import MockClock, wait_all_tasks_blocked
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from userstreamd.config import BroadcasterConfig, Config, ConsumersConfig, load_config
from userstreamd.consume.consumer import Consumer, Item, Milestones, make_consumer
from userstreamd.consume.receiver import WebSocketReceiver
from userstreamd.consume.writer import FINAL_FLUSH_S
from userstreamd.errors import InvalidRecord
from userstreamd.runtime import lifeline
from userstreamd.runtime.workers import READY, WORKER_DSN_ENV, run_consumer_worker
from userstreamd.serve.admission import Policy
from userstreamd.serve.auth import Tokens
from userstreamd.serve.broadcaster import run_broadcaster
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.calls import RetryPolicy
from userstreamd.store.postgres import (
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    UserRow,
    row_values,
)
from userstreamd.stream.client import CLOSE_SENT_S, CLOSE_WAIT_S
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import (
    Ack,
    UserMessage,
    Welcome,
    decode_client,
    encode,
    users_frame,
)
from userstreamd.stream.records import SECRET_LOGIN_FIELDS, decode_user, parse_user

from .conftest import query
from .helpers import eventually, read_only, table_locked, write_config

FAST = RetryPolicy(wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.01)


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
    return f"ws+unix://{path}?group=db&batch=100"  # users frames, as the daemon asks


async def _consume_all(
    users: list[dict[str, Any]], dsn: str, tmp_path: Path, *, batch_size: int
) -> Hub:
    """Publish `users` to a consumer on the private socket; return once all are acked."""
    hub = _own_group_hub()
    consumer = Consumer.websocket(
        "", PostgresStore(dsn), batch_size=batch_size, batch_interval_s=0.05
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            for p, user in enumerate(users, 1):
                hub.publish_nowait(user, "synthetic", p)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    return hub


async def _wait_rows(dsn: str, count: int, table: str = "incoming_users") -> None:
    sql = f"SELECT count(*) FROM {table}"
    with trio.fail_after(60):
        while (await trio.to_thread.run_sync(query, dsn, sql))[0][0] < count:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def _wait_logged(logs: list[dict[str, Any]], event: str, count: int = 1) -> None:
    await eventually(lambda: sum(e["event"] == event for e in logs) >= count)


async def test_database_outage_loses_nothing(dsn: str, pg_server: str, tmp_path: Path) -> None:
    _migrate(dsn)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    hub = _own_group_hub()
    consumer = Consumer.websocket(
        "", PostgresStore(dsn), batch_size=20, batch_interval_s=0.05, retry=FAST
    )
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
            await eventually(lambda: consumer.db_errors >= 2)
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
    consumer = Consumer.websocket(
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
            await eventually(lambda: not consumer.statistics().connected)
            await nursery.start(broadcaster, trio.CancelScope(), port)
            await eventually(lambda: consumer.statistics().connected)
            hub.publish_nowait(synthetic_user("re", 2), "synthetic", 2)
            await _wait_rows(dsn, 2)
            nursery.cancel_scope.cancel()
    assert consumer.statistics().reconnects >= 1


def _refusing_bob(dsn: str) -> list[dict[str, Any]]:
    """30 users; the operator's constraint refuses the 10th (valid for us). They keep the
    fake credentials, as with `keep_credentials = true`."""
    _migrate(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE incoming_users ADD CONSTRAINT no_bob CHECK (first_name <> 'Bob')")
    users = [synthetic_user("refused", p) for p in range(1, 31)]
    users[9]["name"]["first"] = "Bob"
    assert set(SECRET_LOGIN_FIELDS) <= set(users[9]["login"])
    return users


async def test_a_row_the_database_refuses_goes_to_dead_letters_and_the_rest_flows(
    dsn: str, tmp_path: Path
) -> None:
    users = _refusing_bob(dsn)
    hub = await _consume_all(users, dsn, tmp_path, batch_size=50)
    assert hub.watermark("db")[0] == 30, "the refused row does not hold the group up"
    assert hub.committed == {"synthetic": 29} and hub.rejected == {"synthetic": 1}  # /metrics
    stored = {r[0] for r in query(dsn, "SELECT uuid::text FROM incoming_users")}
    assert stored == {u["login"]["uuid"] for i, u in enumerate(users) if i != 9}
    letters = query(dsn, "SELECT source, position, seq, error, raw FROM dead_letters")
    assert len(letters) == 1
    source, position, seq, error, raw = letters[0]
    assert (source, position, seq) == ("consumer", None, 10) and "no_bob" in error
    assert raw["name"]["first"] == "Bob"
    assert not set(SECRET_LOGIN_FIELDS) & set(raw["login"]), "fake credentials in a dead letter"


async def test_a_dead_letter_write_that_fails_is_retried_not_fatal(
    dsn: str, tmp_path: Path
) -> None:
    users = _refusing_bob(dsn)
    hub = _own_group_hub()
    store = PostgresStore(dsn, statement_timeout_s=0.2)  # a blocked write fails, transiently
    consumer = Consumer.websocket("", store, batch_size=50, batch_interval_s=0.05, retry=FAST)
    with capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            async with table_locked(dsn, "dead_letters"):
                for p, user in enumerate(users, 1):
                    hub.publish_nowait(user, "synthetic", p)
                await _wait_logged(logs, "dead_letters.insert_failed", 2)
            await hub.wait_drained()
            await _wait_rows(dsn, 1, "dead_letters")
            nursery.cancel_scope.cancel()
    assert query(dsn, "SELECT seq FROM dead_letters") == [(10,)]
    assert query(dsn, "SELECT count(*) FROM incoming_users") == [(29,)]


@pytest.mark.parametrize("sqlstate", ["25006", "40P01", "53100", "XX000"])
async def test_a_batch_refused_for_the_moment_is_retried_never_dead_lettered(
    dsn: str, tmp_path: Path, sqlstate: str
) -> None:
    """Only the inserts into incoming_users fail (read-only, a deadlock, a full disk, an
    internal error), so a dead letter could be written: none is, nothing is acknowledged
    as rejected, and every row is stored once the fault ends."""
    _migrate(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(f"""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON incoming_users
            FOR EACH STATEMENT EXECUTE FUNCTION refuse()""")
    hub = _own_group_hub()
    consumer = Consumer.websocket("", PostgresStore(dsn), batch_size=10, retry=FAST)
    with capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            for p in range(1, 31):
                hub.publish_nowait(synthetic_user("moment", p), "synthetic", p)
            await _wait_logged(logs, "consumer.insert_failed", 3)
            await trio.to_thread.run_sync(_drop_trigger, dsn)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    assert hub.committed == {"synthetic": 30} and hub.rejected == {}
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(dsn, "SELECT count(DISTINCT seq) FROM incoming_users") == [(30,)]
    failed = [e for e in logs if e["event"] == "consumer.insert_failed"]
    assert {e["sqlstate"] for e in failed} == {sqlstate}
    level = "error" if sqlstate == "XX000" else "warning"  # unknown: an operator may be needed
    assert {e["log_level"] for e in failed} == {level}
    assert not [e for e in logs if e["event"] in ("consumer.batch_refused", "consumer.row_refused")]


def _drop_trigger(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TRIGGER refuse ON incoming_users")


async def test_a_database_made_read_only_is_waited_out(
    dsn: str, pg_server: str, tmp_path: Path
) -> None:
    """A failover to a hot standby, for this database alone: its sessions ended, new ones
    read-only (25006), then writable again."""
    _migrate(dsn)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    hub = _own_group_hub()
    consumer = Consumer.websocket("", PostgresStore(dsn), batch_size=10, retry=FAST)
    with capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            await trio.to_thread.run_sync(read_only, pg_server, dbname, True)
            try:
                for p in range(1, 31):
                    hub.publish_nowait(synthetic_user("standby", p), "synthetic", p)
                await eventually(
                    lambda: any(e.get("sqlstate") == "25006" for e in logs), timeout_s=30
                )
            finally:
                await trio.to_thread.run_sync(read_only, pg_server, dbname, False)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    assert hub.committed == {"synthetic": 30} and hub.rejected == {}
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(dsn, "SELECT count(DISTINCT seq) FROM incoming_users") == [(30,)]


async def test_a_blocked_database_is_reported_while_it_blocks(dsn: str, tmp_path: Path) -> None:
    _migrate(dsn)
    hub = _own_group_hub()
    store = PostgresStore(dsn, stall_warning_s=0.2)
    consumer = Consumer.websocket("", store, worker=3, batch_size=10, batch_interval_s=0.05)
    with capture_logs(processors=[merge_contextvars]) as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            consumer.url = await _start_private(nursery, hub, tmp_path)
            await nursery.start(consumer.run)
            async with table_locked(dsn, "incoming_users"):
                for p in range(1, 6):
                    hub.publish_nowait(synthetic_user("stall", p), "synthetic", p)
                await _wait_logged(logs, "database.stalled", 2)  # again at the interval
            await _wait_rows(dsn, 5)
            await hub.wait_drained()
            nursery.cancel_scope.cancel()
    stalled = [e for e in logs if e["event"] == "database.stalled"]
    assert stalled[0]["log_level"] == "warning"
    assert (stalled[0]["action"], stalled[0]["worker"]) == ("insert_users", 3)
    assert stalled[1]["waited_s"] > stalled[0]["waited_s"] >= 0.2
    [ended] = [e for e in logs if e["event"] == "database.stall_ended"]
    assert ended["ok"] is True and ended["waited_s"] >= stalled[-1]["waited_s"]
    assert consumer.statistics().inserted == 5


async def test_a_server_that_closes_at_once_is_retried_ever_more_slowly() -> None:
    """A handshake alone (a daemon stopping accepts, then closes with 1001) does not reset
    the reconnect backoff; only a connection that carried users does."""
    attempts = 0

    async def accept_and_close(request: WebSocketRequest) -> None:
        nonlocal attempts
        attempts += 1
        ws = await request.accept()
        await ws.aclose(1001, "stopping")

    consumer = Consumer.websocket(
        "", PostgresStore("host=127.0.0.1 port=1"), reconnect_min_s=0.1, reconnect_max_s=5.0
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, accept_and_close, "127.0.0.1", 0, None)
            consumer.url = f"ws://127.0.0.1:{server.port}/"
            nursery.start_soon(consumer.run)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
    # Backoff 0.1 s doubling, each sleep at least half: attempts start no earlier than
    # 0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15 s - at most 6 in 2 s (a reset each time: ~25).
    assert 2 <= attempts <= 6, attempts
    assert consumer.statistics().reconnects >= attempts - 1


async def test_records_with_sql_or_script_in_them_are_stored_verbatim(
    dsn: str, tmp_path: Path
) -> None:
    _migrate(dsn)
    hostile = ["'); DROP TABLE incoming_users; --", "<script>alert(1)</script>", "Robert\\'); --"]
    users = [synthetic_user("verbatim", p) for p in range(1, 4)]
    for user, text in zip(users, hostile, strict=True):
        user["name"]["first"] = text
        user["location"]["city"] = text
    await _consume_all(users, dsn, tmp_path, batch_size=10)
    rows = query(
        dsn, "SELECT first_name, city, raw->'name'->>'first' FROM incoming_users ORDER BY seq"
    )
    assert rows == [(text, text, text) for text in hostile]


# -- group commit, against a stand-in for the database (virtual time) ---------------------

NO_DB = "host=127.0.0.1 port=1"  # never reached: the tests below replace the insert


class FakeDatabase:
    """Takes the place of `Writer.insert`: records each batch's seqs and the virtual
    time it arrived; `hold` keeps the writer inside an insert until it is set."""

    def __init__(self, consumer: Consumer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[float, list[int]]] = []
        self.hold = trio.Event()
        self.hold.set()
        self.holding = trio.Event()
        monkeypatch.setattr(consumer.writer, "insert", self.insert)

    async def insert(self, rows: list[UserRow], checkpoint: StreamCheckpoint | None) -> int:
        self.batches.append((trio.current_time(), [row.seq for row in rows]))
        self.holding.set()
        await self.hold.wait()
        return len(rows)

    def seqs(self) -> list[list[int]]:
        return [seqs for _, seqs in self.batches]


def _item(seq: int) -> Item:
    raw = synthetic_user("group", seq)
    at = datetime.now(UTC)
    return seq, row_values(parse_user(raw), raw, Envelope(seq, "e", "synthetic", at, at))


def _writer(nursery: trio.Nursery, consumer: Consumer) -> trio.MemorySendChannel[Item]:
    send, receive = trio.open_memory_channel[Item](consumer.batch_size * 4)  # as `run`
    nursery.start_soon(consumer.writer.run, receive, consumer.receiver)
    return send


async def test_group_commit_writes_all_that_came_while_the_last_batch_was_written(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = Consumer.websocket("", PostgresStore(NO_DB), batch_size=50)
    db = FakeDatabase(consumer, monkeypatch)
    db.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        send = _writer(nursery, consumer)
        await send.send(_item(1))
        await db.holding.wait()  # the writer is busy with [1]: the rest queues up
        for seq in range(2, 81):
            await send.send(_item(seq))
        db.hold.set()
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # Each batch takes all that waited, up to batch_size; in order, each user once.
    assert db.seqs() == [[1], list(range(2, 52)), list(range(52, 81))]
    stats = consumer.statistics()
    assert (stats.batches, stats.inserted, stats.acked_seq) == (3, 80, 80)


async def test_a_lone_user_is_written_at_once_without_a_timer(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = Consumer.websocket("", PostgresStore(NO_DB), batch_size=500)  # batch_interval_s 0
    db = FakeDatabase(consumer, monkeypatch)
    sent_at = []
    async with trio.open_nursery() as nursery:
        send = _writer(nursery, consumer)
        for seq in range(1, 4):  # one user every 10 s
            sent_at.append(trio.current_time())
            await send.send(_item(seq))
            await trio.sleep(10)
        nursery.cancel_scope.cancel()
    # Written the (virtual) instant it arrived: no sleep, no linger.
    assert db.batches == list(zip(sent_at, [[1], [2], [3]], strict=True))


async def test_a_batch_interval_lingers_for_a_fuller_batch_and_no_longer(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = Consumer.websocket("", PostgresStore(NO_DB), batch_size=3, batch_interval_s=0.5)
    db = FakeDatabase(consumer, monkeypatch)
    async with trio.open_nursery() as nursery:
        send = _writer(nursery, consumer)
        start = trio.current_time()
        await send.send(_item(1))
        await trio.sleep(0.2)
        await send.send(_item(2))  # within the linger of 1
        await trio.sleep(0.7)
        await send.send(_item(3))  # after it: a linger of its own
        await trio.sleep(1.1)
        for seq in range(4, 8):  # a full batch does not wait; the one left over does
            await send.send(_item(seq))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [(pytest.approx(at - start), seqs) for at, seqs in db.batches] == [
        (0.5, [1, 2]),
        (1.4, [3]),
        (2.0, [4, 5, 6]),
        (2.5, [7]),
    ]


# -- users frames ----------------------------------------------------------------------


def test_a_member_asks_for_users_frames_of_at_most_its_batch() -> None:
    def query_of(batch_size: int) -> dict[str, list[str]]:
        config = Config(consumers=ConsumersConfig(batch_size=batch_size))
        consumer = make_consumer(config, "ws+unix:///run/b.sock", NO_DB, 1, Milestones(1))
        return parse_qs(urlsplit(consumer.url).query)

    assert query_of(200) == {"group": ["db"], "window": ["2000"], "batch": ["200"]}
    assert query_of(5000)["batch"] == ["1000"]  # what a broadcaster allows at most


def _frame(seq: int, user: Any) -> bytes:
    message = UserMessage(
        epoch="e",
        seq=seq,
        position=seq,
        produced_at=datetime.now(UTC),
        source="synthetic",
        user=user,
    )
    return encode(message).encode()


async def test_users_frames_are_stored_once_each_in_order_and_all_acked(dsn: str) -> None:
    _migrate(dsn)
    users: list[Any] = [synthetic_user("frames", p) for p in range(1, 10)]
    users[2] = {**users[2], "login": {"uuid": "not-a-uuid"}}  # invalid, inside a users frame
    users[4] = "not a record"
    frames = [_frame(seq, user) for seq, user in enumerate(users, 1)]
    sent = [users_frame(frames[0:6]), frames[6], users_frame(frames[7:9])]  # and a user frame
    acks: list[Ack] = []
    all_acked = trio.Event()

    async def server(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(encode(Welcome(epoch="e", seq=0, clients=1, group="db")))
        for frame in sent:
            await ws.send_message(frame.decode())
        while sum(len(ack.seqs) for ack in acks) < len(users):
            ack = decode_client(await ws.get_message())
            assert isinstance(ack, Ack)
            acks.append(ack)
        all_acked.set()
        await trio.sleep_forever()

    consumer = Consumer.websocket("", PostgresStore(dsn), batch_size=4)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(serve_websocket, server, "127.0.0.1", 0, None)
            consumer.url = f"ws://127.0.0.1:{listener.port}/"
            await nursery.start(consumer.run)
            await all_acked.wait()
            nursery.cancel_scope.cancel()
    assert [seq for ack in acks for seq in ack.seqs] == list(range(1, 10))  # once, in order
    assert sorted(seq for ack in acks for seq in ack.rejected) == [3, 5]
    stored = query(dsn, "SELECT seq, uuid::text, raw FROM incoming_users ORDER BY seq")
    expected = [(seq, u["login"]["uuid"], u) for seq, u in enumerate(users, 1) if seq not in {3, 5}]
    assert stored == expected
    stats = consumer.statistics()
    assert (stats.received, stats.invalid, stats.inserted, stats.acked_seq) == (9, 2, 7, 9)


LAURA = synthetic_user("laura", 1, ["IE"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["login"].pop("uuid"),
        lambda r: r.pop("login"),
        lambda r: r["login"].update(uuid="not-a-uuid"),
        lambda r: r["dob"].update(date="not-a-date"),
        lambda r: r["location"]["coordinates"].update(latitude="north"),
        lambda r: r["location"]["coordinates"].update(longitude="181"),
        lambda r: r["location"]["street"].update(number="twelve"),
        lambda r: r["location"]["street"].update(number=10**12),
        lambda r: r["name"].update(first="La\x00ura"),
        lambda r: r["location"].update(postcode="D02 X285"),  # valid: a string postcode
        lambda r: r["location"]["street"].update(number="12"),  # valid: lax, as parse_user
    ],
)
def test_the_consumer_validates_a_record_as_the_producer_does(
    mutate: Callable[[dict[str, Any]], object],
) -> None:
    raw = copy.deepcopy(LAURA)
    mutate(raw)
    try:
        expected: Any = parse_user(raw)
    except InvalidRecord as exc:
        expected = str(exc)
    try:
        got: Any = decode_user(msgspec.json.encode(raw))
    except InvalidRecord as exc:
        got = str(exc)
    assert got == expected


async def test_a_batch_before_the_first_checkpoint_logs_no_checkpoint_field(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22 item 11: the first inserts logged ``checkpoint=None``."""
    consumer = Consumer.websocket("", PostgresStore(NO_DB), batch_size=10)
    FakeDatabase(consumer, monkeypatch)
    receiver = consumer.receiver
    assert isinstance(receiver, WebSocketReceiver)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            send = _writer(nursery, consumer)
            await send.send(_item(1))
            await wait_all_tasks_blocked()
            receiver._checkpoint = StreamCheckpoint("db", "e", 1, 1)  # as a checkpoint frame
            await send.send(_item(2))
            await wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    first, second = [e for e in logs if e["event"] == "consumer.batch_inserted"]
    assert "checkpoint" not in first and first["seq"] == 1
    assert second["checkpoint"] == 1


async def test_an_idle_consumer_worker_stops_at_once_when_its_lifeline_ends(
    autojump_clock: MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22 item 15: a consumer process with nothing to commit, told to stop by its
    lifeline, took 2 s (the stream client waited for an answer to its close that its
    cancelled reader could never read). On the virtual clock: it stops within the time
    it takes to send the close, and none of the stop's timeouts runs out."""
    closes: list[int | None] = []

    async def server(request: WebSocketRequest) -> None:  # a welcome, then silence
        ws = await request.accept()
        await ws.send_message(encode(Welcome(epoch="e", seq=0, clients=1, group="db")))
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            closes.append(exc.reason.code if exc.reason else None)

    lifeline_read, lifeline_write = os.pipe()
    ready_read, ready_write = os.pipe()
    monkeypatch.setattr(lifeline, "watch", partial(lifeline.watch, fd=lifeline_read))
    monkeypatch.setenv(WORKER_DSN_ENV, NO_DB)  # (never reached: nothing to write)
    config = load_config(write_config(tmp_path, NO_DB))
    codes: list[int] = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(partial(serve_websocket, server, "127.0.0.1", 0, None))
            url = f"ws://127.0.0.1:{listener.port}/"

            stopped = trio.Event()

            async def worker() -> None:
                codes.append(await run_consumer_worker(config, 1, url, ready_write))
                stopped.set()

            nursery.start_soon(worker)
            async with trio.lowlevel.FdStream(ready_read) as ready:
                assert await ready.receive_some() == READY
            os.close(lifeline_write)  # the daemon stops it (or dies)
            closed_at = trio.current_time()
            await stopped.wait()
            stopped_s = trio.current_time() - closed_at
            nursery.cancel_scope.cancel()
    os.close(lifeline_read)
    assert codes == [0] and closes == [1000]  # it said goodbye, and exited 0
    assert stopped_s <= CLOSE_SENT_S < min(CLOSE_WAIT_S, FINAL_FLUSH_S)  # (virtual seconds)
    events = [e["event"] for e in logs]
    assert events[events.index("worker.lifeline_closed") :] == [
        "worker.lifeline_closed",
        "worker.stopped",
    ]
