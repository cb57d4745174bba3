"""The writer: rows into PostgreSQL in batches, acknowledged only after their commit.

Rows come from a receiver (`receiver.Receiver`: the WebSocket one, or the JetStream one)
through a memory channel. The writer takes them in batches (group commit: all rows
received while the previous batch was written, up to ``batch_size``;
``batch_interval_s`` > 0 lingers for more), inserts each batch in one transaction with
the receiver's checkpoint, then hands its seqs back to the receiver to acknowledge. A
failed insert keeps its batch and retries it (`StoreCalls.retrying`): rows are never
dropped for a DB outage, a read-only server or an error no one classified. A batch
refused for a row in it (a data or constraint error, by SQLSTATE: `store.faults`) is
stored row by row, each row refused for what it is going to the dead letters. The writer
outlives connections, so a reconnect does not lose rows already received.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
import trio

from ..errors import StoreError
from ..logs import get_logger
from ..store.calls import DEFAULT_RETRY, RetryPolicy, StoreCalls
from ..store.postgres import DeadLetter, PostgresStore, StreamCheckpoint, UserRow
from ..stream.protocol import Batch

FINAL_FLUSH_S = 3.0  # at stop, the time to commit what was received
Item = tuple[int, UserRow | None]  # (seq, row); None: invalid, acknowledged without a row


class Acknowledger(Protocol):
    """Where a batch's seqs go once committed (the receiver they came from)."""

    @property
    def checkpoint(self) -> StreamCheckpoint | None:
        """The checkpoint to write with the next batch (None: none yet)."""
        ...

    async def acknowledge(self, seqs: list[int], rejected: list[int], report: Batch) -> None:
        """These seqs are committed (`rejected`: set aside instead: invalid or refused)."""
        ...


class Milestones:
    """Logs ``consumer.milestone`` each time the rows inserted cross a multiple of `every`."""

    def __init__(self, every: int) -> None:
        self.every, self.total = every, 0

    def add(self, inserted: int) -> None:
        before, self.total = self.total, self.total + inserted
        if before // self.every != self.total // self.every:
            get_logger().info(
                "consumer.milestone", rows_inserted=self.total // self.every * self.every
            )


class Writer:
    def __init__(
        self,
        store: PostgresStore,
        *,
        batch_size: int = 500,
        batch_interval_s: float = 0.0,
        milestones: Milestones | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.store = store
        self.db = StoreCalls(store, retry=retry)
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.milestones = milestones or Milestones(1000)
        self.inserted = self.duplicates = self.batches = self.refused = 0
        self.acked_seq = 0
        self.stored_through = 0  # the checkpoint last written

    @property
    def db_errors(self) -> int:
        return self.db.failures

    def channel(self) -> tuple[trio.MemorySendChannel[Item], trio.MemoryReceiveChannel[Item]]:
        """The channel a receiver feeds the writer through (bounded: a few batches)."""
        return trio.open_memory_channel[Item](self.batch_size * 4)

    async def run(self, receive: trio.MemoryReceiveChannel[Item], to: Acknowledger) -> None:
        """Write what arrives on `receive` until it ends or the task is cancelled, then
        commit what was received (bounded: what is left is not acknowledged, so the
        daemon regenerates it from the stored checkpoint at its next start)."""
        batch: list[Item] = []
        try:
            while True:
                batch.append(await receive.receive())
                if self.batch_interval_s > 0:  # linger for a fuller batch
                    with trio.move_on_after(self.batch_interval_s):
                        while len(batch) < self.batch_size:
                            batch.append(await receive.receive())
                while len(batch) < self.batch_size:  # group commit: all that came meanwhile
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._write(batch, to)
                batch = []
        finally:
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if batch:
                    await self._write(batch, to)

    async def insert(self, rows: list[UserRow], checkpoint: StreamCheckpoint | None) -> int:
        """Insert (and write the checkpoint), retrying through outages; a refusal raises."""
        inserted = await self.db.retrying(
            "consumer.insert_failed", self.store.insert_users, rows, checkpoint, rows=len(rows)
        )
        if checkpoint is not None:
            self.stored_through = max(self.stored_through, checkpoint.seq)
        return inserted

    async def aclose(self) -> None:
        await self.db.aclose()

    async def _write(self, batch: list[Item], to: Acknowledger) -> None:
        log = get_logger()
        rows = [row for _, row in batch if row is not None]
        rejected = [seq for seq, row in batch if row is None]  # invalid records
        checkpoint = to.checkpoint
        started = trio.current_time()
        try:
            inserted = await self.insert(rows, checkpoint)
        except StoreError as exc:
            log.error("consumer.batch_refused", rows=len(rows), error=str(exc))
            inserted = await self._insert_one_by_one(rows, checkpoint, rejected)
        report = Batch(rows=len(rows), inserted=inserted, commit_s=trio.current_time() - started)
        seqs = [seq for seq, _ in batch]
        self.inserted += inserted
        self.duplicates += len(rows) - inserted
        self.batches += 1
        # (the group's checkpoint once there is one: until then, no field at all)
        stored = {} if checkpoint is None else {"checkpoint": checkpoint.seq}
        log.info(
            "consumer.batch_inserted",
            rows=len(rows),
            inserted=inserted,
            duplicates=len(rows) - inserted,
            seq=max(seqs),
            **stored,
        )
        self.milestones.add(inserted)
        self.acked_seq = max(self.acked_seq, *seqs)
        await to.acknowledge(seqs, rejected, report)

    async def _insert_one_by_one(
        self, rows: list[UserRow], checkpoint: StreamCheckpoint | None, refused: list[int]
    ) -> int:
        """The database refused a row of the batch: store it row by row, and each row it
        refuses for what it is (fault ``row``) in the dead letters (its seq added to
        `refused`), so one bad row neither blocks the stream nor takes others down. Any
        other fault meanwhile (a read-only server, a lost connection) is retried as
        usual: a row reaches the dead letters only for its own fault."""
        inserted = 0
        for row in rows:
            try:
                inserted += await self.insert([row], None)
            except StoreError as exc:
                self.refused += 1
                refused.append(row.seq)
                get_logger().error("consumer.row_refused", seq=row.seq, error=str(exc))
                letter = DeadLetter(
                    "consumer", None, row.seq, str(exc), msgspec.json.decode(row.raw), row.epoch
                )
                await self.db.retrying(
                    "dead_letters.insert_failed",
                    self.store.insert_dead_letters,
                    [letter],
                    letters=1,
                )
        if checkpoint is not None:
            await self.insert([], checkpoint)
        return inserted
