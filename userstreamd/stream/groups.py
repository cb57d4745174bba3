"""Consumer groups: each frame of the replay buffer goes to one member of each group, which
acknowledges it after its database commit (no sockets).

**Windows and acks.** Members acknowledge explicit seqs (`Groups.ack`). Each member has
at most ``window`` frames in flight, so a slow database slows delivery instead of growing
memory. When a member leaves, its unacknowledged frames go back to the group and are
redelivered to the others (or to it when it returns), lowest seq first. A group's
*watermark* is the highest seq with everything up to it acknowledged: durable, since acks
follow commits.

**Holding the producer.** A group declared with ``holds_producer`` is owed every frame:
the buffer keeps what it has not acknowledged (`floor`), and the hub's producer waits for
it. Any other group is bounded like a plain client: once it is more than
``group_lag_max`` frames behind, or a frame it still needs is evicted, it is *cut off*:
its members end with `GroupLagging`, it restarts at the live end, and the next member to
join learns what the group missed from a `Gap`. A member holding frames that acknowledges
nothing for ``ack_timeout_s`` is evicted (`evict_silent_members`, `AckTimeout`) and what
it held is redelivered.

**Ad-hoc groups** (made up by a client's ``?group=NAME``, not declared) end with their
last member, but not at once: an emptied one keeps what its last members held (and what
is published meanwhile, bounded like any group) until `forget_empty_groups` finds it
empty for the grace period, so a member that reconnects gets it redelivered. At most
`EMPTY_GROUPS_MAX` are kept; beyond, the one empty the longest is forgotten.

**Wake-ups.** Each member waits for the frames assigned to it (`Member.due`), the
producer and `wait_drained` for acks (`acks`); a sender takes every frame that is due at
once (`next_member_frames`).

**Counts.** For the groups that hold the producer, users committed or set aside
(`rejected` in their acks) are counted by source; each seq is counted once, whoever
acknowledges it. `on_committed` (if given) gets each committed user's seconds from
production to acknowledgement: the end-to-end latency.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import trio

from .protocol import Checkpoint, Gap
from .replay import Replay, Signal

_encoder = msgspec.json.Encoder()
EMPTY_GROUPS_MAX = 256  # emptied ad-hoc groups kept for their grace period, at most


def _now() -> float:
    """trio's clock inside a run (so tests can jump it); the hub is also driven outside one."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


class StaleAck(Exception):
    """An ack for a seq this member does not hold (already acked, or from before a reconnect)."""


class MemberEnded(Exception):
    """This member is no longer part of its group; the broadcaster closes its connection."""


class GroupLagging(MemberEnded):
    """The member's group fell too far behind and was cut off."""


class AckTimeout(MemberEnded):
    """The member held users and acknowledged none of them for ``ack_timeout_s``."""


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
    due: Signal = field(default_factory=Signal)  # something to send (or it ended)


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
    emptied_at: float | None = None  # (ad hoc) when its last member left

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


