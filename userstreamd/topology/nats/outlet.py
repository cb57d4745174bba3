"""What a producer publishes into on the NATS bus, in place of the hub.

`Outlet` is the producer-facing half of `Hub` (``has_room``, ``wait_for_room``,
``publish_nowait``): the `Producer` is the same class on both buses. Each user gets the
next stream sequence as its ``seq`` and is queued; `Outlet.run` publishes what is queued
in batches (pipelined on one connection, so in order), each message with

- ``Nats-Msg-Id = epoch:position``: the stream stores a position once within its
  duplicate window, whoever publishes it;
- ``Nats-Expected-Last-Sequence = seq - 1``: stored only right after the message before
  it. A second producer publishing meanwhile (a lease lost without knowing it), a batch
  whose outcome is unknown (a node lost mid-flight) or a message refused all end the
  outlet with `Resync`.

The answers come to a reply inbox of our own (`Publisher`). `run_producer` holds the
lease (`lease`) and runs publishing sessions: each starts after the stream's last seq,
at the position after that of the newest message that is a user (`last_stored`), so
after a resync or a takeover the next position is exactly the one after the last
stored: no gap, no position twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections import Counter
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import msgspec
import nats.errors
import nats.js.errors
import trio

from ...errors import ProtocolError, describe
from ...logs import get_logger
from ...produce.producer import Producer
from ...stream.protocol import UserMessage, decode_head
from .bridge import Submitted
from .bus import Bus
from .lease import LeaseLost, hold_lease

BATCH_MAX = 1000  # messages per crossing to the client's loop
SCAN_BACK = 100  # messages read back from the stream's end for the last user's position
IN_FLIGHT_MAX = 4000  # published but not yet acknowledged by the stream
BATCHES_IN_FLIGHT = 4
# A batch not acknowledged within this is a resync (a node lost mid-flight: the stream's
# new leader is elected within a few seconds, and the session starts again from it).
PUBLISH_TIMEOUT_S = 3.0
RESYNC_PAUSE_S = 0.5

_encoder = msgspec.json.Encoder()


class Entry(NamedTuple):
    """A user queued for the stream."""

    seq: int
    position: int
    frame: bytes


class Resync(Exception):
    """The stream did not store a batch as expected: start again from its last message."""


class Outlet:
    def __init__(
        self,
        bus: Bus,
        last_seq: int,
        publisher: Publisher,
        published: Counter[str] | None = None,
    ) -> None:
        self.bus = bus
        self.epoch = bus.epoch
        self.publisher = publisher
        self.last_seq = last_seq  # given to the last user queued
        self.stored_seq = last_seq  # the stream acknowledged everything up to here
        self.clients = 0  # (the hub's field; clients are the broadcasters')
        # by source (one counter for every session of a producer)
        self.published: Counter[str] = Counter() if published is None else published
        self._queue: list[Entry] = []
        self._queued = trio.Event()
        self._stored = trio.Event()

    @property
    def buffered(self) -> int:
        return self.last_seq - self.stored_seq

    def has_room(self) -> bool:
        return self.buffered < IN_FLIGHT_MAX

    async def wait_for_room(self) -> None:
        while not self.has_room():
            await self._stored.wait()

    def publish_nowait(
        self,
        user: dict[str, Any] | msgspec.Raw,
        source: str,
        position: int,
        produced_at: datetime | None = None,
    ) -> UserMessage:
        message = UserMessage(
            epoch=self.epoch,
            seq=self.last_seq + 1,
            position=position,
            produced_at=produced_at or datetime.now(UTC),
            source=source,
            user=cast(dict[str, Any], user),  # a Raw is encoded as it is
        )
        self.last_seq = message.seq
        self.published[source] += 1
        self._queue.append(Entry(message.seq, position, _encoder.encode(message)))
        self._queued.set()
        return message

    async def run(self) -> None:
        """Publish what is queued until cancelled, up to BATCHES_IN_FLIGHT batches at once
        (sent in order on one connection, answered together); `Resync` when the stream
        disagrees."""
        in_flight = trio.Semaphore(BATCHES_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while True:
                await self._queued.wait()
                self._queued = trio.Event()
                while self._queue:
                    await in_flight.acquire()  # (then the batch takes what came meanwhile)
                    batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                    # (submitted here, in order: the tasks that wait may run in any order)
                    sent = self.bus.thread.submit(self.publisher.publish, batch)
                    nursery.start_soon(self._answered, batch, sent, in_flight)

    async def _answered(
        self,
        batch: list[Entry],
        sent: Submitted[list[PubAck | None]],
        in_flight: trio.Semaphore,
    ) -> None:
        try:
            try:
                answers = await sent.result()
            except (nats.errors.Error, TimeoutError) as exc:
                raise Resync(f"batch from seq {batch[0].seq}: {describe(exc)}") from exc
            for (seq, *_), answer in zip(batch, answers, strict=True):
                if answer is None:  # (not waited for: a refusal ended the batch)
                    continue
                if answer.error is not None:
                    error = answer.error
                    description, code = error.get("description"), error.get("err_code")
                    raise Resync(f"seq {seq}: {description} ({code})")
                if answer.seq != seq:  # (a duplicate: that position was stored elsewhere)
                    raise Resync(f"seq {seq} is stored at {answer.seq}")
            if None in answers:  # (never: a batch ends early only at a refusal)
                raise Resync(f"batch from seq {batch[0].seq}: not all answered")
            self.stored_seq = max(self.stored_seq, batch[-1].seq)
            self._stored.set()
            self._stored = trio.Event()
        finally:
            in_flight.release()


class PubAck(msgspec.Struct):
    """The stream's answer to one publish: where it stored it, or why not."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(PubAck)
