"""The upstream API's spent budget, kept in PostgreSQL so that a restart remembers it.

The Random User API counts the users it served per client and window, not per process: a
daemon restarted inside the window that asked for a fresh budget would get 429s.
`BudgetLedger` keeps one row per served request (url, time, users) in ``upstream_budget``;
`sources.randomuser.UserBudget` loads the rows inside its window before its first request
and records each spend.

The database must never hold up the stream: every call waits at most `timeout_s`. A spend
that could not be written (an error, or no answer in time) is logged
(``producer.budget_ledger_failed``) and written with the next one; a load that fails starts
from an empty budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import trio

from ..errors import StoreError
from ..logs import get_logger
from .postgres import PostgresStore

TIMEOUT_S = 2.0

T = TypeVar("T")


class BudgetLedger:
    """Spends of the budget of the API at `url` (a `sources.randomuser.Ledger`)."""

    def __init__(self, store: PostgresStore, url: str, *, timeout_s: float = TIMEOUT_S) -> None:
        self.store, self.url, self.timeout_s = store, url, timeout_s
        self._window: timedelta | None = None  # rows older than this are pruned (from load)
        self._pending: list[tuple[datetime, int]] = []  # spends not written yet, in order
        self._pending_lock = threading.Lock()
        # One call at a time on the store's connection; a call given up on still holds it
        # until its thread returns, so calls never pile up behind a stalled database.
        self._limiter = trio.CapacityLimiter(1)

    async def load(self, window_s: float) -> list[tuple[float, int]]:
        """(seconds ago, users) of every spend in the last `window_s` seconds, oldest first."""
        self._window = timedelta(seconds=window_s)
        now = datetime.now(UTC)
        rows = await self._call("load", self._read, now - self._window)
        return [((now - at).total_seconds(), users) for at, users in rows or []]

    async def record(self, users: int) -> None:
        """Keep a spend of `users` now (and any earlier one not written yet)."""
        with self._pending_lock:
            self._pending.append((datetime.now(UTC), users))
        await self._call("record", self._flush)

    async def _call(self, action: str, fn: Callable[..., T], *args: Any) -> T | None:
        log = get_logger()
        with trio.move_on_after(self.timeout_s):
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=self._limiter, abandon_on_cancel=True
                )
            except StoreError as exc:
                log.warning(
                    "producer.budget_ledger_failed",
                    action=action,
                    error=str(exc),
                    unwritten=len(self._pending),
                )
                return None
        log.warning(
            "producer.budget_ledger_failed",
            action=action,
            error=f"no answer within {self.timeout_s} s",
            unwritten=len(self._pending),
        )
        return None

    # -- in a worker thread, one at a time ------------------------------------------------

    def _read(self, since: datetime) -> list[tuple[datetime, int]]:
        return self.store._run(
            "read budget",
            lambda conn: conn.execute(
                "SELECT spent_at, users FROM upstream_budget"
                " WHERE url = %s AND spent_at > %s ORDER BY spent_at",
                (self.url, since),
            ).fetchall(),
        )

    def _flush(self) -> None:
        with self._pending_lock:
            batch = list(self._pending)
        if not batch:
            return
        window = self._window

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO upstream_budget (url, spent_at, users) VALUES (%s, %s, %s)",
                    [(self.url, at, users) for at, users in batch],
                )
            if window is not None:
                conn.execute(
                    "DELETE FROM upstream_budget WHERE url = %s AND spent_at < %s",
                    (self.url, batch[-1][0] - window),
                )

        self.store._run("record budget", work)
        with self._pending_lock:
            del self._pending[: len(batch)]  # only appended to meanwhile
