"""The shipped Grafana dashboards.

realtime_users.json (PostgreSQL): every panel's SQL, its macros expanded as Grafana's
PostgreSQL datasource expands them, runs against the real schema and returns the columns
its panel type draws: on rows written by PostgresStore with known values (the figures are
checked too), and on the rows of a real daemon's short run. pipeline_health.json
(Prometheus): every expression names only metrics that run's /metrics served, and every
metric has a panel. Both: uid, title, refresh, time range, datasources, ids and layout.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

from userstreamd.commands.cli import main
from userstreamd.config import load_config
from userstreamd.errors import ConfigError, InUseError, leaves
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.bootstrap import run_database
from userstreamd.store.postgres import (
    DeadLetter,
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    row_values,
)
from userstreamd.store.reader import READER_ROLE, READER_TABLES, ensure_reader
from userstreamd.stream.records import parse_user
from userstreamd.topology.embedded import EmbeddedTopology

from .conftest import daemon_tables, query
from .fakeapi import FakeRandomUserAPI
from .helpers import (
    eventually,
    free_port,
    free_ports,
    in_process_daemon,
    run_until,
    wait_until,
    write_config,
)

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
PROVISIONING = GRAFANA / "provisioning"
PG = {"type": "grafana-postgresql-datasource", "uid": "userstreamd-pg"}
PROM = {"type": "prometheus", "uid": "userstreamd-prom"}


def _dashboard(name: str) -> dict[str, Any]:
    return json.loads((GRAFANA / name).read_text())


REALTIME = _dashboard("realtime_users.json")
HEALTH = _dashboard("pipeline_health.json")
SQL_PANELS = REALTIME["panels"]
PROM_TARGETS = [(p["title"], t["refId"], t["expr"]) for p in HEALTH["panels"] for t in p["targets"]]

USERS = 200  # filled into the database, spread over the last USERS seconds


# --- Grafana's PostgreSQL macros (pkg/tsdb/grafana-postgresql-datasource/macros.go) ---

_MACRO = re.compile(r"\$__([_a-zA-Z0-9]+)\(([^)]*)\)")
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_interval(text: str) -> float:
    """Seconds of a Grafana interval ("200ms", "1s", "5m", ...)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text.strip().strip("'"))
    assert match, f"not a Grafana interval: {text!r}"
    return int(match[1]) * _UNITS_S[match[2]]


def format_interval(seconds: float) -> str:
    """What $__interval reads for an interval (gtime.FormatInterval): one whole unit."""
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS_S[unit]:
            return f"{int(seconds // _UNITS_S[unit])}{unit}"
    return f"{max(1, int(seconds * 1000))}ms"


def _go_float(value: float) -> str:
    """Go's %v for a float64 (Duration.Seconds()): 300 -> "300", 0.5 -> "0.5"."""
    return str(int(value)) if value == int(value) else repr(value)


def _rfc3339nano(when: datetime) -> str:
    utc = when.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else ""
    return f"{utc:%Y-%m-%dT%H:%M:%S}{fraction}Z"


