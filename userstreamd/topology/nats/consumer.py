"""Consumers on the NATS bus: members of one durable JetStream consumer per group.

Every consumer of group G, on any node, pulls from the stream's durable pull consumer
named G: the server hands each message to one of them, redelivers what is not
acknowledged within ``cluster.ack_wait_s`` (a member killed mid-batch), and keeps at most
``consumers.window`` messages unacknowledged across the group (its ``MaxAckPending``).

A consumer here is the same `Consumer` with another receiver (`JetStreamReceiver`,
`stream_consumer`): the writer is the same (group commit, retries through database
outages, one-by-one refusal into the dead letters), and it acknowledges each message only
after its batch committed. The rows
are keyed by uuid and by (epoch, seq), so a redelivered message stores nothing twice.

**Checkpoint.** About once a second a member reads the group's ack floor (everything up
to it acknowledged, so committed) and writes it with its next batch, in the same
transaction as the rows: ``stream_checkpoints`` says how far the group got in the
database itself. When the durable consumer does not exist (a new cluster, or deleted by
an operator), the first member creates it from that checkpoint on.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
import trio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ...backoff import Backoff
from ...config import Config
from ...consume.consumer import Consumer
from ...consume.receiver import Rows, send_item
from ...consume.writer import Item, Milestones, Writer
from ...errors import ProtocolError, StoreError, describe
from ...logs import get_logger
from ...store.postgres import PostgresStore, StreamCheckpoint, UserRow
from ...stream.protocol import Batch, decode_head, decode_raw_user
from .bus import Bus
from .pull import Pull

REBIND_AFTER = 3  # failed fetches in a row before asking whether the durable still exists
FLOOR_EVERY_S = 1.0


async def _bind(bus: Bus, group: str, window: int, first_seq: int, batch: int) -> Pull:
    """(On the client's loop.) A `Pull` from the group's durable consumer: made if
    missing (from `first_seq`), its window and ack wait brought to the config's."""
    js, s = bus.js, bus.settings
    try:
        info = await js.consumer_info(bus.stream, group)
    except nats.js.errors.NotFoundError:
        config = ConsumerConfig(
            durable_name=group,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait_s,
            max_ack_pending=window,
            max_deliver=-1,
            filter_subject=bus.subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if first_seq > 1 else DeliverPolicy.ALL,
            opt_start_seq=first_seq if first_seq > 1 else None,
        )
        with contextlib.suppress(nats.js.errors.BadRequestError):  # made meanwhile, by another
            await js.add_consumer(bus.stream, config)
    else:
        have = info.config
        if have.max_ack_pending != window or round(have.ack_wait or 0) != round(s.ack_wait_s):
            await js.add_consumer(  # (an update, for a durable that exists)
                bus.stream, have.evolve(max_ack_pending=window, ack_wait=s.ack_wait_s)
            )
    pull = Pull(bus, group, batch)
    await pull.start()
    return pull


async def _ack(bus: Bus, replies: list[str]) -> None:
    """(On the client's loop.) Acknowledge a committed batch: one ``+ACK`` (an empty
    message) to each message's reply subject, fire and forget. The publishes only queue
    in nats-py's buffer, its flusher writes them out together: one write per batch, no
    round trip. (Not ``Msg.ack``: the same, through a Msg kept per user.)"""
    publish = bus.nc.publish
    for reply in replies:
        await publish(reply)


async def _floor(bus: Bus, group: str) -> tuple[int, int]:
    """(On the client's loop.) The group's ack floor: (seq, position)."""
    info = await bus.js.consumer_info(bus.stream, group)
    seq = int(info.ack_floor.stream_seq) if info.ack_floor else 0
    if seq == 0:
        return 0, 0
    message = await bus.js.get_msg(bus.stream, seq)
    return seq, decode_head(message.data or b"").position


class JetStreamReceiver:
    """The group's durable pull consumer as a `Receiver`: acks each message after its
    batch committed; keeps the checkpoint at the group's ack floor."""

    def __init__(
        self,
        bus: Bus,
        group: str,
        window: int,
        batch_size: int,
        on_batch: Callable[[Batch], None] | None = None,
        on_committed: Callable[[float], None] | None = None,
        retry_s: float = 0.1,
    ) -> None:
        self.bus = bus
        self.group, self.window, self.batch_size = group, window, batch_size
        self.url = f"nats:{bus.stream}/{group}"
        self.rows = Rows()
        self.reconnects = 0
        self.retry_s = retry_s  # the first delay after a failed fetch (then doubling, to 10x)
        self.foreign = 0  # messages that are not users of this stream
        self.on_batch = on_batch
        self.committed: Counter[str] = Counter()  # users acknowledged as stored, by source
        self.rejected: Counter[str] = Counter()  # ... as set aside (invalid, refused)
        self.on_committed = on_committed  # each committed user's seconds since produced
        # seq -> its message's reply subject (to ack it), source and production time (Unix)
        self._unacked: dict[int, tuple[str, str, float]] = {}
        self._bound = False
        self._checkpoint: StreamCheckpoint | None = None

    @property
    def connected(self) -> bool:
        return self._bound and self.bus.connected

    @property
    def checkpoint(self) -> StreamCheckpoint | None:
        return self._checkpoint

    @property
    def committed_through(self) -> int:
        """The group's ack floor, as last read: everything up to it is committed."""
        return self._checkpoint.seq if self._checkpoint else 0

    async def receive(
        self,
        send: trio.MemorySendChannel[Item],
        writer: Writer,
        task_status: trio.TaskStatus[None],
    ) -> None:
        self._unacked.clear()  # (a restart: what the last run received is redelivered)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_floor, writer)
            while True:
                pull = await self._bind(writer)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                try:
                    await self._receive(pull, send)
                finally:
                    self._bound = False
                    await self.bus.quietly(pull.stop)
                self.reconnects += 1

    async def _bind(self, writer: Writer) -> Pull:
        """Subscribe to the group's durable consumer (made from the stored checkpoint on,
        when it is missing), retrying while the cluster does not answer."""
        bus = self.bus
        found = await writer.db.retrying(
            "consumer.checkpoint_unreadable", writer.store.last_checkpoint, self.group
        )
        first_seq = found[0].seq + 1 if found and found[0].epoch == bus.epoch else 1
        pull = await bus.retrying(
            "consumer.nats_unavailable",
            _bind,
            bus,
            self.group,
            self.window,
            first_seq,
            self.batch_size,
        )
        self._bound = True
        get_logger().info("consumer.bound", stream=bus.stream, group=self.group)
        return pull

    async def _receive(self, pull: Pull, send: trio.MemorySendChannel[Item]) -> None:
        """Take what the pull brought until the durable consumer is gone (then bind
        again)."""
        bus, failures = self.bus, 0
        delays = Backoff(self.retry_s, self.retry_s * 10).delays()
        while True:
            try:
                messages = await bus.call(pull.take)
                failures = 0
                delays.reset()
            except (nats.errors.Error, TimeoutError) as exc:
                failures += 1
                get_logger().warning("consumer.fetch_failed", error=describe(exc))
                if failures >= REBIND_AFTER and not await self._durable_exists():
                    get_logger().warning("consumer.durable_missing", group=self.group)
                    return
                await delays.sleep()
                continue
            received_at = datetime.now(UTC)
            for message in messages:
                seq = message.metadata.sequence.stream
                row = self._row(seq, message.data, received_at)
                if row is None:
                    self._unacked[seq] = (message.reply, "unknown", 0.0)
                else:
                    self._unacked[seq] = (message.reply, row.source, row.produced_at.timestamp())
                await send_item(send, (seq, row))

    async def _durable_exists(self) -> bool:
        try:
            await self.bus.retrying(
                "consumer.nats_unavailable", self.bus.js.consumer_info, self.bus.stream, self.group
            )
        except nats.js.errors.NotFoundError:
            return False
        return True

    def _row(self, seq: int, data: bytes, received_at: datetime) -> UserRow | None:
        try:
            user = decode_raw_user(data)
            if user.seq != seq or user.epoch != self.bus.epoch:
                raise ProtocolError(f"seq {user.seq} in epoch {user.epoch}")
        except ProtocolError as exc:
            self.rows.received += 1
            self.rows.invalid += 1
            self.foreign += 1
            get_logger().warning("consumer.foreign_message", seq=seq, error=str(exc))
            return None
        return self.rows.row(user, received_at)

    async def _follow_floor(self, writer: Writer) -> None:
        """Keep the checkpoint the next batch writes at the group's ack floor; when no
        batch wrote it within a look (idle, or the other members took the last users),
        write it alone."""
        batches = writer.batches
        while True:
            await trio.sleep(FLOOR_EVERY_S)
            try:
                seq, position = await self.bus.call(_floor, self.bus, self.group)
            except (nats.errors.Error, TimeoutError, ProtocolError):
                continue  # (the next one will do)
            if seq > self.committed_through:
                self._checkpoint = StreamCheckpoint(self.group, self.bus.epoch, seq, position)
            elif self.committed_through > writer.stored_through and writer.batches == batches:
                try:
                    await writer.insert([], self._checkpoint)
                except StoreError as exc:  # (the next batch writes it)
                    get_logger().warning("consumer.checkpoint_not_saved", error=str(exc))
            batches = writer.batches

    async def acknowledge(self, seqs: list[int], rejected: list[int], report: Batch) -> None:
        if self.on_batch is not None:
            self.on_batch(report)
        refused = set(rejected)
        replies = []
        now = time.time()
        for seq in seqs:
            found = self._unacked.pop(seq, None)
            if found is not None:
                reply, source, produced = found
                replies.append(reply)
                if seq in refused:
                    self.rejected[source] += 1
                else:
                    self.committed[source] += 1
                    if self.on_committed is not None:
                        self.on_committed(now - produced)
        try:
            await self.bus.call(_ack, self.bus, replies)
        except (nats.errors.Error, TimeoutError) as exc:  # redelivered after ack_wait_s
            get_logger().warning("consumer.ack_failed", error=describe(exc))


def stream_consumer(
    bus: Bus,
    store: PostgresStore,
    config: Config,
    worker: int,
    milestones: Milestones,
    on_batch: Callable[[Batch], None] | None = None,
    on_committed: Callable[[float], None] | None = None,
) -> tuple[Consumer, JetStreamReceiver]:
    """A member of the configured group: the one `Writer` composed with the group's
    JetStream consumer; the receiver too, for its counts (committed, rejected, foreign)."""
    c = config.consumers
    writer = Writer(
        store,
        batch_size=c.batch_size,
        batch_interval_s=c.batch_interval_s,
        milestones=milestones,
    )
    receiver = JetStreamReceiver(bus, c.group, c.window, c.batch_size, on_batch, on_committed)
    return Consumer(writer, receiver, worker=worker), receiver
