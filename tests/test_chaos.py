"""Lose nothing, whatever crashes: a bounded chaos run against the real daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from userstreamd.sources.synthetic import synthetic_user

from .conftest import PostgresForTests, daemon_tables, query
from .helpers import wait_until

pytestmark = pytest.mark.e2e

SEED = "chaos"
RATE = 600
STOP_AT = 15_000  # the known position P the producer stops at


def _kill_a_consumer(daemon: Any, worker: int) -> int:
    started = [e for e in daemon.events("supervisor.process_started") if e["worker"] == worker]
    pid = started[-1]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_chaos_run_loses_nothing_and_adds_nothing(
    tmp_path: Path, dsn: str, postgres: PostgresForTests, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["daemon"]["log_level"] = "info"  # 600 users/s: keep the per-user lines out
    tables["producer"] = {
        "source": "synthetic",
        "rate_per_s": RATE,
        "seed": SEED,
        "stop_at_position": STOP_AT,
    }
    tables["consumers"].update(processes=True, batch_size=200)
    tables["supervisor"] = {"max_restarts": 10, "drain_timeout_s": 20}
    first = daemon_factory(tables, name="first")
    first.wait_for("daemon.ready")

    # Three consumer processes killed -9, a second and a half apart.
    killed = []
    for worker in (1, 2, 1):
        time.sleep(1.5)
        wait_until(
            lambda w=worker: any(
                e["worker"] == w and e["pid"] not in killed
                for e in first.events("supervisor.process_started")
            ),
            10,
        )
        killed.append(_kill_a_consumer(first, worker))
    # PostgreSQL gone for 5 s, then back.
    time.sleep(1)
    postgres.outage(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"], 5.0)  # type: ignore[arg-type]
    time.sleep(3)
    # The whole daemon killed -9, mid-stream.
    first.proc.kill()
    first.proc.wait()
    assert len([e for e in first.events("supervisor.component_crashed")]) >= 3
    assert first.events("consumer.insert_failed"), "the outage was felt"
    assert not first.events("producer.stopped_at_position"), "killed before the end"

    second = daemon_factory(tables, name="second")
    resumed = second.wait_for("daemon.stream_resumed")
    assert resumed["position"] > 0
    second.wait_for("producer.stopped_at_position", timeout_s=90)
    count = "SELECT count(*) FROM incoming_users"
    wait_until(lambda: query(dsn, count)[0][0] >= STOP_AT, 60)
    assert second.stop() == 0

    uuids = [r[0] for r in query(dsn, "SELECT uuid::text FROM incoming_users")]
    expected = {synthetic_user(SEED, p)["login"]["uuid"] for p in range(1, STOP_AT + 1)}
    assert len(uuids) == len(set(uuids)), "no duplicate"
    missing, extra = expected - set(uuids), set(uuids) - expected
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} extra"
