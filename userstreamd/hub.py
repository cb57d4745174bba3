"""Sequence numbers and fan-out: the heart of the broadcaster, with no sockets in it.

The hub numbers every published user (``seq`` = 1, 2, ... within an ``epoch``), encodes
it once, and puts the same frame in every subscriber's bounded queue. A subscriber whose
queue is full is cut off (`Subscription.overflowed`) instead of holding up the others;
the broadcaster then closes its connection with code 3008 ("slow").

Subscribers that acknowledge (the daemon's consumers do, after their database commit)
let the supervisor wait for a drain at shutdown: `acked_through`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from .messages import UserMessage, encode


@dataclass(eq=False)
class Subscription:
    id: int
    peer: str
    start_seq: int
    send: trio.MemorySendChannel[str]
    receive: trio.MemoryReceiveChannel[str]
    acked: int | None = None
    overflowed: bool = False


@dataclass(frozen=True)
class HubStatistics:
    epoch: str
    last_seq: int
    clients: int
    acking_clients: int
    slow_disconnects: int
    bad_frames: int


@dataclass(eq=False)
class Hub:
    epoch: str
    client_queue: int = 10_000
    last_seq: int = 0
    slow_disconnects: int = 0
    bad_frames: int = 0
    _subs: dict[int, Subscription] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def clients(self) -> int:
        return len(self._subs)

    def subscribe(self, peer: str) -> Subscription:
        send, receive = trio.open_memory_channel[str](self.client_queue)
        sub = Subscription(next(self._ids), peer, self.last_seq, send, receive)
        self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None:
            sub.send.close()
            self._notify()

    def publish(
        self, user: dict[str, Any], source: str, produced_at: datetime | None = None
    ) -> UserMessage:
        """Number the user, encode it once, queue it for every subscriber."""
        self.last_seq += 1
        message = UserMessage(
            epoch=self.epoch,
            seq=self.last_seq,
            produced_at=produced_at or datetime.now(UTC),
            source=source,
            user=user,
        )
        frame = encode(message)
        for sub in list(self._subs.values()):
            try:
                sub.send.send_nowait(frame)
            except trio.WouldBlock:
                sub.overflowed = True
                self.slow_disconnects += 1
                self.unsubscribe(sub)
        return message

    def ack(self, sub: Subscription, seq: int) -> None:
        if seq > self.last_seq:
            raise ValueError(f"ack for seq {seq} beyond the last published seq {self.last_seq}")
        if sub.acked is None or seq > sub.acked:
            sub.acked = seq
            self._notify()

    def acked_through(self) -> int | None:
        """The lowest seq every connected acking subscriber has acknowledged."""
        acks = [s.acked for s in self._subs.values() if s.acked is not None]
        return min(acks) if acks else None

    async def wait_drained(self) -> None:
        """Return once every connected acking subscriber has acknowledged `last_seq`."""
        while (acked := self.acked_through()) is not None and acked < self.last_seq:
            await self._changed.wait()

    def close(self) -> None:
        """End every subscription: each client gets what is queued, then a close."""
        for sub in list(self._subs.values()):
            sub.send.close()

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            self.epoch,
            self.last_seq,
            self.clients,
            sum(s.acked is not None for s in self._subs.values()),
            self.slow_disconnects,
            self.bad_frames,
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