def expand_macros(sql: str, start: datetime, end: datetime, interval_s: float) -> str:
    """The SQL that Grafana sends to PostgreSQL for a query over [start, end] whose
    interval ($__interval) is `interval_s`."""
    sql = sql.replace("$__interval_ms", str(round(interval_s * 1000)))
    sql = sql.replace("$__interval", format_interval(interval_s))
    sql = sql.replace("$__unixEpochFrom()", str(int(start.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(end.timestamp())))

    def macro(match: re.Match[str]) -> str:
        name, args = match[1], [a.strip() for a in match[2].split(",") if a.strip()]
        if name == "time":
            return f'{args[0]} AS "time"'
        if name == "timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339nano(start)}' AND '{_rfc3339nano(end)}'"
        if name == "timeFrom":
            return f"'{_rfc3339nano(start)}'"
        if name == "timeTo":
            return f"'{_rfc3339nano(end)}'"
        if name in ("timeGroup", "timeGroupAlias"):
            assert len(args) in (2, 3), f"${name} needs a column, an interval and a fill"
            assert len(args) == 2 or re.fullmatch(r"NULL|previous|-?[\d.]+", args[2]), args
            secs = _go_float(parse_interval(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{secs})*{secs}"
            return group + (' AS "time"' if name == "timeGroupAlias" else "")
        if name == "unixEpochFilter":
            col, lo, hi = args[0], int(start.timestamp()), int(end.timestamp())
            return f"{col} >= {lo} AND {col} <= {hi}"
        raise AssertionError(f"Grafana has no macro ${name} (or this test does not know it)")

    return _MACRO.sub(macro, sql)


def test_macros_expand_as_grafana_does() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)
    end = start + timedelta(minutes=5)
    sql = "SELECT $__timeGroupAlias(t, '5m'), $__timeGroup(t, $__interval, 0) WHERE $__timeFilter(t) AND x < $__interval_ms"
    assert expand_macros(sql, start, end, 0.5) == (
        'SELECT floor(extract(epoch from t)/300)*300 AS "time", '
        "floor(extract(epoch from t)/0.5)*0.5 WHERE "
        "t BETWEEN '2026-01-02T03:04:05.12Z' AND '2026-01-02T03:09:05.12Z' AND x < 500"
    )
    assert expand_macros("$__timeTo()", start, end, 1) == "'2026-01-02T03:09:05.12Z'"
    assert format_interval(90) == "1m" and format_interval(0.2) == "200ms"


# --- realtime_users.json against the real schema ---


def fill(dsn: str) -> str:
    """USERS users from two sources, spread over the last USERS seconds, with ingest
    latencies from 0 to ~0.5 s; and one dead letter."""
    store = PostgresStore(dsn)
    store.migrate()
    now = datetime.now(UTC)
    rows = []
    for p in range(1, USERS + 1):
        raw = synthetic_user("grafana", p)
        source = "randomuser" if p % 3 else "synthetic"
        produced = now - timedelta(milliseconds=10 * (p % 50))
        envelope = Envelope(p, "ep", source, produced, produced + timedelta(milliseconds=2))
        rows.append(row_values(parse_user(raw), raw, envelope))
    store.insert_users(rows, StreamCheckpoint("db", "ep", USERS, USERS))
    store.insert_dead_letters(
        [DeadLetter("randomuser", 7, None, "login.uuid missing", {"login": {}})]
    )
    store.close()
    with psycopg.connect(dsn) as conn:  # one insert is one created_at: spread them
        conn.execute(
            "UPDATE incoming_users SET created_at = created_at - back, "
            "produced_at = produced_at - back, received_at = received_at - back "
            "FROM (SELECT uuid AS id, seq * interval '1 second' AS back FROM incoming_users) s "
            "WHERE uuid = s.id"
        )
    return dsn


@pytest.fixture
def filled(dsn: str) -> str:
    return fill(dsn)


def _grafana_range(board: dict[str, Any]) -> tuple[datetime, datetime]:
    """The dashboard's default time range ("now-5m" to "now"), as of now."""
    match = re.fullmatch(r"now-(\w+)", board["time"]["from"])
    assert match and board["time"]["to"] == "now", board["time"]
    end = datetime.now(UTC)
    return end - timedelta(seconds=parse_interval(match[1])), end


def _panel_interval_s(panel: dict[str, Any], start: datetime, end: datetime) -> float:
    """$__interval: the range over the panel's data points (~1000 here), not below the
    panel's min interval. (Grafana also rounds it to a step; the minimum is what counts.)"""
    minimum = parse_interval(panel["interval"]) if "interval" in panel else 0.001
    return max(minimum, (end - start).total_seconds() / 1000)


def _query(dsn: str, panel: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    (target,) = panel["targets"]
    start, end = _grafana_range(REALTIME)
    sql = expand_macros(target["rawSql"], start, end, _panel_interval_s(panel, start, end))
    assert "$__" not in sql, sql
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        rows = cur.execute(sql).fetchall()
        assert cur.description is not None
        return [c.name for c in cur.description], rows


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in values)


def _text(values: list[Any]) -> bool:
    return all(isinstance(v, str) for v in values)


def assert_fits_panel(panel: dict[str, Any], names: list[str], rows: list[tuple[Any, ...]]) -> None:
    """The columns are what the panel type draws."""
    kind, target = panel["type"], panel["targets"][0]
    assert rows, "no rows"
    assert len(set(names)) == len(names), f"duplicate column names: {names}"
    column = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    if kind == "timeseries":
        assert target["format"] == "time_series"
        assert "time" in column, names
        times = column["time"]
        assert _numeric(times) or all(isinstance(t, datetime) for t in times), times[:3]
        assert times == sorted(times), "ORDER BY time"
        values = [n for n in names if n != "time"]
        assert any(_numeric(column[n]) for n in values), f"no numeric column: {names}"
        assert all(_numeric(column[n]) or _text(column[n]) for n in values), rows[0]
    elif kind == "stat":
        assert len(rows) == 1 and len(names) == 1 and _numeric(column[names[0]]), rows
    elif kind == "geomap":
        (layer,) = panel["options"]["layers"]
        assert layer["location"] == {
            "mode": "coords",
            "latitude": "latitude",
            "longitude": "longitude",
        }
        assert {"latitude", "longitude"} <= set(names), names
        assert _numeric(column["latitude"]) and _numeric(column["longitude"]), rows[0]
        assert all(-90 <= v <= 90 for v in column["latitude"])
        assert all(-180 <= v <= 180 for v in column["longitude"])
    elif kind in ("piechart", "barchart"):
        category, *values = names
        assert _text(column[category]) and len(set(column[category])) == len(rows), rows
        assert values and all(_numeric(column[n]) for n in values), rows[0]
        assert panel["options"].get("xField", category) == category
    else:
        assert kind == "table", f"no check for panel type {kind}"


@pytest.mark.parametrize("panel", SQL_PANELS, ids=[p["title"] for p in SQL_PANELS])
def test_every_panel_query_runs_and_fits_its_panel(filled: str, panel: dict[str, Any]) -> None:
    names, rows = _query(filled, panel)
    assert_fits_panel(panel, names, rows)


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in board["panels"] if p["title"] == title]
    return panel


