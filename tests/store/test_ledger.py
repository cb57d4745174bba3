"""The budget ledger against a real PostgreSQL: a restart inside the window remembers what
the API served, and the database never holds up the stream."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest
import trio
from structlog.testing import capture_logs

from userstreamd.sources.randomuser import RandomUserSource, UserBudget
from userstreamd.store.ledger import BudgetLedger
from userstreamd.store.postgres import PostgresStore

from ..conftest import query
from ..fakeapi import FakeRandomUserAPI


@pytest.fixture
def migrated(dsn: str) -> Iterator[str]:
    store = PostgresStore(dsn)
    store.migrate()
    store.close()
    yield dsn


@pytest.fixture
def stores() -> Iterator[list[PostgresStore]]:
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def _budget(stores: list[PostgresStore], dsn: str, url: str, **kw: float) -> UserBudget:
    """A budget of 1,000 users per 300 s whose ledger is in `dsn` (a new connection)."""
    stores.append(PostgresStore(dsn))
    return UserBudget(1000, 300.0, ledger=BudgetLedger(stores[-1], url, **kw))


async def test_a_restarted_budget_remembers_what_the_api_served(
    migrated: str, fake_api: FakeRandomUserAPI, stores: list[PostgresStore]
) -> None:
    url = fake_api.url
    with psycopg.connect(migrated, autocommit=True) as conn:  # outside the window: forgotten
        conn.execute(
            "INSERT INTO upstream_budget VALUES (%s, now() - interval '400 s', 700)", (url,)
        )
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            first = RandomUserSource(
                client, url, seed="s", page_size=300, budget=_budget(stores, migrated, url)
            )
            assert len(await first.fetch(1, 300)) == 300
            assert len(await first.fetch(301, 300)) == 300
            # A restart: another store, ledger and budget for the same API.
            again = _budget(stores, migrated, url)
            await again.load()
            elsewhere = _budget(stores, migrated, "https://randomuser.me/api/1.4/")
            await elsewhere.load()
    now = trio.current_time()
    assert again.delay_for(400, now) == 0
    assert 290 < again.delay_for(401, now) <= 300, "600 of 1,000 spent inside the window"
    assert elsewhere.delay_for(1000, now) == 0, "another API's budget is its own"
    assert len(fake_api.requests) == 2
    rows = query(migrated, "SELECT url, users FROM upstream_budget ORDER BY spent_at")
    assert rows == [(url, 300), (url, 300)], "one row per served request; old ones pruned"


async def test_an_unreachable_database_is_logged_and_the_budget_goes_on(
    stores: list[PostgresStore],
) -> None:
    dsn = "host=127.0.0.1 port=1 dbname=none user=none"  # nothing listens on port 1
    budget = _budget(stores, dsn, "u")
    with capture_logs() as logs, trio.fail_after(30):
        await budget.load()
        await budget.record(400)
    assert budget.delay_for(600, trio.current_time()) == 0
    assert budget.delay_for(601, trio.current_time()) > 0, "still counted in memory"
    failures = [e for e in logs if e["event"] == "producer.budget_ledger_failed"]
    assert [e["action"] for e in failures] == ["load", "record"]
    assert failures[-1]["unwritten"] == 1


async def test_a_stalled_database_never_holds_up_a_spend(
    migrated: str, stores: list[PostgresStore]
) -> None:
    stores.append(PostgresStore(migrated))
    ledger = BudgetLedger(stores[-1], "u", timeout_s=0.5)
    budget = UserBudget(1000, 300.0, ledger=ledger)
    await budget.load()
    with psycopg.connect(migrated) as blocker, capture_logs() as logs, trio.fail_after(30):
        blocker.execute("LOCK TABLE upstream_budget IN ACCESS EXCLUSIVE MODE")
        await budget.record(100)  # returns while the table is still locked
        blocker.rollback()
    [failure] = [e for e in logs if e["event"] == "producer.budget_ledger_failed"]
    assert failure["error"] == "no answer within 0.5 s"
    assert budget.delay_for(901, trio.current_time()) > 0
    ledger.timeout_s = 30  # (now only a slow machine could make it wait)
    with trio.fail_after(60):
        await budget.record(50)  # the spend that was held up is written too
    rows = query(migrated, "SELECT users FROM upstream_budget ORDER BY spent_at")
    assert rows == [(100,), (50,)]
