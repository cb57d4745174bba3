"""`userstreamd db status` and `db migrate` against a real PostgreSQL: an external one
(database.dsn) and the embedded server under a state directory."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from userstreamd.commands import db as db_command
from userstreamd.config import Config, parse_config
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store import admin
from userstreamd.store.postgres import (
    DeadLetter,
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    UserRow,
    migrations,
    row_values,
)
from userstreamd.stream.records import parse_user

from ..conftest import query, toml_text
from ..helpers import wait_until

VERSIONS = [v for v, _, _ in migrations()]
URL = "https://randomuser.me/api/1.4/"


def _config(folder: Path, dsn: str, **tables: dict[str, Any]) -> Config:
    path = folder / "config.toml"
    path.write_text(toml_text({"database": {"dsn": dsn}, **tables}))
    return parse_config(path.read_bytes(), path)


def _status(config: Config) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = db_command.status(config, as_json=True, out=out)
    return code, json.loads(out.getvalue()) if code == 0 else {}


def _migrate(config: Config) -> tuple[int, str]:
    out = io.StringIO()
    return db_command.migrate(config, out=out), out.getvalue()


def _execute(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql, params)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(
    epoch: str, seqs: range, produced_at: datetime, source: str = "synthetic"
) -> list[UserRow]:
    rows = []
    for seq in seqs:
        raw = synthetic_user(f"admin-{epoch}", seq)
        env = Envelope(seq, epoch, source, produced_at, produced_at)
        rows.append(row_values(parse_user(raw), raw, env))
    return rows


def _postgres_processes(data_dir: Path) -> list[int]:
    """Processes whose command line names `data_dir` (the server, its guard)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(data_dir).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_status_of_an_empty_database_lists_every_migration_pending_and_creates_nothing(
    dsn: str, tmp_path: Path
) -> None:
    code, report = _status(_config(tmp_path, dsn))
    assert code == 0
    assert report["schema"] == {"applied": [], "pending": VERSIONS, "unknown": []}
    assert report["database"] == {
        "target": admin.describe_dsn(dsn),
        "embedded": False,
        "started": False,
    }
    for section in ("rows", "epochs", "ingest", "dead_letters", "upstream_budget"):
        assert report[section] is None, section
    assert query(dsn, "SELECT to_regclass('incoming_users'), to_regclass('schema_migrations')") == [
        (None, None)
    ]


def test_migrate_applies_the_pending_versions_once_then_status_shows_an_empty_schema(
    dsn: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, dsn)
    code, text = _migrate(config)
    assert code == 0
    assert [line.split()[1] for line in text.splitlines() if line.startswith("applied")] == [
        str(v) for v in VERSIONS
    ]
    assert f"now at version {VERSIONS[-1]}" in text
    code, text = _migrate(config)
    assert code == 0 and "applied " not in text and f"already at version {VERSIONS[-1]}" in text

    code, report = _status(config)
    assert code == 0
    assert report["schema"] == {"applied": VERSIONS, "pending": [], "unknown": []}
    assert report["rows"] == 0
    assert report["epochs"] == [] and report["epochs_total"] == 0
    assert report["ingest"] == {
        "last_row_at": None,
        "since_last_row_s": None,
        "window_rows": 0,
        "latency_sample": 0,
        "latency_p50_s": None,
        "latency_p99_s": None,
    }
    assert report["dead_letters"] == {"total": 0, "last_hour": 0, "latest": None}
    assert report["upstream_budget"] == {
        "url": URL,
        "window_s": 300.0,
        "spent": 0,
        "limit": 20_000,
    }


