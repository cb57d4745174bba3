"""The daemon while its PostgreSQL is made read-only, as a failover to a hot standby
makes it: ``ALTER SYSTEM SET default_transaction_read_only`` and a reload, on the
daemon's own embedded server (so no other test's database is touched), for 10 s, then
flapping (0.4 s read-only, 1.5 s writable) for 30 s, at 1,000 users/s. Nothing is
missing, nothing is dead-lettered, nothing crashes, on either bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest

from userstreamd.store.embedded import EmbeddedPostgres

from .conftest import DaemonProcess, PostgresForTests, daemon_tables, query
from .helpers import wait_until

RATE = 1000
READ_ONLY_S = 10.0
FLAP_S, FLAP_ON_S, FLAP_OFF_S = 30.0, 0.4, 1.5


def _tables(tmp_path: Path, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tables = daemon_tables(tmp_path, "")  # the daemon's own embedded server
    tables["daemon"]["log_level"] = "info"
    tables["producer"] = {"source": "synthetic", "rate_per_s": RATE}
    for name, keys in extra.items():
        tables[name] = {**tables.get(name, {}), **keys}
    return tables


def _read_only(admin: str, on: bool) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        if on:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


def _read_only_then_flapping(daemon: DaemonProcess, admin: str) -> None:
    """Read-only for READ_ONLY_S, writable for a moment, then flapping for FLAP_S."""
    try:
        _read_only(admin, True)
        time.sleep(READ_ONLY_S)
        _read_only(admin, False)
        time.sleep(FLAP_OFF_S)
        end = time.monotonic() + FLAP_S
        while time.monotonic() < end:
            _read_only(admin, True)
            time.sleep(FLAP_ON_S)
            _read_only(admin, False)
            time.sleep(FLAP_OFF_S)
    finally:
        with contextlib.suppress(psycopg.OperationalError):  # (gone with a daemon that died)
            _read_only(admin, False)
    assert daemon.proc.poll() is None, daemon.log_path.read_text()[-4000:]


def _assert_waited_out(daemon: DaemonProcess) -> None:
    """The read-only faults reached the writers, as transient ones, and nothing else."""
    failed = [e for e in daemon.events("consumer.insert_failed") if e.get("sqlstate") == "25006"]
    assert failed, "the database was never seen read-only"
    assert {e["fault"] for e in failed} == {"transient"}
    for event in (
        "daemon.giving_up",
        "supervisor.component_crashed",
        "consumer.batch_refused",
        "consumer.row_refused",
    ):
        assert not daemon.events(event), (event, daemon.events(event)[:3])


def _admin(tmp_path: Path) -> str:
    """A superuser's DSN for the daemon's embedded server."""
    return EmbeddedPostgres(tmp_path / "state" / "postgres").dsn


def _wait_streaming(daemon: DaemonProcess) -> None:
    daemon.wait_for("daemon.ready", 120)
    daemon.wait_for("consumer.batch_inserted", 60)


@pytest.mark.e2e
def test_a_read_only_database_loses_nothing_on_the_embedded_bus(
    tmp_path: Path, daemon_factory: Any
) -> None:
    daemon = daemon_factory(_tables(tmp_path))
    _wait_streaming(daemon)
    _read_only_then_flapping(daemon, _admin(tmp_path))
    assert daemon.stop() == 0, daemon.log_path.read_text()[-4000:]
    _assert_waited_out(daemon)
    published = daemon.events("daemon.stopped")[0]["published"]
    assert published > READ_ONLY_S * RATE / 2, published
    with PostgresForTests(tmp_path / "state" / "postgres") as server:
        seqs = [seq for (seq,) in query(server.dsn, "SELECT seq FROM incoming_users ORDER BY 1")]
        letters = query(server.dsn, "SELECT count(*) FROM dead_letters")
    assert seqs == list(range(1, published + 1))  # (the drain committed every one)
    assert letters == [(0,)]


def _last_seq(urls: list[str], stream: str) -> int:
    async def ask() -> int:
        nc = await nats.connect(servers=urls)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.last_seq)
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.mark.cluster
def test_a_read_only_database_loses_nothing_on_the_nats_bus(
    tmp_path: Path, daemon_factory: Any, nats_urls: list[str]
) -> None:
    stream = f"RO{uuid.uuid4().hex[:8].upper()}"
    cluster = {"bus": "nats", "servers": nats_urls, "stream": stream, "lease_ttl_s": 2.0}
    daemon = daemon_factory(_tables(tmp_path, cluster=cluster))
    _wait_streaming(daemon)
    admin = _admin(tmp_path)
    _read_only_then_flapping(daemon, admin)
    # No drain on this bus: wait until everything published by the end is stored.
    last = _last_seq(nats_urls, stream)
    assert last > READ_ONLY_S * RATE / 2, last
    sql = "SELECT count(DISTINCT seq) FROM incoming_users WHERE seq <= %s"
    wait_until(lambda: query(admin, sql, (last,)) == [(last,)], 120, "every seq stored")
    assert query(admin, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert daemon.stop() == 0, daemon.log_path.read_text()[-4000:]
    _assert_waited_out(daemon)
