"""The PostgreSQL side: versioned migrations, the typed rows and the idempotent writer.

psycopg's async API is asyncio-only, so this module is plain blocking code; trio tasks
call it through `store.calls.StoreCalls` (a worker thread per connection, stall warnings,
retries). psycopg errors become `StoreError` here, their fault told by their SQLSTATE
(`faults`). Every statement is bounded by the server's ``statement_timeout`` and every
connection attempt by libpq's ``connect_timeout``: a statement blocked on a lock, or a
server that does not answer a connection, ends in a transient `StoreError`. A server
that stops answering mid-statement (SIGSTOP) times nothing out; that is what the
callers' stall watchdog reports.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg

from ..config import Config, DatabaseConfig
from ..errors import StoreError
from ..stream.records import User, scrub
from .faults import classify

_MIGRATION_LOCK = 0x75_73_72_64  # "usrd": serialises concurrent migrators


class UserRow(msgspec.Struct, frozen=True, gc=False):
    """One row of ``incoming_users``; the fields are the columns, in COLUMNS order."""

    uuid: UUID
    seq: int
    epoch: str
    source: str
    gender: str | None
    title: str | None
    first_name: str | None
    last_name: str | None
    email: str | None
    username: str
    phone: str | None
    cell: str | None
    street_number: int | None
    street_name: str | None
    city: str | None
    state: str | None
    country: str | None
    postcode: str | None
    latitude: float | None
    longitude: float | None
    timezone_offset: str | None
    dob: datetime | None
    age: int | None
    registered: datetime | None
    id_name: str | None
    id_value: str | None
    nat: str | None
    picture_large: str | None
    picture_medium: str | None
    picture_thumb: str | None
    produced_at: datetime
    received_at: datetime
    raw: str  # the record as JSON text
    position: int | None = None  # in its source (unknown: NULL)

    def values(self) -> tuple[Any, ...]:
        """The values in COLUMNS order (what COPY writes)."""
        return msgspec.structs.astuple(self)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record kept out of ``incoming_users``, with the reason. `position` is the
    source's (a record the producer could not validate), `seq` the stream's (a row the
    database refused); either may be unknown."""

    source: str
    position: int | None
    seq: int | None
    error: str
    raw: Any
    epoch: str | None = None  # with `seq`


COLUMNS: tuple[str, ...] = UserRow.__struct_fields__
_NAMES = ", ".join(COLUMNS)
# A batch is COPYed into a per-connection temporary table, then moved with one
# INSERT ... ON CONFLICT DO NOTHING: about five times the rows/s of a multi-row INSERT
# (see `userstreamd bench`), still one transaction per batch.
# - The table is made by the first insert on each connection (`_STAGE`, committed with
#   that batch; remade after a failed insert, which may have rolled it back), not when
#   connecting: migrations, probes and tools connect too, some before the table it copies
#   exists.
# - COPY is binary, in the staging table's own column types (`_STAGED_TYPES`): a third of
#   the client CPU per row of text COPY. `raw` is text there (binary COPY then needs no
#   JSON adapter) and becomes jsonb in the move.
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming_users_batch "
    "(LIKE incoming_users INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    "ALTER TABLE incoming_users_batch ALTER raw TYPE text",
)
_STAGED_TYPES = """SELECT a.atttypid::int
FROM unnest(%s::text[]) WITH ORDINALITY AS c (name, n)
JOIN pg_attribute a
  ON a.attrelid = 'pg_temp.incoming_users_batch'::regclass AND a.attname = c.name
ORDER BY c.n"""
_COPY = f"COPY incoming_users_batch ({_NAMES}) FROM STDIN (FORMAT BINARY)"
# No conflict target: a uuid already stored and a stream position (epoch, seq) already
# taken by another user are both skipped.
_MOVE = (
    f"INSERT INTO incoming_users ({_NAMES}) "
    f"SELECT {', '.join(c + '::jsonb' if c == 'raw' else c for c in COLUMNS)} "
    "FROM incoming_users_batch ON CONFLICT DO NOTHING"
)

_CHECKPOINT = """INSERT INTO stream_checkpoints (group_name, epoch, seq, position)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_name, epoch) DO UPDATE
SET seq = excluded.seq, position = excluded.position, updated_at = now()
WHERE stream_checkpoints.seq < excluded.seq"""