_NOT_JSON = PubAck(error={"description": "not JSON"})


class _Answers:
    """(On the client's loop.) One batch's answers, in publish order; `done` once all
    came, or at the first refusal (the messages after it are refused too)."""

    def __init__(self, count: int) -> None:
        self.data: list[bytes] = [b""] * count
        self.missing = count
        self.done = asyncio.get_running_loop().create_future()

    def arrive(self, index: int, data: bytes) -> None:
        if self.done.done() or not 0 <= index < len(self.data) or self.data[index]:
            return
        self.data[index] = data
        self.missing -= 1
        if self.missing == 0 or b'"error"' in data:
            self.done.set_result(None)


class Publisher:
    """(On the client's loop.) Pipelined JetStream publishes with a reply inbox of its
    own: nats-py's ``publish_async`` never completes the future of a publish the stream
    refuses (2.16), so a refusal would look like a timeout. One waiter per batch, not
    per message: the PubAcks of a batch are counted in as they come and decoded together
    once all did."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.inbox = bus.nc.new_inbox()
        self._ids = itertools.count()
        self._waiting: dict[str, _Answers] = {}
        self._subscription: Any = None
        self._sending = asyncio.Lock()  # (one batch's messages after another's, in order)

    async def start(self) -> None:
        self._subscription = await self.bus.nc.subscribe(f"{self.inbox}.*.*", cb=self._reply)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _reply(self, msg: Any) -> None:
        _, token, index = msg.subject.rsplit(".", 2)
        answers = self._waiting.get(token)
        if answers is not None:
            answers.arrive(int(index), msg.data)

    async def publish(self, batch: list[Entry]) -> list[PubAck | None]:
        """Publish a batch in order; the stream's answer to each (None: not waited for,
        after a refusal). TimeoutError when not all answered within PUBLISH_TIMEOUT_S."""
        token = str(next(self._ids))
        answers = self._waiting[token] = _Answers(len(batch))
        try:
            async with self._sending:
                await self._send(batch, f"{self.inbox}.{token}")
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await answers.done
        finally:
            del self._waiting[token]  # (answered or not: nothing is left waiting)
        return [_answer(data) if data else None for data in answers.data]

    async def _send(self, batch: list[Entry], inbox: str) -> None:
        bus = self.bus
        publish, subject, epoch = bus.nc.publish, bus.subject, bus.epoch
        for index, (seq, position, frame) in enumerate(batch):
            headers = {
                "Nats-Msg-Id": f"{epoch}:{position}",
                "Nats-Expected-Last-Sequence": str(seq - 1),
            }
            # (buffered: nats-py's flusher writes the batch out together)
            await publish(subject, frame, reply=f"{inbox}.{index}", headers=headers)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception in a group of groups (nurseries nest them)."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _answer(data: bytes) -> PubAck:
    try:
        return _pub_ack.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _NOT_JSON


async def last_stored(bus: Bus) -> tuple[int, int]:
    """(the stream's last seq, the source position of its last user). The position is
    read from the newest message that is a user of this stream (at most SCAN_BACK
    messages back: something else may have published on the subject); 0 when the stream
    never had one; when its users are gone (expired, purged) it is taken to be the seq,
    as the synthetic source numbers them."""
    first, last = await bus.bounds()
    lowest = max(first, last - SCAN_BACK + 1, 1)
    for seq in range(last, lowest - 1, -1):
        try:
            message = await bus.retrying(
                "producer.stream_unreadable", bus.js.get_msg, bus.stream, seq
            )
        except nats.js.errors.NotFoundError:  # (deleted)
            continue
        try:
            head = decode_head(message.data or b"")
        except ProtocolError:  # (not a user: a stranger's message)
            continue
        if head.seq == seq and head.epoch == bus.epoch:
            return last, head.position
    if lowest <= 1:  # (the whole stream read: no user in it yet)
        return last, 0
    get_logger().warning("producer.position_unknown", last_seq=last, position=last)
    return last, last


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_producer(
    bus: Bus, producer: Producer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The producer role's component: standby until it holds the lease, then publish
    (resyncing from the stream when it disagrees) until it loses the lease or stops."""
    log = get_logger()
    holder = holder_name()
    assert isinstance(producer.hub, Outlet), "a producer on the NATS bus has an Outlet"
    publisher = producer.hub.publisher
    await bus.retrying("producer.nats_unavailable", publisher.start)
    task_status.started()  # (a standby producer is running)
    try:
        while True:
            try:
                async with hold_lease(bus, holder):
                    while True:
                        try:
                            await _session(bus, producer, publisher)
                        except* Resync as group:
                            log.warning("producer.resync", reason=str(_first_leaf(group)))
                        await trio.sleep(RESYNC_PAUSE_S)
            except LeaseLost:
                await trio.sleep(RESYNC_PAUSE_S)
    finally:
        await bus.quietly(publisher.stop)


async def _session(bus: Bus, producer: Producer, publisher: Publisher) -> None:
    """Publish from right after the stream's last message until something disagrees."""
    seq, position = await last_stored(bus)
    assert isinstance(producer.hub, Outlet)
    outlet = Outlet(bus, seq, publisher, producer.hub.published)
    producer.hub = outlet
    producer.next_position = position + 1
    get_logger().info(
        "producer.publishing", epoch=bus.epoch, from_seq=seq + 1, position=position + 1
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.run)
        await producer.run()
