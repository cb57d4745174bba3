"""What ``userstreamd db status`` and ``userstreamd db migrate`` do to the database (the
command, its text and JSON output, is `userstreamd.commands.db`): what the database
holds (`read_status`), and its schema brought up to date on request
(`apply_migrations`).

Which database: ``database.dsn`` when set (with the password the daemon uses, from
``database.password_env`` or the ``db-password`` credential). Otherwise the embedded
server under ``daemon.state_dir``: the running daemon's, through its socket, when a
daemon holds the state directory's lock; else this command takes the lock (no daemon can
start meanwhile), starts the server under its lifeline guard, and stops it at the end.
``status`` on a state directory without a database yet fails (exit 1): there is nothing
to report, and a script must not take an empty report for a healthy one. ``migrate``
creates the database there (initdb), as the daemon would.

``status`` only reads, in one read-only REPEATABLE READ transaction (one snapshot; the
statements are bounded by ``database.statement_timeout_s``); it never migrates. Row
counts are exact (``count(*)``, no pg_class estimate), the other figures come through the
indexes on created_at, received_at, (epoch, seq) and (url, spent_at). With ``--json``
the command prints `Status` as one object; these keys are stable (times are RFC 3339
UTC, durations in seconds, a section whose table does not exist yet is null)::

    database        {target, embedded, started}   where (no password), and whether this
                                                  command started the embedded server
    checked_at      the database's now()
    schema          {applied, pending, unknown}   migration versions: in the database,
                                                  shipped but not applied, applied but
                                                  not shipped (a newer userstreamd)
    rows            rows in incoming_users
    group           the consumer group whose checkpoints are shown (consumers.group)
    epochs_total    epochs known (streams, checkpoints)
    epochs          the most recent 10 (latest stream or checkpoint activity first):
                    [{epoch, source, started_at, rows, rows_by_source,
                      latest_seq, checkpoint: {seq, position, updated_at} | null,
                      checkpoint_lag}]                latest_seq - checkpoint.seq
                    source: producer.source when the epoch began (what
                    regenerates it); rows_by_source: {source: rows}, what
                    the rows are (the fallback's users are "synthetic")
    ingest          {last_row_at, since_last_row_s, window_rows, latency_sample,
                     latency_p50_s, latency_p99_s}   rows in the minute up to the newest
                                                     row; created_at - produced_at over
                                                     its newest 10,000 (latency_sample)
    dead_letters    {total, last_hour, latest: {received_at, source, error} | null}
                    error: control characters removed, at most 200 characters
    upstream_budget {url, window_s, spent, limit}    users served to randomuser.url
                                                     within its window, vs budget_users

Both raise a UserstreamdError naming what was tried when the database cannot be reached
or read.
"""

from __future__ import annotations

import contextlib
import subprocess
import unicodedata
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..config import Config
from ..errors import EmbeddedPostgresError, InUseError, StoreError, UserstreamdError, describe
from ..logs import add_secrets, dsn_secrets, redact
from .bootstrap import embedded_server
from .embedded import EmbeddedPostgres, hold_state_dir
from .postgres import PostgresStore, migrations

EPOCHS_SHOWN = 10
ERROR_CHARS_MAX = 200
LATENCY_WINDOW_S = 60
LATENCY_SAMPLE_MAX = 10_000  # the newest rows of the window: a bounded sort
_SERVER_STOP_S = 35  # the guard's own SIGKILL comes after 30 s


class Database(msgspec.Struct, frozen=True):
    target: str  # host, port, dbname, user: never the password
    embedded: bool
    started: bool  # the embedded server was started for this command


class Schema(msgspec.Struct, frozen=True):
    applied: list[int]
    pending: list[int]
    unknown: list[int]


class Checkpoint(msgspec.Struct, frozen=True):
    seq: int
    position: int
    updated_at: datetime


class Epoch(msgspec.Struct, frozen=True):
    epoch: str
    source: str | None  # producer.source when the epoch began: what regenerates it
    started_at: datetime | None
    rows: int
    rows_by_source: dict[str, int]  # where the rows came from (the fallback's are synthetic)
    latest_seq: int | None
    checkpoint: Checkpoint | None
    checkpoint_lag: int | None


class Ingest(msgspec.Struct, frozen=True):
    last_row_at: datetime | None
    since_last_row_s: float | None
    window_rows: int
    latency_sample: int
    latency_p50_s: float | None
    latency_p99_s: float | None


class DeadLetter(msgspec.Struct, frozen=True):
    received_at: datetime
    source: str
    error: str


class DeadLetters(msgspec.Struct, frozen=True):
    total: int
    last_hour: int
    latest: DeadLetter | None


class Budget(msgspec.Struct, frozen=True):
    url: str
    window_s: float
    spent: int
    limit: int


class Status(msgspec.Struct, frozen=True):
    database: Database
    checked_at: datetime
    schema: Schema
    rows: int | None
    group: str
    epochs_total: int | None
    epochs: list[Epoch] | None
    ingest: Ingest | None
    dead_letters: DeadLetters | None
    upstream_budget: Budget | None


