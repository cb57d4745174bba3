"""Sequence numbers, replay buffer, consumer groups and acks: the broadcaster's logic,
with no sockets in it.

**Stream position.** Every published user gets ``seq`` = previous + 1 within an
``epoch``, and carries the source ``position`` it came from.

**One buffer.** Published frames (encoded once) are kept in order, up to
``buffer_messages`` and ``buffer_bytes``. The oldest frame is evicted only when the buffer
is over a bound *and* every group has acknowledged it; if it cannot be evicted the buffer
is full and `Hub.publish` waits: a group that cannot keep up slows the producer, it never
loses users. The same buffer is the replay history for plain clients.

**Plain clients** read with a cursor. One that reconnects with its last ``(epoch, seq)``
resumes right after it if that frame is still buffered, or once it is published if the
client is ahead (a restarted daemon regenerating its epoch from the stored checkpoint);
otherwise it is told about the gap explicitly (`Gap`). A client more than
``client_lag_max`` frames behind, or whose next frame was evicted, is *slow* and is cut
off (the broadcaster closes it with code 3008); it never holds anything up.

**Groups.** Each frame goes to one member of each group; members acknowledge after their
database commit (``ack`` of explicit seqs). Each member has at most ``window`` frames in
flight, so a slow database slows delivery instead of growing memory. When a member
leaves, its unacknowledged frames go back to the group and are redelivered to the others
(or to it when it returns), lowest seq first. A group's *watermark* is the highest seq
with everything up to it acknowledged: durable, since acks follow commits.

**Only the daemon's own group holds the producer back.** It is declared with
``holds_producer``: the buffer keeps every frame it has not acknowledged, and the
producer waits for it. Any other group is bounded like a plain client: once it is more
than ``group_lag_max`` frames behind, or a frame it still needs is evicted, it is *cut
off*: its members end with `GroupLagging`, it restarts at the live end, and the next
member to join learns what the group missed from a `Gap`. A member holding frames that
acknowledges nothing for ``ack_timeout_s`` is evicted (`evict_silent_members`) and what
it held is redelivered.

**Wake-ups.** Nothing waits on a shared "something changed": plain clients wait for
new frames (woken by publishing, at most once per ``coalesce_s`` while `pace` runs, so a
sender takes several frames at once instead of one wake-up per user), each member for
frames assigned to it, the producer and `wait_drained` for acks. Senders take every frame
that is due at once (`next_frames`, `next_member_frames`).

**Counts.** Users published and, for the groups that hold the producer, committed or
set aside (`rejected` in their acks) are counted by source; each seq is counted once,
whoever acknowledges it. `on_committed` (if given) gets each committed user's seconds
from production to acknowledgement: the end-to-end latency.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import trio

from .protocol import Checkpoint, Gap, UserMessage

_encoder = msgspec.json.Encoder()


def _now() -> float:
    """trio's clock inside a run (so tests can jump it); the hub is also driven outside one."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


class Slow(Exception):
    """A plain client fell too far behind (or its next frame was evicted)."""


class StaleAck(Exception):
    """An ack for a seq this member does not hold (already acked, or from before a reconnect)."""


class MemberEnded(Exception):
    """This member is no longer part of its group; the broadcaster closes its connection."""


class GroupLagging(MemberEnded):
    """The member's group fell too far behind and was cut off."""


class AckTimeout(MemberEnded):
    """The member held users and acknowledged none of them for ``ack_timeout_s``."""


class _Entry(msgspec.Struct, gc=False):
    """One published user. (Not tracked by the garbage collector: a full collection
    would otherwise walk every one of the buffer's 100,000 entries.)"""

    seq: int
    position: int
    frame: bytes  # the encoded ``user`` message (UTF-8 JSON)
    source: str
    produced: float  # Unix time


class _Signal:
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


