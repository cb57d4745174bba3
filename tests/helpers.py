"""Helpers the tests share: waiting for a condition, database blockers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import psycopg
import trio


@asynccontextmanager
async def table_locked(dsn: str, table: str) -> AsyncIterator[None]:
    """Another session holds ``ACCESS EXCLUSIVE`` on `table` (every other statement on it
    waits) until the block ends."""
    conn = await trio.to_thread.run_sync(psycopg.connect, dsn)
    try:
        await trio.to_thread.run_sync(conn.execute, f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)  # rolls back: the lock is released


async def eventually(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Return once `predicate()` holds (checked every 20 ms); fail after `timeout_s`.
    For state with no event to wait on (another process, a database)."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (nothing to wait on but the condition)
            await trio.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """`eventually` for synchronous tests."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or predicate}")
        time.sleep(0.02)
