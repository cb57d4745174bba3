"""The shipped Grafana dashboard: every panel's SQL runs against the real schema."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from userstreamd.records import parse_user
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import (
    DeadLetter,
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    row_values,
)

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = json.loads((GRAFANA / "userstreamd.json").read_text())
PANELS = [(p["title"], t["rawSql"]) for p in DASHBOARD["panels"] for t in p["targets"]]


def _expand_macros(sql: str) -> str:
    """What Grafana's PostgreSQL datasource does with $__timeFilter(column)."""
    return re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 BETWEEN now() - interval '1 hour' AND now() + interval '1 minute'",
        sql,
    )


@pytest.fixture
def filled(dsn: str) -> str:
    store = PostgresStore(dsn)
    store.migrate()
    now = datetime.now(UTC)
    rows = []
    for p in range(1, 201):
        raw = synthetic_user("grafana", p)
        rows.append(row_values(parse_user(raw), raw, Envelope(p, "ep", "synthetic", now, now)))
    store.insert_users(rows, StreamCheckpoint("db", "ep", 200, 200))
    store.insert_dead_letters(
        [DeadLetter("randomuser", 7, None, "login.uuid missing", {"login": {}})]
    )
    store.close()
    return dsn


def test_dashboard_is_wired_to_the_provisioned_datasource() -> None:
    provisioned = (GRAFANA / "provisioning" / "datasources" / "userstreamd.yaml").read_text()
    uids = {p["datasource"]["uid"] for p in DASHBOARD["panels"]}
    assert uids == {"userstreamd-pg"} and "uid: userstreamd-pg" in provisioned
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])


@pytest.mark.parametrize(("title", "sql"), PANELS, ids=[t for t, _ in PANELS])
def test_every_panel_query_runs_and_finds_data(filled: str, title: str, sql: str) -> None:
    with psycopg.connect(filled) as conn:
        rows = conn.execute(_expand_macros(sql)).fetchall()
    assert rows, f"{title}: no rows"
    assert all(value is not None for value in rows[0][:2]), f"{title}: {rows[0]}"