_json = msgspec.json.Encoder()
_DEFAULTS = DatabaseConfig()


@dataclass(frozen=True, slots=True)
class StreamCheckpoint:
    """Every user of `group` up to `seq` (source `position`) in `epoch` is committed."""

    group: str
    epoch: str
    seq: int
    position: int


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """Where a user came from: the stream position and the two clocks. (A struct: one
    is made per user received, and a frozen dataclass costs several times as much.)"""

    seq: int
    epoch: str
    source: str
    produced_at: datetime
    received_at: datetime
    position: int | None = None  # in its source


def row_values(user: User, raw: dict[str, Any] | str, env: Envelope) -> UserRow:
    """The row of one validated user (a part the record lacks gives NULL columns); `raw`
    is the record, or already its JSON text. A date without a zone is taken as UTC."""
    name, loc, pic, doc, dob = user.name, user.location, user.picture, user.id, user.dob
    reg = user.registered
    street = loc.street if loc else None
    zone = loc.timezone if loc else None
    return UserRow(
        uuid=user.login.uuid,
        seq=env.seq,
        epoch=env.epoch,
        source=env.source,
        gender=user.gender,
        title=name.title if name else None,
        first_name=name.first if name else None,
        last_name=name.last if name else None,
        email=user.email,
        username=user.login.username,
        phone=user.phone,
        cell=user.cell,
        street_number=street.number if street else None,
        street_name=street.name if street else None,
        city=loc.city if loc else None,
        state=loc.state if loc else None,
        country=loc.country if loc else None,
        postcode=None if loc is None or loc.postcode is None else str(loc.postcode),
        latitude=user.latitude,
        longitude=user.longitude,
        timezone_offset=zone.offset if zone else None,
        dob=_aware(dob.date) if dob else None,
        age=dob.age if dob else None,
        registered=_aware(reg.date) if reg else None,
        id_name=doc.name if doc else None,
        id_value=doc.value if doc else None,
        nat=user.nat,
        picture_large=pic.large if pic else None,
        picture_medium=pic.medium if pic else None,
        picture_thumb=pic.thumbnail if pic else None,
        produced_at=_aware(env.produced_at),
        received_at=_aware(env.received_at),
        raw=raw if isinstance(raw, str) else _json.encode(raw).decode(),
        position=env.position,
    )