class Groups:
    """The consumer groups reading `replay`, by name. `ids` numbers the members (shared
    with the plain clients)."""

    def __init__(
        self,
        replay: Replay,
        *,
        group_lag_max: int,
        window: int,
        ids: Iterator[int],
        on_committed: Callable[[float], None] | None = None,
    ) -> None:
        self._replay = replay
        self.group_lag_max = group_lag_max
        self.window = window
        self.on_committed = on_committed
        self.groups_cut_off = self.members_evicted = 0
        self.committed: Counter[str] = Counter()  # by source
        self.rejected: Counter[str] = Counter()
        self.by_name: dict[str, Group] = {}
        self.empty: dict[str, Group] = {}  # emptied ad-hoc groups, the longest empty first
        self.acks = Signal()  # the producer and drain: acks, leaves, cut-offs
        self.closed = False
        self._ids = ids

    @property
    def members(self) -> int:
        return sum(len(g.members) for g in self.by_name.values())

    def floor(self) -> int:
        """Every seq at or below this is acknowledged by every group that holds the producer."""
        return min(
            (g.watermark for g in self.by_name.values() if g.holds_producer),
            default=self._replay.last_seq,
        )

    # -- following the buffer ----------------------------------------------------------------

    def follow(self) -> None:
        """A frame was published (and the buffer evicted what it could): cut off the groups
        whose next frame is gone, assign the new frame in the others, and cut off those
        that are not owed it and fell too far behind."""
        self.cut_off_evicted()
        for group in self.by_name.values():
            self._dispatch(group)
        last_seq = self._replay.last_seq
        for group in list(self.by_name.values()):
            if not group.holds_producer and last_seq - group.watermark > self.group_lag_max:
                self._cut_off(group, f"more than {self.group_lag_max} users behind")

    def cut_off_evicted(self) -> None:
        """Cut off every group whose next frame is no longer in the buffer."""
        oldest = self._replay.oldest
        for group in list(self.by_name.values()):
            if group.watermark + 1 < oldest:  # it still needs what is gone
                self._cut_off(group, "its next users left the buffer")

    # -- membership --------------------------------------------------------------------------

    def declare(
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
        if name in self.by_name:
            return self.by_name[name]
        start = self._replay.last_seq if watermark is None else watermark
        group = self.by_name[name] = Group(name, start, position, permanent, holds_producer)
        return group

    def join(self, group_name: str, peer: str, window: int | None = None) -> Member:
        group = self.by_name.get(group_name) or self.declare(group_name, permanent=False)
        if self.empty.pop(group_name, None) is not None:
            group.emptied_at = None
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
            # Kept for a member that comes back (`forget_empty_groups`), within bounds.
            group.emptied_at = _now()
            self.empty[group.name] = group
            if len(self.empty) > EMPTY_GROUPS_MAX:
                self._forget(next(iter(self.empty.values())))
        else:
            self._dispatch(group)
        member.due.fire()
        self.acks.fire()

    def _end(self, member: Member, ended: MemberEnded) -> None:
        member.ended = ended
        self.leave(member)

    def _cut_off(self, group: Group, reason: str) -> None:
        """The group is too far behind: its members end, it restarts at the live end, and
        the next member to join is told what it missed."""
        self.groups_cut_off += 1
        last_seq = self._replay.last_seq
        missed = Gap(
            epoch=self._replay.epoch, from_seq=group.watermark + 1, to_seq=last_seq, reason=reason
        )
        for member in group.members.values():
            member.ended = GroupLagging(f"group {group.name!r} cut off: {reason}")
            member.in_flight.clear()
            member.outbox.clear()
            member.due.fire()
        group.members.clear()
        group.watermark, group.next_seq = last_seq, last_seq + 1
        group.redeliver.clear()
        group.acked_above.clear()
        if group.permanent:  # lives on at the live end
            group.gap = missed
        else:
            self._forget(group)
        self.acks.fire()

    def _forget(self, group: Group) -> None:
        """An ad-hoc group ends: what it held is released."""
        self.by_name.pop(group.name, None)
        self.empty.pop(group.name, None)

    def forget_empty_groups(self, grace_s: float) -> list[str]:
        """Forget the ad-hoc groups empty for `grace_s` or more (what their members held
        is no longer redelivered to anyone); their names."""
        deadline = _now() - grace_s
        gone = [g for g in self.empty.values() if (g.emptied_at or 0.0) <= deadline]
        for group in gone:
            self._forget(group)
        return [g.name for g in gone]

    def evict_silent_members(self, timeout_s: float) -> list[Member]:
        """End every member that holds frames and has acknowledged none for `timeout_s`;
        what they held is redelivered."""
        deadline = _now() - timeout_s
        silent = [
            m
            for g in self.by_name.values()
            for m in g.members.values()
            if m.in_flight and m.silent_since <= deadline
        ]
        for member in silent:
            self.members_evicted += 1
            self._end(member, AckTimeout(f"acknowledged nothing for {timeout_s:g} s"))
        return silent

    # -- delivery ----------------------------------------------------------------------------

    def _dispatch(self, group: Group) -> None:
        """Assign waiting frames to the members with room, in turn."""
        last_seq = self._replay.last_seq
        woken: set[int] = set()
        while group.members:
            if group.redeliver:
                seq = group.redeliver[0]
            elif group.next_seq <= last_seq:
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
                        epoch=self._replay.epoch,
                        seq=group.watermark,
                        position=group.position,
                    )
                )
            )
        outbox, entries = member.outbox, self._replay.entries
        users = [entries[heapq.heappop(outbox)].frame for _ in range(min(limit, len(outbox)))]
        return Due(control, users) if control or users else None

    async def next_member_frames(self, member: Member, limit: int = 1) -> Due:
        while (due := self.next_member_frames_nowait(member, limit)) is None:
            if self.closed:
                raise trio.EndOfChannel
            await member.due.wait()
        return due

    def ack(self, member: Member, seqs: list[int], rejected: Collection[int] = ()) -> None:
        """The member committed these seqs (stored, or `rejected`: set aside instead).
        StaleAck names any it did not hold."""
        group = member.group
        entries = self._replay.entries
        stale = [s for s in seqs if s not in member.in_flight]
        now = time.time()
        for seq in seqs:
            if seq in member.in_flight:
                member.in_flight.discard(seq)
                group.acked_above.add(seq)
                member.silent_since = _now()
                if group.holds_producer and (entry := entries.get(seq)) is not None:
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
            entry = entries.get(group.watermark)
            if entry is not None:
                group.position = entry.position
            member.checkpoint_due = True
            member.due.fire()
        self._dispatch(group)
        self.acks.fire()
        if stale:
            raise StaleAck(f"not held by this member: {stale[:5]}")

    def watermark(self, group_name: str) -> tuple[int, int]:
        """(seq, source position) through which the group has acknowledged everything."""
        group = self.by_name[group_name]
        return group.watermark, group.position

    # -- life cycle --------------------------------------------------------------------------

    def drained(self) -> bool:
        """Every group that holds the producer has acknowledged everything published
        (other groups are not waited for: they are bounded, not owed)."""
        last_seq = self._replay.last_seq
        return all(g.watermark >= last_seq for g in self.by_name.values() if g.holds_producer)

    async def wait_drained(self) -> None:
        while not self.drained():
            await self.acks.wait()

    def close(self) -> None:
        """Members get what is theirs to read, then the end of the stream."""
        self.closed = True
        self.acks.fire()
        for group in self.by_name.values():
            for member in group.members.values():
                member.due.fire()

    def statistics(self) -> tuple[GroupStatistics, ...]:
        last_seq = self._replay.last_seq
        return tuple(
            GroupStatistics(
                g.name,
                len(g.members),
                g.watermark,
                sum(len(m.in_flight) for m in g.members.values()),
                len(g.redeliver) + max(0, last_seq - g.next_seq + 1),
            )
            for g in self.by_name.values()
        )


class MemberGroups(Protocol):
    """The groups a broadcaster's members join, as its member path sees them: the hub's
    (`Groups`, through `Hub`) on the embedded bus, the stream's durable consumers on the
    NATS bus; the topology chooses (`Topology.member_groups`)."""

    def join(self, group_name: str, peer: str, window: int | None = None) -> Member: ...

    def leave(self, member: Member) -> None:
        """The member is gone: what it held unacknowledged goes back to its group."""
        ...

    async def next_member_frames(self, member: Member, limit: int = 1) -> Due:
        """What the member is due (waiting for it); MemberEnded once it ended,
        trio.EndOfChannel once the stream ends."""
        ...

    def ack(self, member: Member, seqs: list[int], rejected: Collection[int] = ()) -> None:
        """The member committed these seqs; StaleAck names any it did not hold."""
        ...

    def evict_silent_members(self, timeout_s: float) -> list[Member]:
        """End the members that hold users and acknowledged none for `timeout_s`."""
        ...

    def forget_empty_groups(self, grace_s: float) -> list[str]:
        """Forget the ad-hoc groups empty for `grace_s`; their names."""
        ...
