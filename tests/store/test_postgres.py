"""Migrations and the idempotent batch insert against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import psycopg
import pytest
import trio

from userstreamd.errors import StoreError
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store import postgres
from userstreamd.store.postgres import (
    COLUMNS,
    DeadLetter,
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    UserRow,
    migrations,
    row_values,
)
from userstreamd.stream.records import SECRET_LOGIN_FIELDS, parse_user

from ..conftest import query
from ..helpers import read_only, table_locked


def _rows(positions: range, seed: str = "store", at: datetime | None = None) -> list[UserRow]:
    now = at or datetime.now(UTC)
    rows = []
    for p in positions:
        raw = synthetic_user(seed, p)
        rows.append(row_values(parse_user(raw), raw, Envelope(p, "ep", "synthetic", now, now)))
    return rows


def test_a_row_is_typed_and_its_values_follow_the_columns() -> None:
    row = _rows(range(7, 8))[0]
    assert dict(zip(COLUMNS, row.values(), strict=True)) == {
        name: getattr(row, name) for name in COLUMNS
    }
    assert (row.seq, row.epoch, row.source) == (7, "ep", "synthetic")


def test_migrations_apply_once(dsn: str) -> None:
    store = PostgresStore(dsn)
    versions = [v for v, _, _ in migrations()]
    assert store.migrate() == versions
    assert store.migrate() == []
    assert query(dsn, "SELECT version FROM schema_migrations ORDER BY 1") == [
        (v,) for v in versions
    ]
    store.close()


def test_insert_is_idempotent_on_the_uuid(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    assert store.insert_users(_rows(range(1, 101))) == 100
    assert store.insert_users(_rows(range(51, 151))) == 50  # 51..100 already there
    assert store.insert_users([]) == 0
    assert query(
        dsn, "SELECT count(*), count(DISTINCT uuid), min(seq), max(seq) FROM incoming_users"
    ) == [(150, 150, 1, 150)]
    store.close()


def test_types_survive_the_round_trip(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    store.insert_users(_rows(range(1, 301)))
    kinds = query(
        dsn,
        "SELECT pg_typeof(postcode)::text, pg_typeof(latitude)::text, pg_typeof(dob)::text FROM incoming_users LIMIT 1",
    )
    assert kinds == [("text", "double precision", "timestamp with time zone")]
    # postcode text keeps leading zeros of string postcodes and the value of int ones
    for postcode, raw in query(dsn, "SELECT postcode, raw FROM incoming_users"):
        assert postcode == str(raw["location"]["postcode"])
    store.close()


def test_failures_become_store_errors_and_the_store_reconnects(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    store.insert_users(_rows(range(1, 3)))
    query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'userstreamd' AND pid <> pg_backend_pid()",
    )
    with pytest.raises(StoreError, match="insert"):
        store.insert_users(_rows(range(3, 5)))
    assert store.insert_users(_rows(range(3, 5))) == 2  # a fresh connection
    store.close()


def test_unreachable_server_is_a_store_error() -> None:
    store = PostgresStore("host=127.0.0.1 port=1 dbname=x user=x", connect_timeout_s=1)
    with pytest.raises(StoreError, match="connect"):
        store.migrate()


def test_dead_letters_keep_even_what_jsonb_refuses(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    store.insert_dead_letters(
        [
            DeadLetter("randomuser", 3, None, "NUL", {"name": "a\x00b"}),
            DeadLetter("randomuser", 4, None, "not an object", "just text"),
            DeadLetter("consumer", None, 17, "refused", {"login": {"uuid": "x"}}),
        ]
    )
    store.close()
    rows = query(dsn, "SELECT source, position, seq, raw FROM dead_letters ORDER BY id")
    assert rows == [
        ("randomuser", 3, None, {"name": "a\\u0000b"}),
        ("randomuser", 4, None, "just text"),
        ("consumer", None, 17, {"login": {"uuid": "x"}}),
    ]


def test_dead_letters_never_keep_the_fake_credentials(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    raw = synthetic_user("letters", 1)
    assert set(SECRET_LOGIN_FIELDS) <= set(raw["login"])
    store.insert_dead_letters([DeadLetter("randomuser", 1, None, "bad", raw)])
    store.close()
    [(login,)] = query(dsn, "SELECT raw->'login' FROM dead_letters")
    assert set(login) == {"uuid", "username"}
    assert set(SECRET_LOGIN_FIELDS) <= set(raw["login"]), "the caller's record is untouched"


def test_a_stream_position_holds_one_user_whatever_the_source(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    assert store.insert_users(_rows(range(1, 6), seed="api")) == 5
    # A restart regenerates 4..8 from the other source: other users at the same seqs.
    assert store.insert_users(_rows(range(4, 9), seed="fallback")) == 3
    # Two users for one seq within one batch: one of them.
    assert store.insert_users(_rows(range(9, 10), seed="a") + _rows(range(9, 10), seed="b")) == 1
    store.close()
    rows = query(dsn, "SELECT seq, uuid::text FROM incoming_users ORDER BY seq")
    assert [seq for seq, _ in rows] == list(range(1, 10))
    expected = [synthetic_user("api", p) for p in range(1, 6)]
    expected += [synthetic_user("fallback", p) for p in range(6, 9)]
    assert [uuid for _, uuid in rows[:8]] == [u["login"]["uuid"] for u in expected]
    assert rows[8][1] in {synthetic_user(seed, 9)["login"]["uuid"] for seed in "ab"}


def test_migration_005_keeps_the_first_user_of_each_position(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = migrations()
    store = PostgresStore(dsn)
    with monkeypatch.context() as m:  # the schema as it was: (epoch, seq) not yet unique
        m.setattr(postgres, "migrations", lambda: [x for x in every if x[0] < 5])
        store.migrate()
    _execute(
        dsn, "ALTER TABLE incoming_users ADD COLUMN position bigint"
    )  # (006's, for the writer)
    first = datetime.now(UTC) - timedelta(hours=1)
    assert store.insert_users(_rows(range(1, 11), seed="api", at=first)) == 10
    assert store.insert_users(_rows(range(6, 16), seed="fallback")) == 10  # 6..10 twice
    assert query(dsn, "SELECT count(*) FROM incoming_users") == [(20,)]
    assert 5 in store.migrate()
    store.close()
    rows = query(dsn, "SELECT seq, uuid::text FROM incoming_users ORDER BY seq")
    kept = [synthetic_user("api", p) for p in range(1, 11)]
    kept += [synthetic_user("fallback", p) for p in range(11, 16)]
    assert rows == [(p, u["login"]["uuid"]) for p, u in enumerate(kept, 1)]


async def test_a_statement_blocked_past_the_timeout_is_a_transient_store_error(
    dsn: str,
) -> None:
    store = PostgresStore(dsn, statement_timeout_s=0.2)
    await trio.to_thread.run_sync(store.migrate)  # migrations are not bounded by it
    with trio.fail_after(30):
        async with table_locked(dsn, "incoming_users"):
            with pytest.raises(StoreError, match="statement timeout") as caught:
                await trio.to_thread.run_sync(store.insert_users, _rows(range(1, 3)))
        assert caught.value.transient
        assert await trio.to_thread.run_sync(store.insert_users, _rows(range(1, 3))) == 2
    store.close()


def _execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql)


def _stagings_counted(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each staging-table set-up that commits adds a row to ``stagings``."""
    _execute(dsn, "CREATE TABLE stagings (n serial)")
    monkeypatch.setattr(
        postgres, "_STAGE", (*postgres._STAGE, "INSERT INTO stagings DEFAULT VALUES")
    )


