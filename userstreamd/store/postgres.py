"""The PostgreSQL side: versioned migrations and the idempotent batch writer.

psycopg's async API is asyncio-only, so this module is plain blocking code; callers run
it with ``trio.to_thread.run_sync`` on one connection per worker. psycopg errors become
`StoreError` here.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import psycopg

from ..errors import StoreError
from ..records import User

_MIGRATION_LOCK = 0x75_73_72_64  # "usrd": serialises concurrent migrators

# The columns a row fills, in the order `row_values` returns them.
# fmt: off
COLUMNS: tuple[str, ...] = (
    "uuid", "seq", "epoch", "source", "gender", "title",
    "first_name", "last_name", "email", "username", "phone", "cell",
    "street_number", "street_name", "city", "state", "country", "postcode",
    "latitude", "longitude", "timezone_offset", "dob", "age", "registered",
    "id_name", "id_value", "nat", "picture_large", "picture_medium", "picture_thumb",
    "produced_at", "received_at", "raw",
)
# fmt: on
_NAMES = ", ".join(COLUMNS)
# A batch is COPYed into a per-connection temporary table, then moved with one
# INSERT ... ON CONFLICT DO NOTHING: about five times the rows/s of a multi-row INSERT
# (see `userstreamd bench`), still one transaction per batch.
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming_users_batch "
    "(LIKE incoming_users INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COPY = f"COPY incoming_users_batch ({_NAMES}) FROM STDIN"
_MOVE = (
    f"INSERT INTO incoming_users ({_NAMES}) SELECT {_NAMES} FROM incoming_users_batch "
    "ON CONFLICT (uuid) DO NOTHING"
)

_CHECKPOINT = """INSERT INTO stream_checkpoints (group_name, epoch, seq, position)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_name, epoch) DO UPDATE
SET seq = excluded.seq, position = excluded.position, updated_at = now()
WHERE stream_checkpoints.seq < excluded.seq"""

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class StreamCheckpoint:
    """Every user of `group` up to `seq` (source `position`) in `epoch` is committed."""

    group: str
    epoch: str
    seq: int
    position: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """Where a user came from: the stream position and the two clocks."""

    seq: int
    epoch: str
    source: str
    produced_at: datetime
    received_at: datetime


def row_values(user: User, raw: dict[str, Any], env: Envelope) -> tuple[Any, ...]:
    """The values of one row, in COLUMNS order."""
    name, loc, street = user.name, user.location, user.location and user.location.street
    pic, doc = user.picture, user.id
    postcode = None if loc is None or loc.postcode is None else str(loc.postcode)
    return (
        user.login.uuid,
        env.seq,
        env.epoch,
        env.source,
        user.gender,
        name and name.title,
        name and name.first,
        name and name.last,
        user.email,
        user.login.username,
        user.phone,
        user.cell,
        street and street.number,
        street and street.name,
        loc and loc.city,
        loc and loc.state,
        loc and loc.country,
        postcode,
        user.latitude,
        user.longitude,
        loc and loc.timezone and loc.timezone.offset,
        user.dob and user.dob.date,
        user.dob and user.dob.age,
        user.registered and user.registered.date,
        doc and doc.name,
        doc and doc.value,
        user.nat,
        pic and pic.large,
        pic and pic.medium,
        pic and pic.thumbnail,
        env.produced_at,
        env.received_at,
        _json.encode(raw).decode(),
    )


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    found = []
    for entry in importlib.resources.files(__package__).joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


@contextmanager
def _mapped(action: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        # Connection trouble is worth retrying; a refusal of the data itself is not.
        transient = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        raise StoreError(
            f"{action}: {type(exc).__name__}: {str(exc).strip()[:500]}", transient=transient
        ) from exc


def _without_nul(json_text: str) -> str:
    """jsonb cannot hold \\u0000: keep it visible as those six characters instead."""
    return json_text.replace("\\u0000", "\\\\u0000")


class PostgresStore:
    """One connection; reconnects lazily after a failure."""

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        application_name: str = "userstreamd",
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._kwargs: dict[str, Any] = {
            "application_name": application_name,
            "connect_timeout": max(1, round(connect_timeout_s)),
        }
        if password:
            self._kwargs["password"] = password
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            with _mapped("connect"):
                self._conn = psycopg.connect(self._dsn, **self._kwargs)
        return self._conn

    def _run(self, action: str, work: Any) -> Any:
        conn = self._connection()
        try:
            with _mapped(action), conn.transaction():
                return work(conn)
        except StoreError:
            if conn.broken or conn.closed:
                self.close()
            raise

    def migrate(self) -> list[int]:
        """Apply the migrations this database has not seen; return their versions."""

        def work(conn: psycopg.Connection[Any]) -> list[int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, name, sql in migrations():
                if version not in done:
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                    applied.append(version)
            return applied

        return self._run("migrate", work)

    def insert_users(
        self, rows: Sequence[tuple[Any, ...]], checkpoint: StreamCheckpoint | None = None
    ) -> int:
        """Insert a batch, and the group's checkpoint, in one transaction; return the rows
        actually new (a uuid already in the table is skipped)."""

        def work(conn: psycopg.Connection[Any]) -> int:
            inserted = 0
            if rows:
                with conn.cursor() as cur:
                    cur.execute(_STAGE)
                    with cur.copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                    inserted = cur.execute(_MOVE).rowcount
            if checkpoint is not None:
                conn.execute(
                    _CHECKPOINT,
                    (checkpoint.group, checkpoint.epoch, checkpoint.seq, checkpoint.position),
                )
            return inserted

        if not rows and checkpoint is None:
            return 0
        return self._run("insert", work)

    def begin_stream(self, epoch: str, seed: str, source: str) -> None:
        """Record a new epoch and what regenerates it."""
        self._run(
            "begin stream",
            lambda conn: conn.execute(
                "INSERT INTO streams (epoch, seed, source) VALUES (%s, %s, %s)",
                (epoch, seed, source),
            ),
        )

    def last_checkpoint(self, group: str) -> tuple[StreamCheckpoint, str, str] | None:
        """The group's newest checkpoint with its stream's seed and source, if any."""
        row = self._run(
            "read checkpoint",
            lambda conn: conn.execute(
                """SELECT c.epoch, c.seq, c.position, s.seed, s.source
               FROM stream_checkpoints c JOIN streams s USING (epoch)
               WHERE c.group_name = %s ORDER BY c.updated_at DESC LIMIT 1""",
                (group,),
            ).fetchone(),
        )
        if row is None:
            return None
        epoch, seq, position, seed, source = row
        return StreamCheckpoint(group, epoch, seq, position), seed, source

    def insert_dead_letters(self, letters: Sequence[tuple[str, int | None, str, Any]]) -> int:
        """Store (source, position, error, raw) of records that failed validation."""
        rows = [
            (source, position, error, _without_nul(_json.encode(raw).decode()))
            for source, position, error, raw in letters
        ]

        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO dead_letters (source, position, error, raw) "
                    "VALUES (%s, %s, %s, %s::jsonb)",
                    rows,
                )
            return len(rows)

        return self._run("insert dead letters", work)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run("query", lambda conn: conn.execute(sql, params).fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