def test_users_per_second_adds_up_to_the_users_stored(filled: str) -> None:
    panel = _panel(REALTIME, "Users per second")
    names, rows = _query(filled, panel)
    start, end = _grafana_range(REALTIME)
    bucket_s = _panel_interval_s(panel, start, end)
    assert bucket_s >= 1, "a bucket under a second would not be a count per second"
    rate = names.index("users_per_s")
    assert sum(float(row[rate]) * bucket_s for row in rows) == pytest.approx(USERS)
    assert {row[names.index("source")] for row in rows} == {"randomuser", "synthetic"}


def test_counts_and_latency_read_the_filled_rows(filled: str) -> None:
    def value(title: str) -> Any:
        return _query(filled, _panel(REALTIME, title))[1][0][0]

    assert value("Total users") == USERS
    assert 55 <= value("Users in the last minute") <= 61  # one user a second, seq 1..60
    assert value("Dead letters in range") == 1
    assert 0 <= value("Ingest latency p95 in range") < 5
    names, rows = _query(filled, _panel(REALTIME, "Latest 10 users"))
    assert [row[names.index("seq")] for row in rows] == list(range(1, 11))


# --- both dashboards: identity, datasources, layout ---

BOARDS = [
    ("realtime_users.json", REALTIME, "realtime_users_001", "Real-time users", "1s", PG),
    (
        "pipeline_health.json",
        HEALTH,
        "userstreamd_health",
        "userstreamd pipeline health",
        "5s",
        PROM,
    ),
]