@dataclass(eq=False)
class Subscription:
    """A plain broadcast client: a cursor into the buffer."""

    id: int
    peer: str
    next_seq: int
    lag_max: int
    gap: Gap | None = None
    slow: bool = False
    cut: trio.Event = field(default_factory=trio.Event)  # set when it is cut off


@dataclass(eq=False)
class Member:
    id: int
    peer: str
    group: Group
    window: int
    in_flight: set[int] = field(default_factory=set)
    outbox: list[int] = field(default_factory=list)  # heap: assigned, not yet sent
    checkpoint_due: bool = False
    gap: Gap | None = None  # what its group missed before it joined: sent first
    ended: MemberEnded | None = None
    silent_since: float = 0.0  # when it last acknowledged something (or began to hold)
    due: _Signal = field(default_factory=_Signal)  # something to send (or it ended)


@dataclass(eq=False)
class Group:
    name: str
    watermark: int
    position: int = 0  # source position of the watermark's frame
    permanent: bool = False  # persists with no members (else removed with its last member)
    holds_producer: bool = False
    next_seq: int = 0
    redeliver: list[int] = field(default_factory=list)  # heap
    acked_above: set[int] = field(default_factory=set)
    members: dict[int, Member] = field(default_factory=dict)
    turn: int = 0  # round robin among members with room
    gap: Gap | None = None  # what it missed when cut off, for the next member to join

    def __post_init__(self) -> None:
        self.next_seq = self.next_seq or self.watermark + 1


@dataclass(slots=True)
class Due:
    """What a member is to be sent: encoded gap/checkpoint messages, then users."""

    control: list[bytes]
    users: list[bytes]


@dataclass(frozen=True)
class GroupStatistics:
    name: str
    members: int
    watermark: int
    in_flight: int
    pending: int


@dataclass(frozen=True)
class HubStatistics:
    epoch: str
    last_seq: int
    clients: int
    members: int
    buffered: int
    buffered_bytes: int
    slow_disconnects: int
    bad_frames: int
    groups_cut_off: int
    members_evicted: int
    groups: tuple[GroupStatistics, ...]