def test_status_reports_the_rows_checkpoints_dead_letters_and_budget_inserted(
    dsn: str, tmp_path: Path
) -> None:
    config = _config(tmp_path, dsn, randomuser={"budget_users": 500, "budget_window_s": 600})
    store = PostgresStore(dsn)
    store.migrate()
    store.begin_stream("old", "seed-old", "synthetic")
    store.begin_stream("new", "seed-new", "randomuser")
    produced = datetime.now(UTC) - timedelta(seconds=100)
    # One transaction: every row gets the same created_at, all inside the latency window.
    rows = _rows("old", range(1, 6), produced) + _rows("new", range(1, 9), produced)
    assert store.insert_users(rows, StreamCheckpoint("db", "new", 6, 60)) == 13
    store.insert_users([], StreamCheckpoint("db", "old", 5, 50))
    store.insert_users([], StreamCheckpoint("watchers", "new", 8, 80))  # another group
    _execute(
        dsn,
        "UPDATE streams SET created_at = now() - CASE epoch WHEN 'old' THEN interval '2 days'"
        " ELSE interval '1 day' END",
    )
    _execute(
        dsn,
        "UPDATE stream_checkpoints SET updated_at = now() - interval '2 days' WHERE epoch = 'old'",
    )
    hostile = "\x1b[31mred\x1b[0m\tand\nnext\x07\u202eevil " + "x" * 500
    store.insert_dead_letters(
        [
            DeadLetter("randomuser", 1, None, "old error", {"n": 1}),
            DeadLetter("randomuser", 2, None, "second error", {"n": 2}),
            DeadLetter("consumer", None, 9, hostile, {"n": 3}),
        ]
    )
    _execute(
        dsn,
        "UPDATE dead_letters SET received_at = now() - interval '2 hours' WHERE error = 'old error'",
    )
    _execute(
        dsn,
        "INSERT INTO upstream_budget (url, spent_at, users) VALUES"
        " (%s, now() - interval '1 minute', 60), (%s, now(), 40),"
        " (%s, now() - interval '1 hour', 1000), ('http://other/api/1.4/', now(), 7)",
        (URL, URL, URL),
    )
    store.close()

    code, report = _status(config)
    assert code == 0
    assert report["rows"] == 13
    assert report["group"] == "db"
    assert report["epochs_total"] == 2
    epochs = [
        (e["epoch"], e["source"], e["rows"], e["latest_seq"], e["checkpoint_lag"])
        for e in report["epochs"]
    ]
    assert epochs == [("new", "randomuser", 8, 8, 2), ("old", "synthetic", 5, 5, 0)]
    checkpoints = [{k: e["checkpoint"][k] for k in ("seq", "position")} for e in report["epochs"]]
    assert checkpoints == [{"seq": 6, "position": 60}, {"seq": 5, "position": 50}]
    ingest = report["ingest"]
    assert ingest["window_rows"] == ingest["latency_sample"] == 13
    assert ingest["since_last_row_s"] >= 0
    assert 100 <= ingest["latency_p50_s"] <= ingest["latency_p99_s"]  # lower bounds only
    dead = report["dead_letters"]
    assert (dead["total"], dead["last_hour"]) == (3, 2)
    assert dead["latest"]["source"] == "consumer"
    error = dead["latest"]["error"]
    assert error.startswith("[31mred[0m and nextevil xxx") and error.endswith("...")
    assert len(error) == admin.ERROR_CHARS_MAX
    assert report["upstream_budget"] == {"url": URL, "window_s": 600.0, "spent": 100, "limit": 500}

    out = io.StringIO()
    assert db_command.status(config, out=out) == 0
    text = out.getvalue()
    assert "13 in incoming_users" in text
    assert "3 total, 2 in the last hour" in text
    assert "13 rows in the minute up to the last row" in text
    assert "100 of 500 users in the last 600 s" in text
    assert not any(c in text for c in "\x1b\x07\u202e\t")
    table = [line.split() for line in text.splitlines() if line.startswith(("new ", "old "))]
    assert [row[:9] for row in table] == [
        ["new", "randomuser", "8", "synthetic", "8", "8", "6", "60", "2"],
        ["old", "synthetic", "5", "synthetic", "5", "5", "5", "50", "0"],
    ]


def test_status_says_what_the_rows_of_an_epoch_are(dsn: str, tmp_path: Path) -> None:
    """An epoch begun with source = "randomuser" whose users came mostly from the
    synthetic fallback: status counts the rows by the source each row records (issue 22
    item 12), beside the epoch's configured source."""
    config = _config(tmp_path, dsn)
    store = PostgresStore(dsn)
    store.migrate()
    store.begin_stream("mixed", "seed-mixed", "randomuser")
    produced = datetime.now(UTC)
    rows = _rows("mixed", range(1, 4), produced, "randomuser") + _rows(
        "mixed", range(4, 9), produced
    )
    assert store.insert_users(rows, StreamCheckpoint("db", "mixed", 8, 80)) == 8
    store.close()

    code, report = _status(config)
    assert code == 0
    [epoch] = report["epochs"]
    assert (epoch["source"], epoch["rows"]) == ("randomuser", 8)
    assert epoch["rows_by_source"] == {"randomuser": 3, "synthetic": 5}

    out = io.StringIO()
    assert db_command.status(config, out=out) == 0
    text = out.getvalue()
    [line] = [line for line in text.splitlines() if line.startswith("mixed ")]
    assert line.split()[:6] == ["mixed", "randomuser", "8", "randomuser", "3,", "synthetic"]
    assert "ROWS BY SOURCE is what the stored users are" in text