@pytest.mark.parametrize(
    ("board", "uid", "title", "refresh", "datasource"),
    [b[1:] for b in BOARDS],
    ids=[b[0] for b in BOARDS],
)
def test_dashboard_identity_datasource_and_layout(
    board: dict[str, Any], uid: str, title: str, refresh: str, datasource: dict[str, str]
) -> None:
    assert (board["uid"], board["title"], board["refresh"]) == (uid, title, refresh)
    if uid == "realtime_users_001":
        assert board["time"] == {"from": "now-5m", "to": "now"}
    panels = board["panels"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == datasource for t in panel["targets"]), panel["title"]
        assert panel["description"], f"{panel['title']}: say what it shows"
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    boxes = [(p["title"], p["gridPos"]) for p in panels]
    for i, (name, a) in enumerate(boxes):
        assert a["x"] >= 0 and a["y"] >= 0 and a["x"] + a["w"] <= 24, name
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{name} overlaps {other}"


def test_interval_panels_have_a_minimum_of_one_second() -> None:
    for panel in SQL_PANELS:
        if "$__interval" in panel["targets"][0]["rawSql"]:
            assert parse_interval(panel["interval"]) >= 1, panel["title"]


def test_latency_panel_says_how_latency_is_measured() -> None:
    panel = _panel(REALTIME, "Ingest latency p50 / p95 / p99")
    assert "created_at - produced_at" in panel["description"]
    assert "created_at - produced_at" in panel["targets"][0]["rawSql"]


def _provisioned_datasources() -> dict[str, str]:
    text = (PROVISIONING / "datasources" / "userstreamd.yaml").read_text()
    found = {}
    for block in re.split(r"^  - name:", text, flags=re.MULTILINE)[1:]:
        uid = re.search(r"^    uid: (\S+)", block, re.MULTILINE)
        kind = re.search(r"^    type: (\S+)", block, re.MULTILINE)
        assert uid and kind, block
        found[uid[1]] = kind[1]
    return found


def test_provisioning_serves_both_dashboards_their_datasources() -> None:
    assert _provisioned_datasources() == {PG["uid"]: PG["type"], PROM["uid"]: PROM["type"]}
    datasources = (PROVISIONING / "datasources" / "userstreamd.yaml").read_text()
    for variable in ("PG_HOST", "PG_USER", "PG_PASSWORD", "PROMETHEUS_URL"):
        assert f"${{USERSTREAMD_{variable}}}" in datasources
    dashboards = (PROVISIONING / "dashboards" / "userstreamd.yaml").read_text()
    assert "path: /var/lib/grafana/dashboards/userstreamd" in dashboards
    assert "realtime_users.json" in dashboards and "pipeline_health.json" in dashboards
    shipped = sorted(p.name for p in GRAFANA.glob("*.json"))
    assert shipped == ["pipeline_health.json", "realtime_users.json"]
    assert not (GRAFANA / "userstreamd.json").exists(), "the old dashboard is replaced"


# --- what Grafana needs besides the dashboards: its refresh floor, a way in ---


def _drop_in() -> dict[str, str]:
    """The shipped systemd drop-in for grafana-server: {variable: value} of its
    Environment= lines, and {"EnvironmentFile": ...}."""
    text = (PROVISIONING / "grafana-server.conf").read_text()
    assert re.search(r"^\[Service\]$", text, re.MULTILINE), "a drop-in for the [Service]"
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"Environment=(\w+)=(\S+)", line):
            found[match[1]] = match[2]
        elif line.startswith("EnvironmentFile="):
            found["EnvironmentFile"] = line.partition("=")[2]
    return found


