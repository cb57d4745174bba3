"""Migrations and the idempotent batch insert against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from userstreamd.errors import StoreError
from userstreamd.records import parse_user
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import Envelope, PostgresStore, migrations, row_values

from .conftest import query


def _rows(positions: range, seed: str = "store") -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    rows = []
    for p in positions:
        raw = synthetic_user(seed, p)
        rows.append(row_values(parse_user(raw), raw, Envelope(p, "ep", "synthetic", now, now)))
    return rows


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
            ("randomuser", 3, "NUL", {"name": "a\x00b"}),
            ("randomuser", 4, "not an object", "just text"),
        ]
    )
    store.close()
    rows = query(dsn, "SELECT position, raw FROM dead_letters ORDER BY position")
    assert rows == [(3, {"name": "a\\u0000b"}), (4, "just text")]