def printable(text: str, max_chars: int = ERROR_CHARS_MAX) -> str:
    """Untrusted text made safe for a terminal: control and format characters (escape
    sequences, bidi overrides) removed, whitespace runs made one space, then truncated."""
    kept = "".join(
        " " if c.isspace() else c
        for c in text
        if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    )
    kept = " ".join(kept.split())
    return kept if len(kept) <= max_chars else kept[: max_chars - 3] + "..."


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(database.dsn, unparsable)"
    keys = ("host", "hostaddr", "port", "dbname", "user")
    shown = " ".join(f"{k}={params[k]}" for k in keys if params.get(k))
    return printable(shown, 300) or "(libpq defaults: PGHOST, PGPORT, ...)"


def _one_line(exc: BaseException) -> str:
    return redact(printable(describe(exc), 500))


@contextlib.contextmanager
def _serving(server: EmbeddedPostgres) -> Iterator[None]:
    """The embedded server for the duration, under its lifeline guard (closing the
    guard's stdin is the fast shutdown; if we die, the kernel closes it for us)."""
    with server.log_path.open("ab") as log:
        proc = subprocess.Popen(
            server.command(), stdin=subprocess.PIPE, **server.process_options(log)
        )
    try:
        server.wait_ready(proc)
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(_SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _open_database(config: Config, *, create: bool) -> Iterator[tuple[str, Database]]:
    """The DSN to use and what it is; `create`: initdb an embedded database if needed."""
    add_secrets(config.db_password(), *dsn_secrets(config.database.dsn))
    if config.database.dsn:
        yield config.database.dsn, Database(describe_dsn(config.database.dsn), False, False)
        return
    data_dir = config.state_path / "postgres"
    if not create and not (data_dir / "PG_VERSION").exists():
        raise EmbeddedPostgresError(
            f"no embedded database in {data_dir}: the daemon has not run with this "
            "daemon.state_dir yet, so there is nothing to report"
        )
    with contextlib.ExitStack() as stack:
        try:
            server = embedded_server(config, listen=False)
            started = _enter_embedded(stack, server)
        except (EmbeddedPostgresError, OSError) as exc:
            raise EmbeddedPostgresError(f"{data_dir}: {_one_line(exc)}") from exc
        yield server.dsn, Database(describe_dsn(server.dsn), True, started)


def _enter_embedded(stack: contextlib.ExitStack, server: EmbeddedPostgres) -> bool:
    """The server for the stack's duration: the running daemon's (False), or one this
    command starts, holding the state directory's lock until it has stopped it (True)."""
    state_dir = server.data_dir.parent
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack.enter_context(hold_state_dir(state_dir))
    except InUseError:  # a daemon holds it: its server runs
        return False
    server.prepare()
    stack.enter_context(_serving(server))
    return True


def how(db: Database) -> str:
    """Which server `db` is, for a person."""
    if not db.embedded:
        return "database.dsn"
    if db.started:
        return "embedded server, started for this command"
    return "embedded server of the running daemon"


# -- status ---------------------------------------------------------------------------


def _table(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _one(conn: psycopg.Connection[Any], sql: str, params: Any = ()) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None  # aggregates always return a row
    return row


def _schema(conn: psycopg.Connection[Any]) -> Schema:
    applied = []
    if _table(conn, "schema_migrations"):
        applied = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    shipped = [v for v, _, _ in migrations()]
    return Schema(
        applied=applied,
        pending=[v for v in shipped if v not in applied],
        unknown=[v for v in applied if v not in shipped],
    )


_EPOCHS = """
WITH seen AS (
    SELECT epoch, max(at) AS at FROM (
        SELECT epoch, created_at AS at FROM streams
        UNION ALL SELECT epoch, updated_at FROM stream_checkpoints
    ) activity GROUP BY epoch
), recent AS (
    SELECT epoch, at, count(*) OVER () AS total FROM seen ORDER BY at DESC, epoch LIMIT %s
)
SELECT r.epoch, s.source, s.created_at, u.rows, u.by_source, u.latest_seq,
       c.seq, c.position, c.updated_at, r.total
FROM recent r
LEFT JOIN streams s ON s.epoch = r.epoch
LEFT JOIN stream_checkpoints c ON c.epoch = r.epoch AND c.group_name = %s
CROSS JOIN LATERAL (
    SELECT coalesce(sum(n), 0)::bigint AS rows, max(latest) AS latest_seq,
           json_object_agg(source, n ORDER BY source) AS by_source
    FROM (
        SELECT source, count(*) AS n, max(seq) AS latest FROM incoming_users i
        WHERE i.epoch = r.epoch GROUP BY source
    ) per_source
) u
ORDER BY r.at DESC, r.epoch"""


def _epochs(conn: psycopg.Connection[Any], group: str) -> tuple[int, list[Epoch]]:
    found = conn.execute(_EPOCHS, (EPOCHS_SHOWN, group)).fetchall()
    epochs = []
    for epoch, source, started, rows, by_source, latest, seq, position, at, _ in found:
        checkpoint = None if seq is None else Checkpoint(seq, position, at)
        lag = None if latest is None or seq is None else latest - seq
        epochs.append(Epoch(epoch, source, started, rows, by_source or {}, latest, checkpoint, lag))
    return (found[0][-1] if found else 0), epochs


_WINDOW = "created_at > %s - make_interval(secs => %s)"
_LATENCY = f"""SELECT count(*),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency),
    percentile_cont(0.99) WITHIN GROUP (ORDER BY latency)
FROM (SELECT extract(epoch FROM created_at - produced_at)::float8 AS latency
      FROM incoming_users WHERE {_WINDOW} ORDER BY created_at DESC LIMIT %s) newest"""


def _ingest(conn: psycopg.Connection[Any]) -> Ingest:
    last, since = _one(
        conn,
        "SELECT max(created_at), extract(epoch FROM now() - max(created_at))::float8"
        " FROM incoming_users",
    )
    if last is None:
        return Ingest(None, None, 0, 0, None, None)
    since_at = (last, LATENCY_WINDOW_S)
    (count,) = _one(conn, f"SELECT count(*) FROM incoming_users WHERE {_WINDOW}", since_at)
    sample, p50, p99 = _one(conn, _LATENCY, (*since_at, LATENCY_SAMPLE_MAX))
    return Ingest(last, since, count, sample, p50, p99)


def _dead_letters(conn: psycopg.Connection[Any]) -> DeadLetters:
    total, last_hour = _one(
        conn,
        "SELECT count(*), count(*) FILTER (WHERE received_at > now() - interval '1 hour')"
        " FROM dead_letters",
    )
    row = conn.execute(
        "SELECT received_at, source, left(error, 4000) FROM dead_letters ORDER BY id DESC LIMIT 1"
    ).fetchone()
    latest = None if row is None else DeadLetter(row[0], printable(row[1], 100), printable(row[2]))
    return DeadLetters(total, last_hour, latest)


def _budget(conn: psycopg.Connection[Any], config: Config) -> Budget:
    ru = config.randomuser
    (spent,) = _one(
        conn,
        "SELECT coalesce(sum(users), 0) FROM upstream_budget"
        " WHERE url = %s AND spent_at > now() - make_interval(secs => %s)",
        (ru.url, ru.budget_window_s),
    )
    return Budget(ru.url, ru.budget_window_s, int(spent), ru.budget_users)


_TABLES = ("incoming_users", "dead_letters", "streams", "stream_checkpoints", "upstream_budget")


def _read_status(config: Config, dsn: str, database: Database) -> Status:
    """Everything `status` reports, read in one read-only snapshot."""
    d = config.database
    kwargs: dict[str, Any] = {
        "application_name": "userstreamd-admin",
        "connect_timeout": max(1, round(d.connect_timeout_s)),  # libpq: whole seconds
    }
    if password := config.db_password():
        kwargs["password"] = password
    with psycopg.connect(dsn, **kwargs) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true), set_config('TimeZone',"
                " 'UTC', true)",
                (f"{round(d.statement_timeout_s * 1000)}ms",),
            )
            (now,) = _one(conn, "SELECT now()")
            has = {t: _table(conn, t) for t in _TABLES}
            users = has["incoming_users"]
            total, epochs = None, None
            if users and has["streams"] and has["stream_checkpoints"]:
                total, epochs = _epochs(conn, config.consumers.group)
            return Status(
                database=database,
                checked_at=now,
                schema=_schema(conn),
                rows=_one(conn, "SELECT count(*) FROM incoming_users")[0] if users else None,
                group=config.consumers.group,
                epochs_total=total,
                epochs=epochs,
                ingest=_ingest(conn) if users else None,
                dead_letters=_dead_letters(conn) if has["dead_letters"] else None,
                upstream_budget=_budget(conn, config) if has["upstream_budget"] else None,
            )


def read_status(config: Config) -> Status:
    """The database's state (read only); UserstreamdError when it cannot be reached or
    read."""
    with _open_database(config, create=False) as (dsn, database):
        try:
            return _read_status(config, dsn, database)
        except psycopg.Error as exc:
            raise StoreError(f"{database.target} ({how(database)}): {_one_line(exc)}") from exc


def apply_migrations(config: Config) -> tuple[Database, list[int]]:
    """Apply the pending migrations (creating an embedded database if there is none):
    where, and the versions applied; UserstreamdError when it cannot."""
    with _open_database(config, create=True) as (dsn, database):
        store = PostgresStore.from_config(config, dsn, application_name="userstreamd-migrate")
        try:
            return database, store.migrate()
        except UserstreamdError as exc:
            raise StoreError(f"{database.target} ({how(database)}): {exc}") from exc
        finally:
            store.close()
