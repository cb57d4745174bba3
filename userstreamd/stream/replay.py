"""The replay buffer and the plain clients that read it with a cursor (no sockets).

**One buffer.** Published frames (encoded once) are kept in seq order, up to
``buffer_messages`` and ``buffer_bytes``. `Replay.evict` drops the oldest while over a
bound, but never past the `floor` it is given (what the groups that hold the producer
have acknowledged: see `hub`); if it cannot, the buffer is full. The same buffer is the
replay history for plain clients and the frames the groups deliver.

**Plain clients** read with a cursor (`Subscription`). One that reconnects with its last
``(epoch, seq)`` resumes right after it if that frame is still buffered, or once it is
published if the client is ahead (a restarted daemon regenerating its epoch from the
stored checkpoint); otherwise it is told about the gap explicitly (`Gap`). A client more
than ``client_lag_max`` frames behind, or whose next frame was evicted, is *slow* and is
cut off (the broadcaster closes it with code 3008); it never holds anything up.

**Wake-ups.** Whoever writes to plain clients (the broadcaster's `serve.pump`: one task
for all of them) waits for new frames, woken by publishing (`wake`), and takes every
frame due to each at once (`next_frames_nowait`). `Signal` is the wake-up every waiter
in the stream parks on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import trio

from .protocol import Gap


class Slow(Exception):
    """A plain client fell too far behind (or its next frame was evicted)."""


class Entry(msgspec.Struct, gc=False):
    """One published user. (Not tracked by the garbage collector: a full collection
    would otherwise walk every one of the buffer's 100,000 entries.)"""

    seq: int
    position: int
    frame: bytes  # the encoded ``user`` message (UTF-8 JSON)
    source: str
    produced: float  # Unix time


class Signal:
    """Wakes every task waiting on it (each `wait` parks on the event of the moment)."""

    __slots__ = ("_armed", "_event")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._armed = False  # someone may be waiting (else firing costs nothing)

    async def wait(self) -> None:
        self._armed = True
        await self._event.wait()

    def fire(self) -> None:
        if self._armed:
            self._armed = False
            self._event.set()
            self._event = trio.Event()


@dataclass(eq=False, slots=True)
class Subscription:
    """A plain broadcast client: a cursor into the buffer."""

    id: int
    peer: str
    next_seq: int
    lag_max: int
    gap: Gap | None = None
    slow: bool = False


class Replay:
    """The frames of one epoch from `oldest` to `last_seq`, and the plain clients'
    cursors into them. `ids` numbers the subscriptions (shared with the groups' members)."""

    def __init__(
        self,
        epoch: str,
        *,
        first_seq: int,
        buffer_messages: int,
        buffer_bytes: int,
        client_lag_max: int,
        ids: Iterator[int],
    ) -> None:
        self.epoch = epoch
        self.last_seq = first_seq - 1
        self.buffer_messages, self.buffer_bytes = buffer_messages, buffer_bytes
        self.client_lag_max = client_lag_max
        self.slow_disconnects = 0
        self.entries: dict[int, Entry] = {}  # by seq, from `oldest` to `last_seq`
        self.oldest = first_seq
        self.bytes = 0
        self.subs: dict[int, Subscription] = {}
        self.closed = False
        self._ids = ids
        self._frames = Signal()  # plain clients: new frames (or the end)
        self._nudges = 0

    # -- the buffer --------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Append the next frame (`entry.seq` is `last_seq` + 1, or `restart_at` it)."""
        self.last_seq = entry.seq
        self.entries[entry.seq] = entry
        self.bytes += len(entry.frame)

    def restart_at(self, seq: int) -> None:
        """Drop every frame: the buffer starts over at `seq` (readers of the old part
        find their next frame evicted)."""
        self.entries.clear()
        self.bytes = 0
        self.oldest = seq

    def evict(self, floor: int, room_for: int = 0) -> None:
        """Drop the oldest frames, none above `floor`, while over the bounds (with
        `room_for` more frames)."""
        entries = self.entries
        while (
            entries
            and (len(entries) + room_for > self.buffer_messages or self.bytes >= self.buffer_bytes)
            and self.oldest <= floor
        ):
            entry = entries.pop(self.oldest)
            self.bytes -= len(entry.frame)
            self.oldest += 1

    def has_room(self) -> bool:
        """Under both bounds (call `evict` with ``room_for=1`` first)."""
        return len(self.entries) < self.buffer_messages and self.bytes < self.buffer_bytes

    def wake(self) -> None:
        """A frame was published: cut off the plain clients too far behind (a scan of them
        all every 64 frames; each read checks its own client), wake the others."""
        if not self.last_seq & 63:
            for sub in list(self.subs.values()):
                if self.last_seq - sub.next_seq >= sub.lag_max:
                    self._cut_off(sub)
        self._frames.fire()

    def mark(self) -> tuple[int, int, bool]:
        """Where the stream stands, for `wait_published`: its last seq, the nudges, the
        close."""
        return self.last_seq, self._nudges, self.closed

    async def wait_published(self, mark: tuple[int, int, bool]) -> None:
        """Return once the stream moved past `mark` (at once if it already has): a
        publish, the close, or a `nudge`. (A wake-up fired while the waiter was busy
        elsewhere is not lost: the mark says it came.)"""
        while self.mark() == mark:
            await self._frames.wait()

    def nudge(self) -> None:
        """Wake the readers waiting in `wait_published` (a reader may have frames due)."""
        self._nudges += 1
        self._frames.fire()

    def close(self) -> None:
        self.closed = True
        self._frames.fire()

    # -- plain clients -----------------------------------------------------------------------

    def subscribe(
        self, peer: str, since: tuple[str, int] | None = None, *, lag_max: int | None = None
    ) -> Subscription:
        """A cursor after `since` = (epoch, last seq received), or at the live end; it may
        fall `lag_max` frames behind (default ``client_lag_max``)."""
        sub = Subscription(next(self._ids), peer, self.last_seq + 1, lag_max or self.client_lag_max)
        if since is not None:
            epoch, seq = since
            last = self.last_seq
            if epoch == self.epoch and last < seq <= last + self.client_lag_max:
                # Ahead of us: this daemon restarted and regenerates the epoch from its
                # stored checkpoint. Those seqs will be the same stream: wait for them.
                sub.next_seq = seq + 1
            elif epoch != self.epoch or seq > last:
                why = (
                    f"epoch {epoch} is not this stream's history"
                    if epoch != self.epoch
                    else f"seq {seq} is ahead of this stream (at seq {last}) by more than "
                    f"client_lag_max ({self.client_lag_max})"
                )
                sub.gap = Gap(
                    epoch=self.epoch,
                    from_seq=None,
                    to_seq=last,
                    reason=f"{why}; continuing live from seq {last + 1}",
                )
            elif seq + 1 >= self.oldest and last - seq < self.client_lag_max:
                sub.next_seq = seq + 1
            else:
                # Replaying from the oldest buffered user (or all the lag it may have)
                # would cut the client off at once: the next publish evicts that user (or
                # puts it over the bound), and its reconnect asks for the same again.
                # Start it `resume_behind` users back instead, where it can keep up.
                sub.next_seq = last + 1 - self.resume_behind()
                sub.gap = Gap(
                    epoch=self.epoch,
                    from_seq=seq + 1,
                    to_seq=sub.next_seq - 1,
                    reason="no longer in the replay buffer"
                    if seq + 1 < self.oldest
                    else f"more than client_lag_max ({self.client_lag_max}) users behind",
                )
        self.subs[sub.id] = sub
        return sub

    def resume_behind(self) -> int:
        """How far behind the live end a client that cannot have everything it asked
        for starts: half ``client_lag_max``, and at most half of what the buffer holds,
        so that what it starts with stays buffered while it catches up."""
        return min(self.client_lag_max // 2, len(self.entries) // 2)

    def unsubscribe(self, sub: Subscription) -> None:
        self.subs.pop(sub.id, None)

    def next_frames_nowait(self, sub: Subscription, limit: int = 1) -> list[bytes] | None:
        """Up to `limit` of the subscriber's next frames, in order; None if it is at the
        live end; Slow if it was cut off."""
        due = self.take(sub, limit)
        return None if due is None else self.frames(*due)

    def take(self, sub: Subscription, limit: int) -> tuple[int, int] | None:
        """Move the subscriber's cursor past up to `limit` frames: the seqs (first, last)
        it passed, for `frames`; None if it is at the live end; Slow if it was cut off.
        (Readers at the same place get the same range: a writer builds its bytes once.)"""
        first = sub.next_seq
        if sub.slow or first < self.oldest or self.last_seq - first >= sub.lag_max:
            self._cut_off(sub)
            raise Slow(f"fell {self.last_seq - first + 1} frames behind")
        last = min(self.last_seq, first + limit - 1)
        if first > last:
            return None
        sub.next_seq = last + 1
        return first, last

    def frames(self, first: int, last: int) -> list[bytes]:
        """The buffered frames from seq `first` to `last`."""
        entries = self.entries
        return [entries[seq].frame for seq in range(first, last + 1)]

    async def next_frames(self, sub: Subscription, limit: int = 1) -> list[bytes]:
        """Wait for the subscriber's next frames (at most `limit`); trio.EndOfChannel
        once the buffer is closed and the subscriber has everything."""
        while (frames := self.next_frames_nowait(sub, limit)) is None:
            if self.closed:
                raise trio.EndOfChannel
            await self._frames.wait()
        return frames

    def _cut_off(self, sub: Subscription) -> None:
        if not sub.slow:
            sub.slow = True
            self.slow_disconnects += 1