def test_grafana_is_allowed_every_refresh_the_dashboards_ask_for() -> None:
    """Grafana's min_refresh_interval (5s by default) overrides a dashboard's faster
    refresh: the shipped setting is at or below every refresh the dashboards offer."""
    floor = parse_interval(_drop_in()["GF_DASHBOARDS_MIN_REFRESH_INTERVAL"])
    for board in (REALTIME, HEALTH):
        offered = [board["refresh"], *board.get("timepicker", {}).get("refresh_intervals", [])]
        assert all(floor <= parse_interval(r) for r in offered), (board["uid"], offered)
    assert REALTIME["refresh"] == "1s"


def test_the_drop_in_gives_the_datasources_what_they_read() -> None:
    """Every ${VARIABLE} of the datasources file is set by the drop-in, the password
    through its EnvironmentFile (a secret never in a unit), and as written it points at
    the embedded server's listener and role."""
    datasources = (PROVISIONING / "datasources" / "userstreamd.yaml").read_text()
    lines = [line for line in datasources.splitlines() if not line.lstrip().startswith("#")]
    wanted = set(re.findall(r"\$\{(\w+)\}", "\n".join(lines)))
    given = _drop_in()
    assert wanted - set(given) == {"USERSTREAMD_PG_PASSWORD"}
    assert given["EnvironmentFile"].startswith("-/etc/grafana/")
    assert given["USERSTREAMD_PG_USER"] == READER_ROLE
    assert given["USERSTREAMD_PG_HOST"].startswith("127.0.0.1:")


def test_the_role_reads_exactly_the_tables_the_dashboards_read(filled: str) -> None:
    tables = {row[0] for row in query(filled, "SELECT tablename FROM pg_tables")}
    named = {
        name
        for panel in SQL_PANELS
        for name in re.findall(r"\bFROM\s+(\w+)", panel["targets"][0]["rawSql"], re.IGNORECASE)
    }
    assert set(READER_TABLES) == named & tables


def _grafana_dsn(port: int, password: str) -> str:
    return make_conninfo(
        host="127.0.0.1", port=port, dbname="userstreamd", user=READER_ROLE, password=password
    )


def _refused(dsn: str, sql: str) -> str | None:
    """The SQLSTATE of `sql` run by `dsn`'s role (a refused login: libpq's message; None:
    it ran)."""
    try:
        with psycopg.connect(dsn) as conn:
            conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate or str(exc)
    return None


WRITES = [
    "INSERT INTO incoming_users (uuid) VALUES (gen_random_uuid())",
    "UPDATE incoming_users SET age = 1",
    "DELETE FROM dead_letters",
    "TRUNCATE dead_letters",
    "CREATE TABLE grafana_was_here (x int)",
    "CREATE TEMP TABLE grafana_was_here (x int)",
    "CREATE VIEW grafana_was_here AS SELECT 1",
    "SELECT * FROM stream_checkpoints",  # (not a table the dashboards read)
]


async def test_grafana_reaches_the_embedded_server_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`database.listen_port`: the daemon's embedded server also listens on loopback,
    where the read-only role (password from its environment variable) runs every panel's
    query and can write nothing; the server's superuser is not let in over TCP."""
    port, password = free_port(), f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("USERSTREAMD_GRAFANA_PASSWORD", password)
    path = write_config(tmp_path, "", database={"listen_port": port})
    config = load_config(path)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            own_dsn = await nursery.start(run_database, config)
        await trio.to_thread.run_sync(fill, own_dsn)
        # `db status` finds this running server (its socket is named by listen_port)
        command = [sys.executable, "-m", "userstreamd", "--config", str(path), "db", "status"]
        report = await trio.run_process([*command, "--json"], capture_stdout=True)
        assert json.loads(report.stdout)["rows"] == USERS
        grafana = _grafana_dsn(port, password)

        def every_panel() -> None:
            for panel in SQL_PANELS:
                assert_fits_panel(panel, *_query(grafana, panel))

        await trio.to_thread.run_sync(every_panel)
        for sql in WRITES:
            assert await trio.to_thread.run_sync(_refused, grafana, sql) == "42501", sql
        assert await trio.to_thread.run_sync(_refused, own_dsn, "SELECT 1") is None
        wrong = _grafana_dsn(port, "not-the-password")
        assert "password authentication failed" in await trio.to_thread.run_sync(
            _refused, wrong, "SELECT 1"
        )
        superuser = make_conninfo(
            host="127.0.0.1", port=port, dbname="userstreamd", user="postgres"
        )
        assert "no pg_hba.conf entry" in await trio.to_thread.run_sync(
            _refused, superuser, "SELECT 1"
        )

        # made again at each start: a new password replaces the old, the grants stay
        await trio.to_thread.run_sync(ensure_reader, own_dsn, "pw-2")
        assert "password authentication failed" in await trio.to_thread.run_sync(
            _refused, grafana, "SELECT 1"
        )
        renewed = _grafana_dsn(port, "pw-2")
        assert await trio.to_thread.run_sync(_refused, renewed, WRITES[0]) == "42501"
        assert await trio.to_thread.run_sync(_query, renewed, SQL_PANELS[0])
        nursery.cancel_scope.cancel()


