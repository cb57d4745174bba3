"""The dead-letter writer against a real PostgreSQL: credentials, outages, stop."""

from __future__ import annotations

import trio
import trio.testing
from structlog.testing import capture_logs

from userstreamd.produce.deadletters import DeadLetters, DeadLetterStatistics
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.calls import RetryPolicy
from userstreamd.store.postgres import PostgresStore
from userstreamd.stream.records import SECRET_LOGIN_FIELDS

from .conftest import query
from .helpers import eventually, table_locked

FAST = RetryPolicy(wait_initial_s=0.01, wait_max_s=0.05, wait_jitter_s=0.01)


def _migrated(dsn: str, **kwargs: float) -> PostgresStore:
    store = PostgresStore(dsn, **kwargs)
    store.migrate()
    return store


async def test_a_letter_from_the_producer_loses_the_fake_credentials(dsn: str) -> None:
    letters = DeadLetters(_migrated(dsn))
    raw = synthetic_user("letters", 4)
    del raw["login"]["uuid"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(letters.run)
            letters.put("randomuser", 4, "missing required field `uuid`", raw)
            await eventually(lambda: letters.statistics().written == 1)
            nursery.cancel_scope.cancel()
    [(position, seq, login)] = query(dsn, "SELECT position, seq, raw->'login' FROM dead_letters")
    assert (position, seq) == (4, None)
    assert login == {"username": raw["login"]["username"]}
    assert set(SECRET_LOGIN_FIELDS) <= set(raw["login"]), "the producer's record is untouched"


async def test_letters_queued_at_stop_are_written(dsn: str) -> None:
    letters = DeadLetters(_migrated(dsn))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(letters.run)
            await trio.testing.wait_all_tasks_blocked()
            for p in range(1, 4):
                letters.put("randomuser", p, "bad", {"p": p})
            nursery.cancel_scope.cancel()  # before the writer had a turn
    assert query(dsn, "SELECT position FROM dead_letters ORDER BY 1") == [(1,), (2,), (3,)]
    assert letters.statistics() == DeadLetterStatistics(received=3, written=3, dropped=0)


async def test_letters_that_cannot_be_written_at_stop_are_counted_and_logged(dsn: str) -> None:
    store = _migrated(dsn, statement_timeout_s=0.2)
    letters = DeadLetters(store, flush_at_stop_s=0.5, retry=FAST)
    with capture_logs() as logs, trio.fail_after(30):
        async with table_locked(dsn, "dead_letters"), trio.open_nursery() as nursery:
            nursery.start_soon(letters.run)
            for p in range(1, 4):
                letters.put("randomuser", p, "bad", {"p": p})
            await eventually(lambda: any(e["event"] == "dead_letters.insert_failed" for e in logs))
            nursery.cancel_scope.cancel()
    [dropped] = [e for e in logs if e["event"] == "dead_letters.dropped_at_stop"]
    assert dropped["letters"] == 3 and dropped["log_level"] == "error"
    assert letters.statistics() == DeadLetterStatistics(received=3, written=0, dropped=3)
    assert query(dsn, "SELECT count(*) FROM dead_letters") == [(0,)]