def test_the_staging_table_is_made_once_per_connection(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    _stagings_counted(dsn, monkeypatch)
    assert store.insert_users(_rows(range(1, 101))) == 100
    assert store.insert_users(_rows(range(101, 201))) == 100
    assert store.insert_users([], StreamCheckpoint("db", "ep", 200, 200)) == 0
    assert query(dsn, "SELECT count(*) FROM stagings") == [(1,)]
    query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'userstreamd' AND pid <> pg_backend_pid()",
    )
    with pytest.raises(StoreError, match="insert") as lost:
        store.insert_users(_rows(range(201, 301)))
    assert lost.value.transient
    assert store.insert_users(_rows(range(151, 301))) == 100  # a new connection, a new table
    assert store.insert_users(_rows(range(301, 311))) == 10
    store.close()
    assert query(dsn, "SELECT count(*) FROM stagings") == [(2,)]
    assert query(
        dsn, "SELECT count(*), count(DISTINCT uuid), min(seq), max(seq) FROM incoming_users"
    ) == [(310, 310, 1, 310)]


def test_a_refused_first_batch_does_not_take_the_staging_table_with_it(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    _execute(dsn, "ALTER TABLE incoming_users ADD CONSTRAINT no_bob CHECK (first_name <> 'Bob')")
    rows = _rows(range(1, 11))
    bob = msgspec.structs.replace(rows[4], first_name="Bob")
    with pytest.raises(StoreError, match="no_bob") as refused:  # rolls the table back too
        store.insert_users([*rows[:4], bob, *rows[5:]])
    assert not refused.value.transient
    assert store.insert_users(rows[:4] + rows[5:]) == 9  # the same connection
    store.close()


def test_a_value_copy_cannot_send_is_a_refusal_not_a_crash(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    rows = _rows(range(1, 4))
    with pytest.raises(StoreError) as refused:
        store.insert_users([rows[0], msgspec.structs.replace(rows[1], latitude="north")])
    assert not refused.value.transient  # retrying cannot help: the row goes to dead letters
    assert store.insert_users(rows) == 3
    store.close()


def test_a_date_without_a_zone_is_stored_as_utc(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    raw = synthetic_user("naive", 1)
    raw["dob"]["date"] = "1990-01-02T03:04:05"
    at = datetime(2026, 1, 2, 3, 4, 5)  # a clock without a zone
    row = row_values(parse_user(raw), raw, Envelope(1, "ep", "synthetic", at, at))
    assert store.insert_users([row]) == 1
    store.close()
    [(dob, produced_at)] = query(dsn, "SELECT dob, produced_at FROM incoming_users")
    assert dob == datetime(1990, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert produced_at == at.replace(tzinfo=UTC)


def test_the_raw_record_may_be_given_as_json_text(dsn: str) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    raw = synthetic_user("text", 1)
    text = msgspec.json.encode(raw).decode()
    now = datetime.now(UTC)
    row = row_values(parse_user(raw), text, Envelope(1, "ep", "synthetic", now, now))
    assert row.raw == text
    assert store.insert_users([row]) == 1
    store.close()
    assert query(dsn, "SELECT raw FROM incoming_users") == [(raw,)]


@pytest.mark.parametrize(
    ("sqlstate", "fault"),
    [("25006", "transient"), ("40P01", "transient"), ("23514", "row"), ("XX000", "unknown")],
)
def test_a_store_error_carries_the_fault_its_sqlstate_names(
    dsn: str, sqlstate: str, fault: str
) -> None:
    """psycopg's class does not decide: 25006 arrives as an InternalError, like XX000."""
    store = PostgresStore(dsn)
    store.migrate()
    _refuse_inserts(dsn, sqlstate)
    with pytest.raises(StoreError) as caught:
        store.insert_users(_rows(range(1, 3)))
    assert (caught.value.fault, caught.value.sqlstate) == (fault, sqlstate)
    store.close()


def _refuse_inserts(dsn: str, sqlstate: str) -> None:
    """Every insert into incoming_users fails with `sqlstate` (a statement trigger)."""
    _execute(
        dsn,
        f"""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused as %', '{sqlstate}' USING ERRCODE = '{sqlstate}'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON incoming_users
        FOR EACH STATEMENT EXECUTE FUNCTION refuse()""",
    )


def test_a_read_only_server_is_transient_and_the_next_attempt_connects_again(
    dsn: str, pg_server: str
) -> None:
    """A database made read-only as a failover makes it (sessions ended, new ones
    read-only): the insert fails as transient and closes its connection, so the attempt
    after the server is writable again succeeds on a new one."""
    store = PostgresStore(dsn)
    store.migrate()
    assert store.insert_users(_rows(range(1, 3))) == 2
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    read_only(pg_server, dbname, True)
    try:
        for _ in range(2):  # the session ended by the failover (57P01), then a read-only one
            with pytest.raises(StoreError) as caught:
                store.insert_users(_rows(range(3, 5)))
            assert caught.value.transient
        assert caught.value.sqlstate == "25006"
    finally:
        read_only(pg_server, dbname, False, terminate=False)
    assert store.insert_users(_rows(range(3, 5))) == 2  # (its session began read-only)
    store.close()