async def test_a_listen_port_held_by_another_process_is_in_use_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `database.listen_port` another process holds: the database part fails with
    InUseError naming the address (the supervisor gives up at once), not a crash that is
    restarted max_restarts times."""
    monkeypatch.setenv("USERSTREAMD_GRAFANA_PASSWORD", "pw-held")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = write_config(tmp_path, "", database={"listen_port": port})
        config = load_config(path)
        with trio.fail_after(120), pytest.raises(BaseException) as raised:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_database, config)
    [error] = list(leaves(raised.value))
    assert isinstance(error, InUseError), error
    assert f"127.0.0.1:{port} (database.listen_port)" in str(error)


def test_a_listener_without_a_password_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("USERSTREAMD_GRAFANA_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = write_config(tmp_path, "", database={"listen_port": 5433})
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"database.listen_port: .*USERSTREAMD_GRAFANA_PASSWORD"):
        EmbeddedTopology.preflight(config)
    assert main(["--config", str(path), "check"]) == 2  # (`run` checks the same first)
    assert "database.listen_port: expected a password" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    (tmp_path / "grafana-password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    EmbeddedTopology.preflight(config)
    assert config.reader_password() == "from-systemd"


# --- pipeline_health.json: only metrics the daemon exposes ---

_PROMQL_METRIC = re.compile(r"\b(userstreamd_\w+)(?=[\s{\[)]|$)")


def promql_metric_names(expr: str) -> set[str]:
    """The userstreamd_* metric names a PromQL expression selects: an identifier followed
    by a label matcher `{`, a range `[`, a closing `)`, whitespace or the end."""
    return set(_PROMQL_METRIC.findall(expr))


@dataclass(frozen=True)
class ShortRun:
    dsn: str  # the database the daemon filled
    exposed: set[str]  # every metric and sample name its /metrics served


@pytest.fixture(scope="module")
def short_run(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortRun]:
    """A real daemon's short run: users from the (fake) Random User API, two of them
    broken (dead letters), committed by a consumer; then a scrape of its /metrics."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(pg_server, dbname=name)
    with FakeRandomUserAPI() as api:
        api.corrupt(2, "missing_uuid")
        tables = {
            "producer": {"source": "randomuser", "rate_per_s": 200},
            "randomuser": {"url": api.url},
            "consumers": {"count": 1},
        }
        daemon = in_process_daemon(tmp_path_factory.mktemp("short-run"), dsn, **tables)
        scraped: list[str] = []

        async def scrape() -> None:
            await eventually(lambda: daemon.hub.users_committed > 100)
            letters = "SELECT count(*) FROM dead_letters"
            await eventually(lambda: query(dsn, letters)[0][0] == 2)
            async with httpx.AsyncClient() as client:
                scraped.append((await client.get(f"{daemon.http_url}metrics")).text)

        assert trio.run(run_until, daemon, scrape) == 0
    families = list(text_string_to_metric_families(scraped[0]))
    yield ShortRun(dsn, {f.name for f in families} | {s.name for f in families for s in f.samples})
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("panel", SQL_PANELS, ids=[p["title"] for p in SQL_PANELS])
def test_every_panel_fits_its_panel_after_a_short_run(
    short_run: ShortRun, panel: dict[str, Any]
) -> None:
    names, rows = _query(short_run.dsn, panel)
    assert_fits_panel(panel, names, rows)