class Hub:
    def __init__(
        self,
        epoch: str,
        *,
        first_seq: int = 1,
        buffer_messages: int = 100_000,
        buffer_bytes: int = 256 * 2**20,
        client_lag_max: int = 10_000,
        group_lag_max: int = 10_000,
        window: int = 1000,
        lead_max: int = 0,
        on_committed: Callable[[float], None] | None = None,
    ) -> None:
        self.epoch = epoch
        self.lead_max = lead_max or buffer_messages
        self.last_seq = first_seq - 1
        self.buffer_messages, self.buffer_bytes = buffer_messages, buffer_bytes
        self.client_lag_max = client_lag_max
        self.group_lag_max = group_lag_max
        self.window = window
        self.slow_disconnects = self.bad_frames = 0
        self.groups_cut_off = self.members_evicted = 0
        self.published: Counter[str] = Counter()  # by source
        self.committed: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.on_committed = on_committed
        self._entries: dict[int, _Entry] = {}
        self._oldest = first_seq
        self._bytes = 0
        self._subs: dict[int, Subscription] = {}
        self._groups: dict[str, Group] = {}
        self._ids = itertools.count()
        self._frames = _Signal()  # plain clients: new frames (or the end)
        self._acks = _Signal()  # the producer and drain: acks, leaves, cut-offs
        self._published = _Signal()  # for `pace`
        self._pacing = False
        self.closed = False

    # -- publishing ------------------------------------------------------------------------

    @property
    def clients(self) -> int:
        return len(self._subs) + sum(len(g.members) for g in self._groups.values())

    @property
    def buffered(self) -> int:
        return len(self._entries)

    @property
    def users_committed(self) -> int:
        return sum(self.committed.values())

    def _floor(self) -> int:
        """Every seq at or below this is acknowledged by every group that holds the producer."""
        return min(
            (g.watermark for g in self._groups.values() if g.holds_producer),
            default=self.last_seq,
        )

    def _evict(self, room_for: int = 0) -> None:
        """Drop the oldest frames every group has acknowledged while over the bounds."""
        floor = self._floor()
        while (
            self._entries
            and (
                len(self._entries) + room_for > self.buffer_messages
                or self._bytes >= self.buffer_bytes
            )
            and self._oldest <= floor
        ):
            entry = self._entries.pop(self._oldest)
            self._bytes -= len(entry.frame)
            self._oldest += 1
        for group in list(self._groups.values()):
            if group.watermark + 1 < self._oldest:  # it still needs what is gone
                self._cut_off_group(group, "its next users left the buffer")

    def has_room(self) -> bool:
        """Room for one more user: the buffer is not full, and the producer is fewer than
        ``lead_max`` users ahead of the groups that hold it back (so that, when the loop
        is saturated, their members get the time to catch up rather than falling further
        behind)."""
        self._evict(room_for=1)
        return (
            len(self._entries) < self.buffer_messages
            and self._bytes < self.buffer_bytes
            and self.last_seq - self._floor() < self.lead_max
        )

    def publish_nowait(
        self,
        user: dict[str, Any] | msgspec.Raw,
        source: str,
        position: int,
        produced_at: datetime | None = None,
    ) -> UserMessage:
        """Append one user (the caller checked `has_room`, or accepts going over)."""
        produced_at = produced_at or datetime.now(UTC)
        message = UserMessage(
            epoch=self.epoch,
            seq=self.last_seq + 1,
            position=position,
            produced_at=produced_at,
            source=source,
            user=cast(dict[str, Any], user),  # a Raw is encoded as it is
        )
        frame = _encoder.encode(message)
        self._add(_Entry(message.seq, position, frame, source, produced_at.timestamp()))
        return message

    def append(self, seq: int, frame: bytes, source: str, position: int) -> None:
        """Mirror another hub: append its encoded ``user`` frame as it numbered it (or,
        with no `source`, the `messages.hole_frame` of a seq that holds no user). A seq
        that does not follow the last one starts the buffer over at it (clients still
        reading the old part are cut off, and learn what they missed when they resume)."""
        if seq != self.last_seq + 1:
            self._entries.clear()
            self._bytes = 0
            self._oldest = seq
        self._add(_Entry(seq, position, frame, source, time.time()))

    def _add(self, entry: _Entry) -> None:
        self.last_seq = entry.seq
        if entry.source:  # (not a `messages.hole_frame`)
            self.published[entry.source] += 1
        self._entries[entry.seq] = entry
        self._bytes += len(entry.frame)
        self._evict()
        for group in self._groups.values():
            self._dispatch(group)
        self._cut_off_laggards()
        if self._pacing:
            self._published.fire()
        else:
            self._frames.fire()

    async def pace(self, coalesce_s: float) -> None:
        """Until cancelled: wake plain clients at most once per `coalesce_s` after a
        publish (instead of at each), so each sender takes what came meanwhile at once."""
        self._pacing = coalesce_s > 0
        try:
            while self._pacing:
                await self._published.wait()
                await trio.sleep(coalesce_s)
                self._frames.fire()
        finally:
            self._pacing = False
            self._frames.fire()

    async def wait_for_room(self) -> None:
        """Return once the buffer has room (at once when it has)."""
        while not self.has_room():
            await self._acks.wait()

    async def publish(
        self, user: dict[str, Any] | msgspec.Raw, source: str, position: int
    ) -> UserMessage:
        """Append one user, first waiting while the buffer is full of unacknowledged frames."""
        await self.wait_for_room()
        return self.publish_nowait(user, source, position)

    # -- plain clients -----------------------------------------------------------------------

    def subscribe(
        self, peer: str, since: tuple[str, int] | None = None, *, lag_max: int | None = None
    ) -> Subscription:
        """A cursor after `since` = (epoch, last seq received), or at the live end; it may
        fall `lag_max` frames behind (default ``client_lag_max``)."""
        sub = Subscription(next(self._ids), peer, self.last_seq + 1, lag_max or self.client_lag_max)
        if since is not None:
            epoch, seq = since
            if epoch == self.epoch and self.last_seq < seq <= self.last_seq + self.client_lag_max:
                # Ahead of us: this daemon restarted and regenerates the epoch from its
                # stored checkpoint. Those seqs will be the same stream: wait for them.
                sub.next_seq = seq + 1
            elif epoch != self.epoch or seq > self.last_seq:
                sub.gap = Gap(
                    epoch=self.epoch,
                    from_seq=None,
                    to_seq=self.last_seq,
                    reason=f"epoch {epoch} is not this stream's history; "
                    f"continuing live from seq {self.last_seq + 1}",
                )
            elif self.last_seq - seq >= self.client_lag_max:
                # Replaying all of it would cut the client off at once, and its reconnect
                # would ask for the same again: skip to half the lag it may have.
                sub.next_seq = max(self._oldest, self.last_seq + 1 - self.client_lag_max // 2)
                sub.gap = Gap(
                    epoch=self.epoch,
                    from_seq=seq + 1,
                    to_seq=sub.next_seq - 1,
                    reason=f"more than client_lag_max ({self.client_lag_max}) users behind",
                )
            elif seq + 1 >= self._oldest:
                sub.next_seq = seq + 1
            else:
                sub.next_seq = self._oldest
                sub.gap = Gap(
                    epoch=self.epoch,
                    from_seq=seq + 1,
                    to_seq=self._oldest - 1,
                    reason="no longer in the replay buffer",
                )
        self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)

    def next_frames_nowait(self, sub: Subscription, limit: int = 1) -> list[bytes] | None:
        """Up to `limit` of the subscriber's next frames, in order; None if it is at the
        live end; Slow if it was cut off."""
        if sub.slow or sub.next_seq < self._oldest or self.last_seq - sub.next_seq >= sub.lag_max:
            self._cut_off(sub)
            raise Slow(f"fell {self.last_seq - sub.next_seq + 1} frames behind")
        first = sub.next_seq
        last = min(self.last_seq, first + limit - 1)
        if first > last:
            return None
        entries = self._entries
        sub.next_seq = last + 1
        return [entries[seq].frame for seq in range(first, last + 1)]

    async def next_frames(self, sub: Subscription, limit: int = 1) -> list[bytes]:
        """Wait for the subscriber's next frames (at most `limit`); trio.EndOfChannel
        once the hub is closed and the subscriber has everything."""
        while (frames := self.next_frames_nowait(sub, limit)) is None:
            if self.closed:
                raise trio.EndOfChannel
            await self._frames.wait()
        return frames

    def next_frame_nowait(self, sub: Subscription) -> str | None:
        """The subscriber's next frame, None if it is at the live end; Slow if cut off."""
        frames = self.next_frames_nowait(sub)
        return None if frames is None else frames[0].decode()

    async def next_frame(self, sub: Subscription) -> str:
        return (await self.next_frames(sub))[0].decode()

    def _cut_off_laggards(self) -> None:
        # Plain clients: checked every 64 publishes here (a scan of them all), and at each
        # read in `next_frames_nowait`.
        if not self.last_seq & 63:
            for sub in list(self._subs.values()):
                if self.last_seq - sub.next_seq >= sub.lag_max:
                    self._cut_off(sub)
        for group in list(self._groups.values()):
            if not group.holds_producer and self.last_seq - group.watermark > self.group_lag_max:
                self._cut_off_group(group, f"more than {self.group_lag_max} users behind")

    def _cut_off(self, sub: Subscription) -> None:
        if not sub.slow:
            sub.slow = True
            self.slow_disconnects += 1
            sub.cut.set()

    # -- groups ------------------------------------------------------------------------------

    def declare_group(
        self,
        name: str,
        *,
        watermark: int | None = None,
        position: int = 0,
        permanent: bool = True,
        holds_producer: bool = False,
    ) -> Group:
        """A group that is owed frames from `watermark` + 1 on, members or not (while it
        keeps up, unless it `holds_producer`)."""
        if name in self._groups:
            return self._groups[name]
        start = self.last_seq if watermark is None else watermark
        group = self._groups[name] = Group(name, start, position, permanent, holds_producer)
        return group

    def has_group(self, name: str) -> bool:
        return name in self._groups

    def join(self, group_name: str, peer: str, window: int | None = None) -> Member:
        group = self._groups.get(group_name) or self.declare_group(group_name, permanent=False)
        member = Member(next(self._ids), peer, group, window or self.window)
        member.silent_since = _now()
        member.gap, group.gap = group.gap, None
        group.members[member.id] = member
        self._dispatch(group)
        if member.gap is not None:
            member.due.fire()
        return member

    def leave(self, member: Member) -> None:
        """The member is gone: what it held unacknowledged goes back to its group."""
        group = member.group
        if group.members.pop(member.id, None) is None:
            return
        for seq in member.in_flight:
            heapq.heappush(group.redeliver, seq)
        member.in_flight.clear()
        member.outbox.clear()
        if not group.members and not group.permanent:
            del self._groups[group.name]  # nobody to deliver to: it no longer holds frames
        else:
            self._dispatch(group)
        member.due.fire()
        self._acks.fire()

    def _end(self, member: Member, ended: MemberEnded) -> None:
        member.ended = ended
        self.leave(member)

    def _cut_off_group(self, group: Group, reason: str) -> None:
        """The group is too far behind: its members end, it restarts at the live end, and
        the next member to join is told what it missed."""
        self.groups_cut_off += 1
        missed = Gap(
            epoch=self.epoch, from_seq=group.watermark + 1, to_seq=self.last_seq, reason=reason
        )
        for member in group.members.values():
            member.ended = GroupLagging(f"group {group.name!r} cut off: {reason}")
            member.in_flight.clear()
            member.outbox.clear()
            member.due.fire()
        group.members.clear()
        group.watermark, group.next_seq = self.last_seq, self.last_seq + 1
        group.redeliver.clear()
        group.acked_above.clear()
        if group.permanent:  # lives on at the live end
            group.gap = missed
        else:
            del self._groups[group.name]
        self._acks.fire()

    def evict_silent_members(self, timeout_s: float) -> list[Member]:
        """End every member that holds frames and has acknowledged none for `timeout_s`;
        what they held is redelivered."""
        deadline = _now() - timeout_s
        silent = [
            m
            for g in self._groups.values()
            for m in g.members.values()
            if m.in_flight and m.silent_since <= deadline
        ]
        for member in silent:
            self.members_evicted += 1
            self._end(member, AckTimeout(f"acknowledged nothing for {timeout_s:g} s"))
        return silent

    def _dispatch(self, group: Group) -> None:
        """Assign waiting frames to the members with room, in turn."""
        woken: set[int] = set()
        while group.members:
            if group.redeliver:
                seq = group.redeliver[0]
            elif group.next_seq <= self.last_seq:
                seq = group.next_seq
            else:
                return
            ready = [m for m in group.members.values() if len(m.in_flight) < m.window]
            if not ready:
                return
            member = ready[group.turn % len(ready)]
            group.turn += 1
            if not member.in_flight:
                member.silent_since = _now()
            if group.redeliver:
                heapq.heappop(group.redeliver)
            else:
                group.next_seq += 1
            member.in_flight.add(seq)
            heapq.heappush(member.outbox, seq)
            if member.id not in woken:
                woken.add(member.id)
                member.due.fire()

    def next_member_frames_nowait(self, member: Member, limit: int = 1) -> Due | None:
        """What the member is due: a gap it missed and its group's checkpoint, then up to
        `limit` users in seq order. None if nothing is due; MemberEnded once it ended."""
        if member.ended is not None:
            raise member.ended
        control = []
        if member.gap is not None:
            control.append(_encoder.encode(member.gap))
            member.gap = None
        if member.checkpoint_due:
            member.checkpoint_due = False
            group = member.group
            control.append(
                _encoder.encode(
                    Checkpoint(
                        group=group.name,
                        epoch=self.epoch,
                        seq=group.watermark,
                        position=group.position,
                    )
                )
            )
        outbox, entries = member.outbox, self._entries
        users = [entries[heapq.heappop(outbox)].frame for _ in range(min(limit, len(outbox)))]
        return Due(control, users) if control or users else None

    async def next_member_frames(self, member: Member, limit: int = 1) -> Due:
        while (due := self.next_member_frames_nowait(member, limit)) is None:
            if self.closed:
                raise trio.EndOfChannel
            await member.due.wait()
        return due

    def next_member_frame_nowait(self, member: Member) -> str | None:
        """The member's next frame, one at a time (gap, checkpoint, users)."""
        if member.gap is not None or member.checkpoint_due:
            due = self.next_member_frames_nowait(member, 0)
        else:
            due = self.next_member_frames_nowait(member, 1)
        if due is None:
            return None
        frames = due.control + due.users
        if len(frames) > 1:  # a gap and a checkpoint: give the checkpoint back
            member.checkpoint_due = True
        return frames[0].decode()

    def ack(self, member: Member, seqs: list[int], rejected: Collection[int] = ()) -> None:
        """The member committed these seqs (stored, or `rejected`: set aside instead).
        StaleAck names any it did not hold."""
        group = member.group
        stale = [s for s in seqs if s not in member.in_flight]
        now = time.time()
        for seq in seqs:
            if seq in member.in_flight:
                member.in_flight.discard(seq)
                group.acked_above.add(seq)
                member.silent_since = _now()
                if group.holds_producer and (entry := self._entries.get(seq)) is not None:
                    if seq in rejected:
                        self.rejected[entry.source] += 1
                    else:
                        self.committed[entry.source] += 1
                        if self.on_committed is not None:
                            self.on_committed(now - entry.produced)
        advanced = False
        while group.watermark + 1 in group.acked_above:
            group.watermark += 1
            group.acked_above.discard(group.watermark)
            advanced = True
        if advanced:
            entry = self._entries.get(group.watermark)
            if entry is not None:
                group.position = entry.position
            member.checkpoint_due = True
            member.due.fire()
        self._dispatch(group)
        self._acks.fire()
        if stale:
            raise StaleAck(f"not held by this member: {stale[:5]}")

    def watermark(self, group_name: str) -> tuple[int, int]:
        """(seq, source position) through which the group has acknowledged everything."""
        group = self._groups[group_name]
        return group.watermark, group.position

    # -- life cycle --------------------------------------------------------------------------

    def drained(self) -> bool:
        """Every group that holds the producer has acknowledged everything published
        (other groups are not waited for: they are bounded, not owed)."""
        return all(g.watermark >= self.last_seq for g in self._groups.values() if g.holds_producer)

    async def wait_drained(self) -> None:
        while not self.drained():
            await self._acks.wait()

    def close(self) -> None:
        """Clients get what is theirs to read, then the end of the stream."""
        self.closed = True
        self._frames.fire()
        self._acks.fire()
        for group in self._groups.values():
            for member in group.members.values():
                member.due.fire()

    def statistics(self) -> HubStatistics:
        groups = tuple(
            GroupStatistics(
                g.name,
                len(g.members),
                g.watermark,
                sum(len(m.in_flight) for m in g.members.values()),
                len(g.redeliver) + max(0, self.last_seq - g.next_seq + 1),
            )
            for g in self._groups.values()
        )
        return HubStatistics(
            self.epoch,
            self.last_seq,
            len(self._subs),
            sum(g.members for g in groups),
            len(self._entries),
            self._bytes,
            self.slow_disconnects,
            self.bad_frames,
            self.groups_cut_off,
            self.members_evicted,
            groups,
        )
