"""Dead letters: records that failed validation, kept in PostgreSQL with the reason.

The producer hands each invalid record over without waiting (`put`); a writer task
stores them in batches and retries through database outages (`StoreCalls.retrying`).
Only if more than `capacity` are waiting are further ones dropped - counted and logged,
never silent. At stop, what is queued is written within `flush_at_stop_s`; what still
cannot be is counted and logged (``dead_letters.dropped_at_stop``). The store leaves the
API's fake credentials out of every letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from ..logs import get_logger
from ..store.calls import DEFAULT_RETRY, RetryPolicy, StoreCalls
from ..store.postgres import DeadLetter, PostgresStore

BATCH = 500


@dataclass(frozen=True)
class DeadLetterStatistics:
    received: int
    written: int
    dropped: int


class DeadLetters:
    def __init__(
        self,
        store: PostgresStore,
        *,
        capacity: int = 1000,
        flush_at_stop_s: float = 5.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.db = StoreCalls(store, retry=retry)
        self.flush_at_stop_s = flush_at_stop_s
        self._send, self._receive = trio.open_memory_channel[DeadLetter](capacity)
        self.received = self.written = self.dropped = 0

    def statistics(self) -> DeadLetterStatistics:
        return DeadLetterStatistics(self.received, self.written, self.dropped)

    def put(self, source: str, position: int | None, error: str, raw: Any) -> None:
        self.received += 1
        try:
            self._send.send_nowait(DeadLetter(source, position, None, error, raw))
        except trio.WouldBlock:
            self.dropped += 1
            get_logger().error(
                "dead_letters.dropped",
                source=source,
                position=position,
                error=error,
                dropped=self.dropped,
            )

    async def run(self) -> None:
        """Write letters as they come, in batches; retry while the database is down."""
        batch: list[DeadLetter] = []
        try:
            while True:
                batch = [await self._receive.receive()]
                self._take_nowait(batch)
                await self._write(batch)
                batch = []
        finally:
            with trio.move_on_after(self.flush_at_stop_s, shield=True):
                while self._take_nowait(batch):
                    await self._write(batch)
                    batch = []
            if lost := len(batch) + self._receive.statistics().current_buffer_used:
                self.dropped += lost
                get_logger().error("dead_letters.dropped_at_stop", letters=lost)
            await self.db.aclose()

    def _take_nowait(self, batch: list[DeadLetter]) -> list[DeadLetter]:
        """Fill `batch` up to BATCH letters from what is queued; return it."""
        while len(batch) < BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return batch

    async def _write(self, batch: list[DeadLetter]) -> None:
        await self.db.retrying(
            "dead_letters.insert_failed",
            self.db.store.insert_dead_letters,
            batch,
            letters=len(batch),
        )
        self.written += len(batch)
        get_logger().info("dead_letters.stored", letters=len(batch), total=self.written)