def _aware(at: datetime) -> datetime:
    """Binary COPY cannot send a timestamptz without a zone (text COPY took the session's)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


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
        # By SQLSTATE (`faults`); without one, only a connection that failed is transient
        # (psycopg's own refusals of a call, a bug of ours, are not).
        lost = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        fault = classify(exc.sqlstate) if exc.sqlstate or lost else "unknown"
        raise StoreError(
            f"{action}: {type(exc).__name__}: {str(exc).strip()[:500]}",
            fault=fault,
            sqlstate=exc.sqlstate,
        ) from exc


def _without_nul(json_text: str) -> str:
    """jsonb cannot hold \\u0000: keep it visible as those six characters instead."""
    return json_text.replace("\\u0000", "\\\\u0000")


class PostgresStore:
    """One connection; reconnects lazily after a failure.

    `statement_timeout_s` (0: none) bounds every statement on the server; `stall_warning_s`
    is for the callers' watchdog (`StoreCalls`), which the server cannot bound (a stopped
    server does not time anything out)."""

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        application_name: str = "userstreamd",
        connect_timeout_s: float = _DEFAULTS.connect_timeout_s,
        statement_timeout_s: float = _DEFAULTS.statement_timeout_s,
        stall_warning_s: float = _DEFAULTS.stall_warning_s,
    ) -> None:
        self._dsn = dsn
        self._kwargs: dict[str, Any] = {
            "application_name": application_name,
            "connect_timeout": max(1, round(connect_timeout_s)),  # libpq: whole seconds
        }
        if password:
            self._kwargs["password"] = password
        self._statement_timeout = f"{round(statement_timeout_s * 1000)}ms"
        self.stall_warning_s = stall_warning_s
        self._conn: psycopg.Connection[Any] | None = None
        self._staged_types: list[int] | None = None  # this connection's staging table made

    @classmethod
    def from_config(cls, config: Config, dsn: str, *, application_name: str) -> PostgresStore:
        """A store with the password and the timeouts the config names."""
        d = config.database
        return cls(
            dsn,
            password=config.db_password(),
            application_name=application_name,
            connect_timeout_s=d.connect_timeout_s,
            statement_timeout_s=d.statement_timeout_s,
            stall_warning_s=d.stall_warning_s,
        )

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            with _mapped("connect"):
                conn = psycopg.connect(self._dsn, **self._kwargs)
                try:  # SET, not the `options` parameter: that would replace the DSN's own
                    conn.execute(
                        "SELECT set_config('statement_timeout', %s, false)",
                        (self._statement_timeout,),
                    )
                    conn.commit()
                except BaseException:
                    conn.close()
                    raise
            self._conn, self._staged_types = conn, None
        return self._conn

    def _run(self, action: str, work: Any) -> Any:
        conn = self._connection()
        try:
            with _mapped(action), conn.transaction():
                return work(conn)
        except StoreError as exc:
            # After a transient fault the next attempt connects again: a read-only server
            # may be a demoted primary, and the name in the DSN may lead to the new one.
            if exc.transient or conn.broken or conn.closed:
                self.close()
            raise

    def migrate(self) -> list[int]:
        """Apply the migrations this database has not seen; return their versions."""

        def work(conn: psycopg.Connection[Any]) -> list[int]:
            # A migration may rewrite a large table: statement_timeout is for the stream.
            conn.execute("SET LOCAL statement_timeout = 0")
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
        self, rows: Sequence[UserRow], checkpoint: StreamCheckpoint | None = None
    ) -> int:
        """Insert a batch, and the group's checkpoint, in one transaction; return the rows
        actually new (a uuid already in the table, or a (epoch, seq) already taken, is
        skipped)."""

        def work(conn: psycopg.Connection[Any]) -> int:
            inserted = 0
            if rows:
                with conn.cursor() as cur:
                    types = self._staged_types
                    if types is None:  # a new connection: its staging table
                        for statement in _STAGE:
                            cur.execute(statement)
                        types = [oid for (oid,) in cur.execute(_STAGED_TYPES, (list(COLUMNS),))]
                        self._staged_types = types
                    try:
                        with cur.copy(_COPY) as copy:
                            copy.set_types(types)
                            for row in rows:
                                copy.write_row(row.values())
                    except (TypeError, ValueError, OverflowError) as exc:  # a value not dumped
                        raise StoreError(
                            f"insert: {type(exc).__name__}: {exc}", fault="row"
                        ) from exc
                    inserted = cur.execute(_MOVE).rowcount
            if checkpoint is not None:
                conn.execute(
                    _CHECKPOINT,
                    (checkpoint.group, checkpoint.epoch, checkpoint.seq, checkpoint.position),
                )
            return inserted

        if not rows and checkpoint is None:
            return 0
        try:
            return self._run("insert", work)
        except StoreError:
            self._staged_types = None  # perhaps made in the transaction rolled back
            raise

    def begin_stream(self, epoch: str, seed: str, source: str) -> None:
        """Record a new epoch and what regenerates it (once: again is nothing)."""
        self._run(
            "begin stream",
            lambda conn: conn.execute(
                "INSERT INTO streams (epoch, seed, source) VALUES (%s, %s, %s) "
                "ON CONFLICT (epoch) DO NOTHING",
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

    def insert_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Store records kept out of incoming_users, without the API's fake credentials
        (whatever `keep_credentials` says: a dead letter is for finding the fault)."""
        rows = [
            (
                x.source,
                x.position,
                x.seq,
                x.epoch,
                x.error,
                _without_nul(
                    _json.encode(scrub(x.raw) if isinstance(x.raw, dict) else x.raw).decode()
                ),
            )
            for x in letters
        ]

        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO dead_letters (source, position, seq, epoch, error, raw) "
                    "VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                    rows,
                )
            return len(rows)

        return self._run("insert dead letters", work)

    def query(
        self, sql: str, params: Sequence[Any] = (), *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """The rows of `sql`; `binary`: in binary format (bytea as bytes, undecoded)."""
        return self._run("query", lambda conn: conn.execute(sql, params, binary=binary).fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