def test_status_never_writes(dsn: str, tmp_path: Path) -> None:
    """Read only: a half-migrated database stays half-migrated."""
    store = PostgresStore(dsn)
    store.migrate()
    store.close()
    _execute(dsn, "DELETE FROM schema_migrations WHERE version = %s", (VERSIONS[-1],))
    code, report = _status(_config(tmp_path, dsn))
    assert code == 0
    assert report["schema"]["pending"] == [VERSIONS[-1]]
    assert query(dsn, "SELECT max(version) FROM schema_migrations") == [(VERSIONS[-2],)]


def test_an_unreachable_database_is_one_line_on_stderr_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    monkeypatch.setenv("USERSTREAMD_DB_PASSWORD", "env-secret-1")
    dsn = f"postgresql://someone:dsn-secret-2@127.0.0.1:{port}/nowhere"
    config = _config(tmp_path, dsn, daemon={"state_dir": str(tmp_path / "state")})
    for command in (lambda: db_command.status(config), lambda: db_command.migrate(config)):
        assert command() == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1, err
        assert f"host=127.0.0.1 port={port} dbname=nowhere user=someone (database.dsn)" in err
        assert "refused" in err.lower()
        assert "Traceback" not in err and "secret" not in err
    assert not (tmp_path / "state").exists()  # nothing embedded was tried


def test_printable_removes_control_characters_and_truncates() -> None:
    assert admin.printable("a\x00b\x1b[1mc\r\n\td\u200b\u2028e") == "ab[1mc d e"
    assert admin.printable("y" * 1000, 10) == "yyyyyyy..."


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Short (the server's Unix socket path has a length limit), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="usd-adm-"))
    yield folder / "state"
    shutil.rmtree(folder, ignore_errors=True)


def _lock_is_free(state: Path) -> bool:
    fd = os.open(state / "userstreamd.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new open file: conflicts with ours
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_embedded_migrate_creates_the_database_stops_its_server_and_status_reads_it(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(state_dir.parent, "", daemon={"state_dir": str(state_dir)})
    data_dir = state_dir / "postgres"
    assert db_command.status(config) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"no embedded database in {data_dir}" in err and "nothing to report" in err
    assert not data_dir.exists()

    code, text = _migrate(config)
    assert code == 0, capsys.readouterr().err
    assert "embedded server, started for this command" in text
    assert f"now at version {VERSIONS[-1]}" in text
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()  # a clean shutdown removes it
    assert _postgres_processes(data_dir) == []
    assert _lock_is_free(state_dir)

    code, text = _migrate(config)  # the lock and the socket are free again
    assert code == 0 and f"already at version {VERSIONS[-1]}" in text

    code, report = _status(config)
    assert code == 0
    assert report["database"]["embedded"] is True and report["database"]["started"] is True
    assert str(data_dir) in report["database"]["target"]
    assert report["schema"]["applied"] == VERSIONS and report["schema"]["pending"] == []
    assert report["rows"] == 0
    assert _postgres_processes(data_dir) == []
    assert _lock_is_free(state_dir)


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userstreamd", "--config", str(config_path), "db", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_migrates_and_reports_as_json(dsn: str, tmp_path: Path) -> None:
    _config(tmp_path, dsn)
    path = tmp_path / "config.toml"
    migrated = _cli(path, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"now at version {VERSIONS[-1]}" in migrated.stdout
    status = _cli(path, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["schema"]["applied"] == VERSIONS and report["rows"] == 0

    path.write_text(toml_text({"database": {"dsn": f"host=127.0.0.1 port={_closed_port()}"}}))
    failed = _cli(path, "status", "--json")
    assert failed.returncode == 1
    assert failed.stdout == "" and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("userstreamd: db status: host=127.0.0.1")
    assert "Traceback" not in failed.stderr


@pytest.mark.e2e
def test_status_reads_the_running_daemons_embedded_server(
    tmp_path: Path, daemon_factory: Any
) -> None:
    tables = {
        "daemon": {"state_dir": str(tmp_path / "state"), "log_format": "json"},
        "producer": {"source": "synthetic", "rate_per_s": 50},
        "broadcaster": {"port": 0},
        "consumers": {"count": 1, "batch_interval_s": 0.1},
    }
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    wait_until(lambda: daemon.events("consumer.batch_inserted"), 30, "a batch stored")

    status = _cli(daemon.config_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["database"]["embedded"] is True and report["database"]["started"] is False
    assert report["schema"]["pending"] == [] and report["rows"] > 0
    [epoch] = report["epochs"]
    assert epoch["rows"] > 0 and epoch["checkpoint"]["seq"] <= epoch["latest_seq"]
    migrated = _cli(daemon.config_path, "migrate")
    assert migrated.returncode == 0 and "already at version" in migrated.stdout
    assert daemon.stop() == 0  # the commands left the daemon's server alone
