"""The Random User API's budget (users per window): a spent one is an open circuit, and
every request that may have reached the API is counted.

On trio's autojump clock with a scripted source for the switches and the log lines; over
real HTTP to the fake API with the ledger in a real PostgreSQL for what is counted and
for a restart inside the window. The daemon end to end is in test_budget_e2e.py.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from userstreamd.errors import SourceUnavailable
from userstreamd.ops.health import readiness
from userstreamd.ops.status import Status
from userstreamd.produce.producer import Producer
from userstreamd.sources.randomuser import RandomUserSource, UserBudget
from userstreamd.sources.synthetic import SyntheticSource
from userstreamd.store.ledger import BudgetLedger
from userstreamd.store.postgres import PostgresStore
from userstreamd.stream.hub import Hub

from .conftest import query
from .fakeapi import FakeRandomUserAPI, Fault
from .test_producer import ScriptedSource

Got = list[tuple[float, dict[str, Any]]]


async def _collect(hub: Hub, into: Got) -> None:
    sub = hub.subscribe("test")
    while True:
        into.append((trio.current_time(), json.loads(await hub.next_frame(sub))))


# -- a spent budget, on the virtual clock ---------------------------------------------------------


async def test_a_spent_budget_switches_to_the_fallback_at_once_and_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([])  # the API answers every request
    hub = Hub("e")
    producer = Producer(
        hub,
        primary,
        rate_per_s=10,
        page_size=10,
        fallback=SyntheticSource("fb"),
        probe_interval_s=5,
    )
    got: Got = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, hub, got)
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(producer.run)
            await trio.sleep(3)
            primary.ready_at = 60.0  # the budget is spent until then
            await trio.sleep(30)
            during = producer.statistics()
            await trio.sleep(40)
            nursery.cancel_scope.cancel()
    assert during.active_source == "synthetic" and during.fallback_active
    assert during.budget_wait_until is None, "the stream does not wait: nothing to say"
    assert readiness(Status(started=True, producer=during)).ready
    times = [t for t, _ in got]
    assert max(b - a for a, b in itertools.pairwise(times)) == pytest.approx(0.1), "no pause"
    sources = [source for source, _ in itertools.groupby(m["source"] for _, m in got)]
    assert sources == ["randomuser", "synthetic", "randomuser"]
    back = next(t for t, m in got if t > 10 and m["source"] == "randomuser")
    assert 60 <= back <= 62, "back once the window allows (after the page fetched ahead)"
    assert not [t for t in primary.calls if 5 < t < 60], "the API was not asked meanwhile"
    assert [m["seq"] for _, m in got] == list(range(1, len(got) + 1))
    assert not producer.statistics().fallback_active
    spent = [e for e in logs if e["event"] == "producer.budget_spent"]
    assert len(spent) == 1 and spent[0]["log_level"] == "warning" and spent[0]["until"]
    assert [e["reason"] for e in logs if e["event"] == "producer.fallback_on"] == ["budget"]
    assert [e["event"] for e in logs if e["event"] == "producer.fallback_off"]


async def test_a_spent_budget_without_a_fallback_waits_and_says_until_when(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([])
    hub = Hub("e")
    producer = Producer(hub, primary, rate_per_s=10, page_size=10)
    got: Got = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, hub, got)
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(producer.run)
            await trio.sleep(3)
            primary.ready_at = 40.0
            await trio.sleep(20)
            during = producer.statistics()
            await trio.sleep(30)
            nursery.cancel_scope.cancel()
    assert during.budget_wait_until is not None and during.active_source == "randomuser"
    found = readiness(Status(started=True, producer=during))
    assert not found.ready and found.alive, "not ready, but a restart would not help"
    assert found.problems["source"].startswith(
        f"waiting for the randomuser budget until {during.budget_wait_until}"
    )
    assert producer.statistics().budget_wait_until is None
    assert readiness(Status(started=True, producer=producer.statistics())).ready
    assert not [t for t, _ in got if 6 < t < 40], "no users invented"
    assert [t for t, _ in got if t > 40], "users again once the window allows"
    [wait] = [e for e in logs if e["event"] == "producer.budget_wait"]
    assert wait["log_level"] == "warning"
    assert wait["until"] == during.budget_wait_until and 30 <= wait["wait_s"] <= 37


# -- a source that stays down is said once ------------------------------------------------------


@pytest.mark.parametrize("fallback", [True, False])
async def test_a_source_down_for_18_minutes_is_said_once_then_reminded(
    autojump_clock: trio.abc.Clock, fallback: bool
) -> None:
    primary = ScriptedSource([SourceUnavailable("connection failed", kind="connect")] * 10_000)
    producer = Producer(
        Hub("e"),
        primary,
        rate_per_s=1,
        page_size=5,
        fallback=SyntheticSource("fb") if fallback else None,
        probe_interval_s=30,
        retry_max_s=30,
    )
    previous = structlog.get_config()
    try:
        with capture_logs() as logs:  # (every level, whatever an earlier test configured)
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
            async with trio.open_nursery() as nursery:
                await nursery.start(producer.run)
                await trio.sleep(1100)  # reminders by 330, 660, 990 s; none before 1200
                nursery.cancel_scope.cancel()
    finally:
        structlog.configure(**previous)
    failed = [e for e in logs if e["event"] in ("producer.fetch_failed", "producer.probe_failed")]
    assert len(failed) == len(primary.calls) > 30
    by_level = {
        level: [e["failures"] for e in failed if e["log_level"] == level]
        for level in ("warning", "info", "debug")
    }
    assert by_level["warning"] == [1], "said once"
    assert len(by_level["info"]) == 3, "then a reminder every 5 minutes, with the count"
    assert by_level["info"][-1] > by_level["info"][0] > 1
    assert len(by_level["debug"]) == len(failed) - 4
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings.count("producer.circuit_open") == 1


# -- what is counted, over real HTTP, with the ledger in PostgreSQL -------------------------------


@pytest.fixture
def ledger_store(dsn: str) -> Iterator[PostgresStore]:
    store = PostgresStore(dsn)
    store.migrate()
    yield store
    store.close()


async def test_timed_out_pages_are_counted_as_the_api_counts_them(
    ledger_store: PostgresStore, dsn: str
) -> None:
    """page_size 5000 and a budget of 20,000: the API is slow to send two pages (the client
    gives up on them, the API has counted them). The ledger holds what the API counted, and
    the producer waits for the window instead of earning a 429."""
    with FakeRandomUserAPI(rate_limit_users=20_000, rate_limit_window_s=300) as api:
        api.push(Fault.hang(10.0), Fault.hang(10.0))  # (beyond the 4 s timeout, even on busy cores)
        budget = UserBudget(20_000, 300.0, ledger=BudgetLedger(ledger_store, api.url))
        with trio.fail_after(60), capture_logs():
            async with httpx.AsyncClient(timeout=4.0) as client:
                source = RandomUserSource(client, api.url, seed="t4", page_size=5000, budget=budget)
                producer = Producer(Hub("e"), source, rate_per_s=5000, page_size=5000)
                async with trio.open_nursery() as nursery:
                    await nursery.start(producer.run)
                    while producer.statistics().budget_wait_until is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
        served = api.users_served
        statuses = [r.status for r in api.requests]
    assert statuses == [200, 200, 200, 200] and served == 20_000
    assert producer.fetch_failures == 2
    assert producer.failures_by_kind == {"timeout": 2}
    ((ledger,),) = query(dsn, "SELECT sum(users) FROM upstream_budget")
    assert ledger == served, "the ledger holds what the API counted"
    print(f"API served {served}, ledger {ledger}, requests {statuses}")


async def test_a_restart_inside_a_spent_window_starts_on_the_fallback(
    ledger_store: PostgresStore, dsn: str, fake_api: FakeRandomUserAPI
) -> None:
    """The ledger says the window is spent (a previous run): the first user is the
    fallback's, at once, and the API is not asked."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO upstream_budget VALUES (%s, now() - interval '100 s', 1000)",
            (fake_api.url,),
        )
    budget = UserBudget(1000, 300.0, ledger=BudgetLedger(ledger_store, fake_api.url))
    hub = Hub("e")
    got: Got = []
    with trio.fail_after(30), capture_logs() as logs:
        async with httpx.AsyncClient(timeout=5.0) as client:
            source = RandomUserSource(client, fake_api.url, seed="r", page_size=100, budget=budget)
            producer = Producer(
                hub, source, rate_per_s=100, page_size=100, fallback=SyntheticSource("r")
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect, hub, got)
                await nursery.start(producer.run)
                while len(got) < 50:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                stats = producer.statistics()
                nursery.cancel_scope.cancel()
    assert {m["source"] for _, m in got} == {"synthetic"}
    assert stats.active_source == "synthetic" and stats.budget_remaining_users == 0
    assert fake_api.requests == []
    [spent] = [e for e in logs if e["event"] == "producer.budget_spent"]
    assert 190 <= spent["wait_s"] <= 200
