"""A WebSocket client that writes the stream into PostgreSQL.

Two tasks per consumer: the *receiver* keeps a connection to the broadcaster (reconnecting
with exponential backoff and jitter) and turns frames into rows; the *writer* takes rows
in batches (group commit: all rows received while the previous batch was written, up
to ``batch_size``; ``batch_interval_s`` > 0 lingers for more), inserts each batch in one
transaction, then acknowledges its seqs.
A failed insert keeps its batch and retries it (`StoreCalls.retrying`): rows are never
dropped for a DB outage. The writer outlives connections, so a reconnect does not lose
rows already received. The reconnect backoff starts over only after a connection has
carried users: a server that accepts and closes at once (a daemon stopping) is retried
ever more slowly, not in a tight loop.

Frames: a member asks for ``users`` frames (``?batch=N``, N its batch size up to 1000)
and takes ``user`` frames as well. Each record stays the JSON text it came as: decoded
straight into typed structs (`records.decode_user`, the checks of `parse_user`, no dicts
built), then stored as that text. An invalid record is one rejection, acknowledged as
such; it never spoils the frame it came in.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlencode

import msgspec
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from ..config import Config
from ..errors import InvalidRecord, StoreError
from ..logs import bind, get_logger
from ..store.calls import DEFAULT_RETRY, RetryPolicy, StoreCalls
from ..store.postgres import (
    DeadLetter,
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    UserRow,
    row_values,
)
from ..stream.client import open_ws
from ..stream.protocol import Ack, Batch, Checkpoint, Gap, Welcome, encode
from ..stream.records import decode_user

ACK_CHUNK = 4096
MAX_FRAME_USERS = 1000  # what a broadcaster sends in one frame at most (``?batch=N``)
FINAL_FLUSH_S = 3.0  # at stop, the time to commit what was received
Item = tuple[int, UserRow | None]  # (seq, row); None: invalid, acknowledged without a row


class _User(msgspec.Struct, tag="user", frozen=True, kw_only=True, gc=False):
    """`messages.UserMessage` as the consumer decodes it: the record left as JSON text,
    to be validated on its own (one bad record is one rejection, not a bad frame)."""

    epoch: str
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a bigint column
    position: int
    produced_at: datetime
    source: str
    user: msgspec.Raw


class _Users(msgspec.Struct, tag="users", frozen=True, kw_only=True):
    items: list[_User]


_decoder = msgspec.json.Decoder(Welcome | _User | _Users | Gap | Checkpoint)


@dataclass(frozen=True)
class ConsumerStatistics:
    worker: int
    connected: bool
    received: int
    inserted: int
    duplicates: int
    batches: int
    invalid: int
    db_errors: int
    reconnects: int
    last_seq: int
    acked_seq: int


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


def make_consumer(
    config: Config, url: str, dsn: str, worker: int, milestones: Milestones
) -> Consumer:
    """A member of the configured consumer group, as the config describes it."""
    c = config.consumers
    store = PostgresStore.from_config(
        config, dsn, application_name=f"userstreamd-consumer-{worker}"
    )
    query = {"group": c.group, "window": c.window, "batch": min(c.batch_size, MAX_FRAME_USERS)}
    member_url = f"{url}?{urlencode(query)}"
    return Consumer(
        member_url,
        store,
        worker=worker,
        batch_size=c.batch_size,
        batch_interval_s=c.batch_interval_s,
        reconnect_min_s=c.reconnect_min_s,
        reconnect_max_s=c.reconnect_max_s,
        milestones=milestones,
    )


class Consumer:
    def __init__(
        self,
        url: str,
        store: PostgresStore,
        *,
        worker: int = 1,
        batch_size: int = 500,
        batch_interval_s: float = 0.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        milestones: Milestones | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.url = url
        self.token, self.ca_file = token, ca_file
        self.store = store
        self.db = StoreCalls(store, retry=retry)
        self.worker = worker
        self.batch_size = batch_size
        self.batch_interval_s = batch_interval_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.milestones = milestones or Milestones(1000)
        self.received = self.inserted = self.duplicates = self.batches = 0
        self.invalid = self.reconnects = 0
        self.last_seq = self.acked_seq = 0
        self._ws: WebSocketConnection | None = None
        self._checkpoint: StreamCheckpoint | None = None

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def db_errors(self) -> int:
        return self.db.failures

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            self.worker,
            self.connected,
            self.received,
            self.inserted,
            self.duplicates,
            self.batches,
            self.invalid,
            self.db_errors,
            self.reconnects,
            self.last_seq,
            self.acked_seq,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bind(component="consumer", worker=self.worker)
        send, receive = trio.open_memory_channel[Item](self.batch_size * 4)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_batches, receive)
                await self._receive_forever(send, task_status)
        finally:
            await self.db.aclose()

    # -- receiver ------------------------------------------------------------------------

    async def _receive_forever(
        self, send: trio.MemorySendChannel[Item], task_status: trio.TaskStatus[None]
    ) -> None:
        log = get_logger()
        delay = self.reconnect_min_s
        started = False
        while True:
            received = self.received
            try:
                async with open_ws(self.url, token=self.token, ca_file=self.ca_file) as ws:
                    self._ws = ws
                    if not started:
                        task_status.started()
                        started = True
                    await self._receive(ws, send)
            except (
                OSError,
                HandshakeError,
                ConnectionClosed,
                trio.TooSlowError,
                trio.BrokenResourceError,
            ) as exc:
                if self.received > received:  # it carried users: the backoff starts over
                    delay = self.reconnect_min_s
                going_away = (
                    isinstance(exc, ConnectionClosed)
                    and exc.reason is not None
                    and exc.reason.code == 1001
                )
                (log.info if going_away else log.warning)(
                    "consumer.disconnected",
                    url=self.url,
                    error=_describe(exc),
                    retry_in_s=round(delay, 3),
                )
            finally:
                self._ws = None
            self.reconnects += 1
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(self.reconnect_max_s, delay * 2)

    async def _receive(self, ws: WebSocketConnection, send: trio.MemorySendChannel[Item]) -> None:
        log = get_logger()
        while True:
            frame = await ws.get_message()
            try:
                message = _decoder.decode(frame)
            except msgspec.DecodeError as exc:
                log.warning("consumer.bad_frame", error=f"bad server frame: {exc}")
                continue
            if isinstance(message, _User | _Users):
                received_at = datetime.now(UTC)
                for user in message.items if isinstance(message, _Users) else (message,):
                    item = (user.seq, self._to_row(user, received_at))
                    try:  # a frame's users in one go while the channel has room
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        await send.send(item)
            elif isinstance(message, Welcome):
                log.info(
                    "consumer.connected",
                    epoch=message.epoch,
                    seq=message.seq,
                    clients=message.clients,
                    group=message.group,
                )
            elif isinstance(message, Checkpoint):
                self._checkpoint = StreamCheckpoint(
                    message.group, message.epoch, message.seq, message.position
                )
            else:
                log.warning("consumer.unexpected_message", type=type(message).__name__)

    def _to_row(self, message: _User, received_at: datetime) -> UserRow | None:
        self.received += 1
        self.last_seq = message.seq
        raw = bytes(message.user)
        try:
            user = decode_user(raw)
        except InvalidRecord as exc:
            self.invalid += 1
            get_logger().warning("consumer.invalid_record", seq=message.seq, error=str(exc))
            return None
        env = Envelope(message.seq, message.epoch, message.source, message.produced_at, received_at)
        return row_values(user, raw.decode(), env)

    async def _insert(self, rows: list[UserRow], checkpoint: StreamCheckpoint | None) -> int:
        """Insert (and write the checkpoint), retrying through outages; a refusal raises."""
        return await self.db.retrying(
            "consumer.insert_failed", self.store.insert_users, rows, checkpoint, rows=len(rows)
        )

    async def _insert_one_by_one(
        self, rows: list[UserRow], checkpoint: StreamCheckpoint | None, refused: list[int]
    ) -> int:
        """The database refused a batch: store it row by row, and each row it refuses in
        the dead letters (its seq added to `refused`), so one bad row neither blocks the
        stream nor takes others down. (Connection trouble meanwhile is retried as usual.)"""
        inserted = 0
        for row in rows:
            try:
                inserted += await self._insert([row], None)
            except StoreError as exc:
                self.invalid += 1
                refused.append(row.seq)
                get_logger().error("consumer.row_refused", seq=row.seq, error=str(exc))
                letter = DeadLetter(
                    "consumer", None, row.seq, str(exc), msgspec.json.decode(row.raw)
                )
                await self.db.retrying(
                    "dead_letters.insert_failed",
                    self.store.insert_dead_letters,
                    [letter],
                    letters=1,
                )
        if checkpoint is not None:
            await self._insert([], checkpoint)
        return inserted

    # -- writer --------------------------------------------------------------------------

    async def _write_batches(self, receive: trio.MemoryReceiveChannel[Item]) -> None:
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
                await self._write(batch)
                batch = []
        finally:
            # Shutdown: commit what was received (bounded: what is left is not acknowledged,
            # so the daemon regenerates it from the stored checkpoint at its next start).
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if batch:
                    await self._write(batch)

    async def _write(self, batch: list[Item]) -> None:
        log = get_logger()
        rows = [row for _, row in batch if row is not None]
        rejected = [seq for seq, row in batch if row is None]  # invalid records
        checkpoint = self._checkpoint
        started = trio.current_time()
        try:
            inserted = await self._insert(rows, checkpoint)
        except StoreError as exc:
            log.error("consumer.batch_refused", rows=len(rows), error=str(exc))
            inserted = await self._insert_one_by_one(rows, checkpoint, rejected)
        report = Batch(rows=len(rows), inserted=inserted, commit_s=trio.current_time() - started)
        seqs = [seq for seq, _ in batch]
        self.inserted += inserted
        self.duplicates += len(rows) - inserted
        self.batches += 1
        log.info(
            "consumer.batch_inserted",
            rows=len(rows),
            inserted=inserted,
            duplicates=len(rows) - inserted,
            seq=max(seqs),
            checkpoint=checkpoint and checkpoint.seq,
        )
        self.milestones.add(inserted)
        self.acked_seq = max(self.acked_seq, *seqs)
        await self._acknowledge(seqs, rejected, report)

    async def _acknowledge(self, seqs: list[int], rejected: list[int], report: Batch) -> None:
        """Tell the broadcaster these seqs are committed (or set aside: `rejected`)."""
        ws = self._ws
        if ws is not None:
            # A closed connection: the broadcaster redelivers these seqs to the group, and
            # the uuid key absorbs the second insert.
            with contextlib.suppress(ConnectionClosed):
                for start in range(0, len(seqs), ACK_CHUNK):  # frames stay well under 64 KiB
                    chunk = seqs[start : start + ACK_CHUNK]
                    ack = Ack(
                        seqs=chunk,
                        rejected=sorted(set(chunk).intersection(rejected)) if rejected else [],
                        batch=report if start == 0 else None,
                    )
                    await ws.send_message(encode(ack))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        return f"closed {exc.reason.code} {exc.reason.reason or ''}".strip()
    cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
    return f"{type(exc).__name__}: {exc}{cause}"
