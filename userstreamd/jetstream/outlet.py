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

`run_producer` holds the lease (`lease`) and runs publishing sessions: each starts from
the stream's last message (its seq, and the source position in it), so after a resync
or a takeover the next position is exactly the one after the last stored: no gap, no
position twice.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import nats.errors
import nats.js.errors
import trio

from ..logs import get_logger
from ..messages import UserMessage
from ..producer import Producer
from .bus import Bus
from .lease import LeaseLost, hold_lease

BATCH_MAX = 1000  # messages per crossing to the client's loop
IN_FLIGHT_MAX = 4000  # published but not yet acknowledged by the stream
# A batch not acknowledged within this is a resync (a node lost mid-flight: the stream's
# new leader is elected within a few seconds, and the session starts again from it).
PUBLISH_TIMEOUT_S = 3.0
RESYNC_PAUSE_S = 0.5

_encoder = msgspec.json.Encoder()


class Resync(Exception):
    """The stream did not store a batch as expected: start again from its last message."""


class _Head(msgspec.Struct):
    seq: int
    position: int


class Outlet:
    def __init__(self, bus: Bus, last_seq: int) -> None:
        self.bus = bus
        self.epoch = bus.epoch
        self.last_seq = last_seq  # given to the last user queued
        self.stored_seq = last_seq  # the stream acknowledged everything up to here
        self.clients = 0  # (the hub's field; clients are the broadcasters')
        self.published: Counter[str] = Counter()  # by source
        self._queue: list[tuple[int, int, bytes]] = []  # (seq, position, frame)
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
        self._queue.append((message.seq, position, _encoder.encode(message)))
        self._queued.set()
        return message

    async def run(self) -> None:
        """Publish what is queued until cancelled; `Resync` when the stream disagrees."""
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            while self._queue:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                await self._publish(batch)

    async def _publish(self, batch: list[tuple[int, int, bytes]]) -> None:
        bus = self.bus
        try:
            acks = await bus.call(_publish, bus, batch)
        except (nats.errors.Error, TimeoutError) as exc:
            raise Resync(f"batch from seq {batch[0][0]}: {type(exc).__name__}: {exc}") from exc
        for (seq, _, _), ack in zip(batch, acks, strict=True):
            if isinstance(ack, BaseException):
                raise Resync(f"seq {seq}: {_describe(ack)}")
            if ack.seq != seq:  # (a duplicate: that position was stored before, elsewhere)
                raise Resync(f"seq {seq} is stored at {ack.seq}")
            self.stored_seq = seq
        self._stored.set()
        self._stored = trio.Event()


async def _publish(bus: Bus, batch: list[tuple[int, int, bytes]]) -> list[Any]:
    """(On the client's loop.) Publish a batch in order; its PubAcks or exceptions."""
    futures = []
    for seq, position, frame in batch:
        headers = {
            "Nats-Msg-Id": f"{bus.epoch}:{position}",
            "Nats-Expected-Last-Sequence": str(seq - 1),
        }
        futures.append(await bus.js.publish_async(bus.subject, frame, headers=headers))
    gathered = asyncio.gather(*futures, return_exceptions=True)
    gathered.add_done_callback(_retrieve)  # (cancelled with the connection: not an error)
    return await asyncio.wait_for(gathered, timeout=PUBLISH_TIMEOUT_S)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.description} (error {exc.err_code})"
    return f"{type(exc).__name__}: {exc}"


async def last_stored(bus: Bus) -> tuple[int, int]:
    """(seq, position) of the stream's last message; (0, 0) when it is empty."""

    async def read() -> tuple[int, int]:
        try:
            message = await bus.js.get_last_msg(bus.stream, bus.subject)
        except nats.js.errors.NotFoundError:
            return 0, 0
        head = msgspec.json.decode(message.data or b"", type=_Head)
        return int(message.seq or 0), head.position

    return await bus.call(read)


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_producer(
    bus: Bus, producer: Producer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The producer role's component: standby until it holds the lease, then publish
    (resyncing from the stream when it disagrees) until it loses the lease or stops."""
    log = get_logger()
    holder = holder_name()
    task_status.started()  # (a standby producer is running)
    while True:
        try:
            async with hold_lease(bus, holder):
                while True:
                    try:
                        await _session(bus, producer)
                    except* Resync as group:
                        log.warning("producer.resync", reason=str(group.exceptions[0]))
                    except* (nats.errors.Error, TimeoutError) as group:  # reading the stream
                        log.warning("producer.resync", reason=_describe(group.exceptions[0]))
                    await trio.sleep(RESYNC_PAUSE_S)
        except LeaseLost:
            await trio.sleep(RESYNC_PAUSE_S)


async def _session(bus: Bus, producer: Producer) -> None:
    """Publish from right after the stream's last message until something disagrees."""
    seq, position = await last_stored(bus)
    outlet = Outlet(bus, seq)
    producer.hub = outlet
    producer.next_position = position + 1
    get_logger().info(
        "producer.publishing", epoch=bus.epoch, from_seq=seq + 1, position=position + 1
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.run)
        await producer.run()
