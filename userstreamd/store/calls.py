"""Database calls from trio tasks: in a worker thread, watched, retried through outages.

`StoreCalls` wraps one `PostgresStore` (one connection, so one call at a time). Each
call runs in a thread; while it has waited longer than the store's `stall_warning_s`
a watchdog logs ``database.stalled`` (the action, the seconds waited) at that interval,
and ``database.stall_ended`` when it returns: a hung server (stopped, or a statement
blocked on a lock) is never silent, even where no timeout can fire.

`retrying` is the one retry policy of the consumers and the dead-letter writer (stamina:
exponential backoff with jitter): a `StoreError` is retried for as long as the task runs
- rows are never dropped for a database outage, a read-only server or an error nobody
classified - each logged with the caller's event (a warning; an error when its fault is
``unknown``, see `faults`); only a refusal of the row itself (fault ``row``) is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import stamina
import trio

from ..errors import StoreError
from ..logs import get_logger
from .postgres import PostgresStore

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# Our own events (consumer.insert_failed, ...) log each retry; stamina's default hooks
# would log every one a second time.
stamina.instrumentation.set_on_retry_hooks(())


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between attempts: `wait_initial_s` doubling up to `wait_max_s`, plus a
    random jitter of up to `wait_jitter_s`."""

    wait_initial_s: float = 0.1
    wait_max_s: float = 5.0
    wait_jitter_s: float = 0.5


DEFAULT_RETRY = RetryPolicy()


def _retried(exc: Exception) -> bool:
    return isinstance(exc, StoreError) and exc.fault != "row"


class StoreCalls:
    def __init__(self, store: PostgresStore, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.store = store
        self.retry = retry
        self.failures = 0  # StoreErrors raised by calls, retried or not
        self._limiter = trio.CapacityLimiter(1)

    async def once(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` in a worker thread, with the stall watchdog."""
        log, action = get_logger(), getattr(fn, "__name__", "call")
        stall_s = self.store.stall_warning_s
        started = trio.current_time()
        stalled = False

        async def watch() -> None:
            nonlocal stalled
            while True:
                await trio.sleep(stall_s)
                stalled = True
                waited = trio.current_time() - started
                log.warning("database.stalled", action=action, waited_s=round(waited, 1))

        # A thread cannot be cancelled, only waited for: like `trio.to_thread.run_sync`, a
        # cancellation counts before the call starts and after it returns, never between
        # (so a committed write is never reported as failed).
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                # Kept, not raised here: it would reach the caller wrapped in a group.
                error: Exception | None = None
                try:
                    value = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
                except Exception as exc:
                    error = exc
                nursery.cancel_scope.cancel()
        if stalled:
            waited = trio.current_time() - started
            log.warning(
                "database.stall_ended", action=action, waited_s=round(waited, 1), ok=error is None
            )
        if error is not None:
            if isinstance(error, StoreError):
                self.failures += 1
            raise error
        return value

    async def retrying(self, event: str, fn: Callable[[*Ts], T], *args: *Ts, **fields: Any) -> T:
        """`once`, again after each StoreError (logged as `event` with `fields`) until it
        succeeds; a refusal of the row itself (fault ``row``) is raised."""
        r = self.retry
        async for attempt in stamina.retry_context(
            on=_retried,
            attempts=None,
            timeout=None,
            wait_initial=r.wait_initial_s,
            wait_max=r.wait_max_s,
            wait_jitter=r.wait_jitter_s,
        ):
            with attempt:
                try:
                    return await self.once(fn, *args)
                except StoreError as exc:
                    if exc.fault != "row":
                        log = get_logger()
                        (log.warning if exc.transient else log.error)(
                            event,
                            error=str(exc),
                            fault=exc.fault,
                            sqlstate=exc.sqlstate,
                            attempt=attempt.num,
                            retry_in_s=round(attempt.next_wait, 3),  # before jitter
                            **fields,
                        )
                    raise
        raise AssertionError("unreachable: retried until it returned or raised")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)