def test_promql_metric_names() -> None:
    assert promql_metric_names("rate(userstreamd_x_total[1m])") == {"userstreamd_x_total"}
    assert promql_metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(userstreamd_y_bucket[5m])))"
    ) == {"userstreamd_y_bucket"}
    assert promql_metric_names(
        'userstreamd_a{kind="plain"} - ignoring(group) group_right userstreamd_b'
    ) == {"userstreamd_a", "userstreamd_b"}
    assert promql_metric_names("sum(userstreamd_c) / sum(rate(up[1m]))") == {"userstreamd_c"}
    assert promql_metric_names("rate(x_total[1m]) + my_userstreamd_d{}") == set()


def test_every_expression_uses_exposed_metrics_and_every_metric_has_a_panel(
    short_run: ShortRun,
) -> None:
    exposed = short_run.exposed
    for title, ref, expr in PROM_TARGETS:
        names = promql_metric_names(expr)
        assert names, f"{title}/{ref} names no userstreamd metric: {expr}"
        assert names <= exposed, f"{title}/{ref}: not exposed: {names - exposed}"
        for counted in re.findall(r"(?:rate|increase)\((userstreamd_\w+)", expr):
            assert counted.endswith(("_total", "_bucket", "_sum", "_count")), f"rate of {counted}"
        if "histogram_quantile" in expr:
            assert re.search(r"by \((le|le, \w+)\)", expr) and "_bucket[" in expr, expr
    used = set().union(*(promql_metric_names(e) for _, _, e in PROM_TARGETS))
    families = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exposed}
    unused = {f for f in families if not any(n.startswith(f) for n in used)}
    assert not unused, f"no panel for {sorted(unused)}"


# --- pipeline_health.json against a real Prometheus scraping a real daemon ---

PROMETHEUS = "/usr/bin/prometheus"
STOP_AT = 600  # users the daemon streams (6 s), then it is caught up
WINDOW = "1m"  # for $__rate_interval and $__range: every sample of the run


def _prometheus_config(path: Path, target: str) -> Path:
    path.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: userstreamd\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    return path


