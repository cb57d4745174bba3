"""A broadcaster's feed on the NATS bus: the stream, read into a local hub.

`StreamMirror` reads the stream with an ordered consumer (nats-py recreates it from the
next sequence after a node or connection is lost, so it sees every message once, in
order) and appends each message, as the producer encoded it, to a local `Hub` (the same
replay buffer, bounds and cursors as on the embedded bus). The broadcaster serves that
hub with the same wire protocol: welcome, ``user``/``users`` frames, gaps, and resume
with ``?epoch=&since=``. Since a message's ``seq`` is its stream sequence (`bus`), every
broadcaster numbers every user alike, and a client can resume on any of them.

At start the mirror takes up to half ``client_lag_max`` users of history from the stream,
and reports the hub only once it has them (or the stream has no more: its users
expired), so a client moving here from a broadcaster that died finds what it missed. A
message that is not a user of this stream (not decodable, or not its seq or epoch:
published by something else) is logged, counted, and kept as a ``gap`` over its one seq
(`protocol.hole_frame`): clients read it in its place, and the buffer stays whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

import trio
from nats.js.api import ConsumerConfig, DeliverPolicy

from ...config import BroadcasterConfig
from ...errors import ProtocolError
from ...logs import get_logger
from ...stream.hub import Hub
from ...stream.mirrors import mirror_hub
from ...stream.protocol import decode_head, hole_frame
from .bus import Bus

BATCH_MAX = 2000  # messages per crossing from the client's loop
WAIT_S = 1.0  # the longest a crossing waits for a first message
HEARTBEAT_S = 1.0
INBOX_MAX = 50_000  # messages taken from the subscription and not yet by the hub


class _Inbox:
    """(The client's loop side.) Messages as the subscription delivers them."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []  # (stream seq, data)
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()

    async def deliver(self, msg: Any) -> None:
        while len(self.items) >= INBOX_MAX:  # (the trio side is behind: hold the stream)
            self.room.clear()
            await self.room.wait()
        self.items.append((msg.metadata.sequence.stream, msg.data))
        self.arrived.set()

    async def take(self) -> list[tuple[int, bytes]]:
        if not self.items:
            try:
                await asyncio.wait_for(self.arrived.wait(), WAIT_S)
            except TimeoutError:
                return []
        self.arrived.clear()
        items, self.items = self.items[:BATCH_MAX], self.items[BATCH_MAX:]
        self.room.set()
        if self.items:
            self.arrived.set()
        return items


class StreamMirror:
    def __init__(self, bus: Bus, settings: BroadcasterConfig) -> None:
        self.bus = bus
        self.settings = settings
        self.hub: Hub | None = None
        self.foreign = 0  # messages skipped: not users of this stream

    async def run(self, *, task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the hub until cancelled; report it once it holds the history (or the
        stream has no more to give). Run again after a failure, it goes on feeding the
        same hub from where it stopped."""
        bus = self.bus
        history_end = 0  # (a restart has its history)
        if self.hub is None:
            first, history_end = await bus.bounds()
            start = max(first - 1, history_end - self.settings.client_lag_max // 2, 0)
            self.hub = mirror_hub(self.settings, bus.epoch, first_seq=start + 1)
        hub = self.hub
        inbox = _Inbox()
        subscription = await bus.retrying(
            "mirror.nats_unavailable", _subscribe, bus, hub.last_seq + 1, inbox
        )
        get_logger().info("mirror.following", epoch=bus.epoch, from_seq=hub.last_seq + 1)
        try:
            started = False
            while True:
                items = await bus.call(inbox.take)
                for seq, data in items:
                    self._append(hub, seq, data)
                if not started and (hub.last_seq >= history_end or not items):
                    task_status.started(hub)
                    started = True
        finally:
            await bus.quietly(subscription.unsubscribe)

    def _append(self, hub: Hub, seq: int, data: bytes) -> None:
        """A user as it is; anything else as a hole (clients are told of that seq)."""
        try:
            head = decode_head(data)
            if head.seq != seq or head.epoch != hub.epoch:
                raise ProtocolError(f"seq {head.seq} in epoch {head.epoch}")
        except ProtocolError as exc:
            self.foreign += 1
            get_logger().warning("mirror.foreign_message", seq=seq, error=str(exc))
            hub.append(seq, hole_frame(hub.epoch, seq, "not a user"), "", 0)
            return
        hub.append(seq, data, head.source, head.position)


async def _subscribe(bus: Bus, first_seq: int, inbox: _Inbox) -> Any:
    return await bus.js.subscribe(
        bus.subject,
        cb=inbox.deliver,
        ordered_consumer=True,
        # (two missed heartbeats and nats-py makes the consumer anew from the next seq:
        # when the node serving it is lost, the mirror is back within seconds)
        idle_heartbeat=HEARTBEAT_S,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq
        ),
    )
