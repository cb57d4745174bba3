"""Dead letters: records that failed validation, kept in PostgreSQL with the reason.

The producer hands each invalid record over without waiting (`put`); a writer task
stores them in batches and retries through database outages. Only if more than
`capacity` are waiting are further ones dropped - counted and logged, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from .errors import StoreError
from .logs import get_logger
from .store.postgres import PostgresStore

Letter = tuple[str, int | None, str, Any]


@dataclass(frozen=True)
class DeadLetterStatistics:
    received: int
    written: int
    dropped: int


class DeadLetters:
    def __init__(self, store: PostgresStore, *, capacity: int = 1000) -> None:
        self.store = store
        self._send, self._receive = trio.open_memory_channel[Letter](capacity)
        self.received = self.written = self.dropped = 0

    def statistics(self) -> DeadLetterStatistics:
        return DeadLetterStatistics(self.received, self.written, self.dropped)

    def put(self, source: str, position: int | None, error: str, raw: Any) -> None:
        self.received += 1
        try:
            self._send.send_nowait((source, position, error, raw))
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
        log = get_logger()
        try:
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < 500:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                delay = 0.1
                while True:
                    try:
                        await trio.to_thread.run_sync(self.store.insert_dead_letters, batch)
                        break
                    except StoreError as exc:
                        log.warning(
                            "dead_letters.insert_failed",
                            letters=len(batch),
                            error=str(exc),
                            retry_in_s=delay,
                        )
                        await trio.sleep(delay)
                        delay = min(5.0, delay * 2)
                self.written += len(batch)
                log.info("dead_letters.stored", letters=len(batch), total=self.written)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.close)