def _instant(client: httpx.Client, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query through Prometheus' HTTP API: {labels: value}."""
    response = client.get("/api/v1/query", params={"query": expr})
    if response.status_code == 503:  # (Prometheus starting: its TSDB not open yet)
        raise httpx.TransportError("Prometheus is not ready")
    answer = response.json()
    assert answer["status"] == "success", (expr, answer)
    assert answer["data"]["resultType"] == "vector", expr
    return {
        tuple(
            sorted(
                (k, v) for k, v in r["metric"].items() if k not in ("__name__", "job", "instance")
            )
        ): (float(r["value"][1]))
        for r in answer["data"]["result"]
    }


@pytest.mark.e2e
def test_every_promql_expression_against_a_real_prometheus(
    daemon_factory: Any, tmp_path: Path, dsn: str, fake_api: FakeRandomUserAPI
) -> None:
    """Debian's Prometheus scrapes a real daemon every second while it streams STOP_AT
    users from the (fake) API and its consumers catch up; then each expression of the
    dashboard answers with data and a sane value: nothing negative or NaN (the lag is 0
    once caught up), the committed seq is where the stream stands."""
    assert Path(PROMETHEUS).exists(), "needs Debian's prometheus (apt-get install prometheus)"
    http_port, port = free_ports(2)
    config = _prometheus_config(tmp_path / "prometheus.yml", f"127.0.0.1:{http_port}")
    with (tmp_path / "prometheus.log").open("wb") as log:  # (first: it sees the whole run)
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    tables = daemon_tables(tmp_path, dsn)
    tables["http"] = {"port": http_port}
    tables["producer"] = {"source": "randomuser", "rate_per_s": 100, "stop_at_position": STOP_AT}
    tables["randomuser"] = {"url": fake_api.url, "page_size": 20}
    daemon = daemon_factory(tables)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def caught_up() -> bool:
                try:
                    seqs = _instant(client, "userstreamd_stream_committed_seq")
                except httpx.TransportError:
                    return False  # (not listening yet)
                if list(seqs.values()) != [STOP_AT]:
                    return False
                scrapes = _instant(client, f"count_over_time(userstreamd_ready[{WINDOW}])")
                return max(scrapes.values()) >= 5  # (and the rates have 5 points)

            wait_until(caught_up, 90, "Prometheus scraped a daemon caught up at STOP_AT")
            answers = {}
            for title, ref, expr in PROM_TARGETS:
                query_text = expr.replace("$__rate_interval", WINDOW).replace("$__range", WINDOW)
                found = _instant(client, query_text)
                assert found, f"{title}/{ref}: no data for {query_text}"
                assert all(math.isfinite(v) and v >= 0 for v in found.values()), (title, found)
                answers[title, ref] = found
    finally:
        prometheus.terminate()
        prometheus.wait(30)
    daemon.stop()

    def one(title: str, ref: str = "A") -> float:
        (value,) = answers[title, ref].values()
        return value

    assert answers["Consumer lag (seqs)", "A"] == {(("group", "db"),): 0.0}
    assert one("Ready") == 1 and one("Upstream circuit") == 0 and one("Fallback source") == 0
    assert 0 < one("Upstream budget remaining") < 20_000
    seqs = "Last seq, committed seq, oldest unacknowledged"
    assert one(seqs, "A") == one(seqs, "B") == STOP_AT
    assert answers[seqs, "C"] == {(("group", "db"),): STOP_AT + 1}
    rates = "Users per second: produced, broadcast, committed"
    for ref in "ABC":
        assert one(rates, ref) > 0, ref  # (by source: randomuser alone)
    assert answers["API requests per second by outcome", "A"].keys() == {(("outcome", "ok"),)}
    assert 0 < one("API request latency p99 by outcome") < 10
    assert 0 < one("End-to-end latency p50 / p99", "A") <= one("End-to-end latency p50 / p99", "B")
    assert one("Component restarts in range") == 0
    states = answers["Component states", "A"]
    assert all(dict(labels)["state"] == "running" for labels in states), states
    assert one("Consumer batch size", "A") >= 1


async def test_the_committed_seq_carries_on_across_a_restart_and_the_counter_does_not(
    tmp_path: Path, dsn: str
) -> None:
    """Two runs of one daemon on one database: the second resumes the stream where the
    first committed it. users_committed_total starts again at 0 (a counter counts what
    this daemon did); userstreamd_stream_committed_seq says where the stream stands."""
    tables = {"producer": {"source": "synthetic", "rate_per_s": 500, "stop_at_position": 100}}
    scraped: list[dict[str, float]] = []
    for _ in range(2):
        daemon = in_process_daemon(tmp_path, dsn, consumers={"count": 1}, **tables)

        async def scrape(daemon: Any = daemon) -> None:
            await eventually(lambda: daemon.committed_through() == 100)
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"{daemon.http_url}metrics")).text
            scraped.append(
                {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            )

        assert await run_until(daemon, scrape) == 0
    first, second = scraped
    assert query(dsn, "SELECT count(*) FROM incoming_users") == [(100,)]
    assert first["userstreamd_users_committed_total"] == 100
    assert second.get("userstreamd_users_committed_total", 0) == 0
    assert first["userstreamd_stream_committed_seq"] == 100
    assert second["userstreamd_stream_committed_seq"] == 100
