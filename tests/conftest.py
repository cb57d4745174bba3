"""Shared fixtures: a real PostgreSQL server, one fresh database per test, the daemon as
a child process, and the fake Random User API.

PostgreSQL is the embedded server (the same code the daemon uses) started once per test
session, unless ``USERSTREAMD_TEST_DSN`` names an external server; either way each test
that asks for ``dsn`` gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from userstreamd.config import Config, load_config, toml_text
from userstreamd.store.embedded import EmbeddedPostgres
from userstreamd.stream.records import SECRET_LOGIN_FIELDS

from .fakeapi import FakeRandomUserAPI


class PostgresForTests:
    """The tests' PostgreSQL server: embedded (ours to stop and start) or external."""

    def __init__(self, data_dir: Path | None = None) -> None:
        """The session's server; or, given `data_dir`, the embedded server a daemon left."""
        self.external = None if data_dir else os.environ.get("USERSTREAMD_TEST_DSN")
        self.server: EmbeddedPostgres | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if self.external:
            self.dsn = self.external
            return
        data_dir = data_dir or Path(tempfile.mkdtemp(prefix="usd-pg-")) / "data"
        self.server = EmbeddedPostgres(data_dir)
        self.server.prepare()
        self.start()
        self.dsn = self.server.dsn

    def __enter__(self) -> PostgresForTests:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        assert self.server is not None
        with self.server.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.server.command(), stdin=subprocess.PIPE, **self.server.process_options(log)
            )
        self.server.wait_ready(self.proc)

    def stop(self) -> None:
        """Close the server's lifeline (a fast shutdown) and wait for it."""
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(60)

    @contextlib.contextmanager
    def down(self, dbname: str) -> Iterator[None]:
        """PostgreSQL gone while the block runs: the embedded server is stopped, then
        started again; an external one (not ours to stop) refuses and drops connections to
        `dbname`."""
        if self.server is not None:
            self.stop()
            try:
                yield
            finally:
                self.start()
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
        try:
            yield
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')

    def outage(self, dbname: str, seconds: float) -> None:
        """PostgreSQL gone for `seconds`, then back."""
        with self.down(dbname):
            time.sleep(seconds)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresForTests]:
    server = PostgresForTests()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server(postgres: PostgresForTests) -> str:
    """DSN of a PostgreSQL server the tests may create databases on."""
    return postgres.external or make_conninfo(postgres.dsn, dbname="postgres")


@pytest.fixture
def dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(pg_server, dbname=name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def fake_api() -> Iterator[FakeRandomUserAPI]:
    with FakeRandomUserAPI() as api:
        yield api


@dataclass
class DaemonProcess:
    """`userstreamd --config FILE` as a real child process, its JSON log collected."""

    config_path: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # after --config FILE: ["run", "--role", ...]
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> DaemonProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userstreamd", "--config", str(self.config_path), *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def wait_for(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if events := self.events(name):
                return events[0]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before {name}:\n"
                    + self.log_path.read_text()[-4000:]
                )
            time.sleep(0.05)
        raise AssertionError(
            f"no {name} within {timeout_s}s:\n" + self.log_path.read_text()[-4000:]
        )

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def stop_when_exited(self, timeout_s: float = 60.0) -> int:
        """Wait for the daemon to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def make(
        tables: dict[str, dict[str, Any]],
        name: str = "daemon",
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> DaemonProcess:
        config = tmp_path / f"{name}.toml"
        config.write_text(toml_text(tables))
        daemon = DaemonProcess(config, tmp_path / f"{name}.log", env or {}, args or []).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.kill()


RUN_S = 5.0


def daemon_tables(tmp_path: Any, dsn: str) -> dict[str, dict[str, Any]]:
    return {
        "daemon": {
            "state_dir": str(tmp_path / "state"),
            "log_level": "debug",
            "log_format": "json",
            "stats_interval_s": 1.0,
        },
        "broadcaster": {"port": 0},
        "http": {"port": 0},
        "consumers": {"count": 2, "batch_interval_s": 0.1},
        "database": {"dsn": dsn, "milestone_every": 100},
    }


def stream_then_sigint(daemon: Any, run_s: float = RUN_S) -> list[dict[str, Any]]:
    """Let it stream for RUN_S seconds, SIGINT, return the published events."""
    daemon.wait_for("daemon.ready")
    time.sleep(run_s)
    assert daemon.stop() == 0, daemon.log_path.read_text()[-3000:]
    return daemon.events("producer.published")


def assert_rows_match(dsn: str, published: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    uuids = {e["uuid"] for e in published}
    assert len(uuids) == len(published), "the producer published a uuid twice"
    rows = query(
        dsn,
        """SELECT uuid::text, seq, first_name, last_name, email, country, city,
                                state, postcode, latitude, longitude, dob, age, nat,
                                picture_large, username, street_number, raw
                         FROM incoming_users""",
    )
    assert {r[0] for r in rows} == uuids
    assert len(rows) == len(uuids)
    by_seq = {e["seq"]: e["uuid"] for e in published}
    for (
        uid,
        seq,
        first,
        last,
        email,
        country,
        city,
        state,
        postcode,
        lat,
        lon,
        dob,
        age,
        nat,
        picture,
        username,
        street_number,
        raw,
    ) in rows:
        assert by_seq[seq] == uid
        assert raw["login"]["uuid"] == uid
        assert (first, last) == (raw["name"]["first"], raw["name"]["last"])
        assert email == raw["email"] and nat == raw["nat"] and username == raw["login"]["username"]
        loc = raw["location"]
        assert (country, city, state) == (loc["country"], loc["city"], loc["state"])
        assert postcode == str(loc["postcode"])
        assert street_number == loc["street"]["number"]
        assert lat == float(loc["coordinates"]["latitude"])
        assert lon == float(loc["coordinates"]["longitude"])
        assert dob == datetime.fromisoformat(raw["dob"]["date"])
        assert age == raw["dob"]["age"]
        assert picture == raw["picture"]["large"]
        assert not set(SECRET_LOGIN_FIELDS) & set(raw["login"]), "fake credentials stored"
    return rows


# -- a local NATS JetStream cluster (tests/cluster, and the contract tests' nats case) ----

_streams = itertools.count(1)


@pytest.fixture(scope="session")
def nats_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A 3-node JetStream cluster shared by the tests that do not kill its nodes (each
    test gets a stream of its own); the ones that do start their own (`LocalCluster`)."""
    from userstreamd.testing.nats import LocalCluster

    with LocalCluster(tmp_path_factory.mktemp("nats")) as cluster:
        yield cluster.urls


@pytest.fixture
def nats_config(tmp_path: Path, dsn: str, nats_urls: list[str]) -> Any:
    """make(**tables): a config on the shared cluster, with a stream of this test's own."""
    from .helpers import write_config

    stream = f"T{next(_streams)}"

    def make(**tables: dict[str, Any]) -> Config:
        cluster = {"bus": "nats", "servers": nats_urls, "stream": stream, "lease_ttl_s": 2.0}
        merged = {**tables}
        merged["producer"] = {"source": "synthetic", **tables.get("producer", {})}
        merged["cluster"] = {**cluster, **tables.get("cluster", {})}
        return load_config(write_config(tmp_path, dsn, **merged))

    return make
