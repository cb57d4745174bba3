"""Sequence numbers, replay buffer, consumer groups and acks: the broadcaster's logic,
with no sockets in it. `Hub` is the public face; it composes the buffer and its plain
clients (`replay`) with the consumer groups (`groups`), and this module re-exports their
public names.

**Stream position.** Every published user gets ``seq`` = previous + 1 within an
``epoch``, and carries the source ``position`` it came from.

**Only the daemon's own group holds the producer back.** The oldest frame is evicted
only when the buffer is over a bound *and* every group declared with ``holds_producer``
has acknowledged it; if it cannot be evicted the buffer is full and `Hub.publish` waits:
such a group that cannot keep up slows the producer, it never loses users. The producer
also waits while it is ``lead_max`` users ahead of those groups. Every other group, and
every plain client, is bounded instead: cut off when too far behind.

**Wake-ups.** Nothing waits on a shared "something changed": plain clients wait for
new frames, each member for frames assigned to it, the producer and `wait_drained` for
acks.

**Counts.** Users published are counted by source, here; committed and rejected ones by
the groups.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import msgspec

from .groups import (
    AckTimeout,
    Due,
    Group,
    GroupLagging,
    Groups,
    GroupStatistics,
    Member,
    MemberEnded,
    StaleAck,
)
from .protocol import UserMessage
from .replay import Entry, Replay, Slow, Subscription

__all__ = [
    "AckTimeout",
    "Due",
    "Group",
    "GroupLagging",
    "GroupStatistics",
    "Hub",
    "HubStatistics",
    "Member",
    "MemberEnded",
    "Slow",
    "StaleAck",
    "Subscription",
]

_encoder = msgspec.json.Encoder()


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
        ids = itertools.count()  # subscriptions and members alike
        self._replay = replay = Replay(
            epoch,
            first_seq=first_seq,
            buffer_messages=buffer_messages,
            buffer_bytes=buffer_bytes,
            client_lag_max=client_lag_max,
            ids=ids,
        )
        self._consumers = Groups(
            replay, group_lag_max=group_lag_max, window=window, ids=ids, on_committed=on_committed
        )
        # The plain clients' writer moves their cursors past ranges of seqs (`Replay.take`)
        # and reads those frames (`Replay.frames`): the replay's own, called once per
        # client per pass.
        self.take = replay.take
        self.frames = replay.frames
        self.lead_max = lead_max or buffer_messages
        self.bad_frames = 0
        self.published: Counter[str] = Counter()  # by source

    # -- read through to the parts ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._replay.closed

    @property
    def epoch(self) -> str:
        return self._replay.epoch

    @property
    def last_seq(self) -> int:
        return self._replay.last_seq

    @property
    def oldest(self) -> int:
        """The oldest seq the buffer holds (last_seq + 1 while it is empty)."""
        return self._replay.oldest

    @property
    def buffer_messages(self) -> int:
        return self._replay.buffer_messages

    @property
    def buffer_bytes(self) -> int:
        return self._replay.buffer_bytes

    @property
    def client_lag_max(self) -> int:
        return self._replay.client_lag_max

    @property
    def group_lag_max(self) -> int:
        return self._consumers.group_lag_max

    @property
    def window(self) -> int:
        return self._consumers.window

    @property
    def on_committed(self) -> Callable[[float], None] | None:
        return self._consumers.on_committed

    @property
    def slow_disconnects(self) -> int:
        return self._replay.slow_disconnects

    @property
    def groups_cut_off(self) -> int:
        return self._consumers.groups_cut_off

    @property
    def members_evicted(self) -> int:
        return self._consumers.members_evicted

    @property
    def committed(self) -> Counter[str]:
        return self._consumers.committed

    @property
    def rejected(self) -> Counter[str]:
        return self._consumers.rejected

    @property
    def _entries(self) -> dict[int, Entry]:
        """The buffer, by seq (tests look into it)."""
        return self._replay.entries

    @property
    def _groups(self) -> dict[str, Group]:
        """The groups, by name (tests look into them)."""
        return self._consumers.by_name

    @property
    def clients(self) -> int:
        return len(self._replay.subs) + self._consumers.members

    @property
    def buffered(self) -> int:
        return len(self._replay.entries)

    @property
    def users_committed(self) -> int:
        return sum(self._consumers.committed.values())

    # -- publishing ------------------------------------------------------------------------

    def _evict(self, room_for: int = 0) -> None:
        """Drop the oldest frames every group that holds the producer has acknowledged
        while over the bounds; cut off the groups that needed them."""
        self._replay.evict(self._consumers.floor(), room_for)
        self._consumers.cut_off_evicted()

    def has_room(self) -> bool:
        """Room for one more user: the buffer is not full, and the producer is fewer than
        ``lead_max`` users ahead of the groups that hold it back (so that, when the loop
        is saturated, their members get the time to catch up rather than falling further
        behind)."""
        self._evict(room_for=1)
        replay = self._replay
        return replay.has_room() and replay.last_seq - self._consumers.floor() < self.lead_max

    def publish_nowait(
        self,
        user: dict[str, Any] | msgspec.Raw,
        source: str,
        position: int,
        produced_at: datetime | None = None,
    ) -> UserMessage:
        """Append one user (the caller checked `has_room`, or accepts going over)."""
        produced_at = produced_at or datetime.now(UTC)
        replay = self._replay
        message = UserMessage(
            epoch=replay.epoch,
            seq=replay.last_seq + 1,
            position=position,
            produced_at=produced_at,
            source=source,
            user=cast(dict[str, Any], user),  # a Raw is encoded as it is
        )
        frame = _encoder.encode(message)
        self._add(Entry(message.seq, position, frame, source, produced_at.timestamp()))
        return message

    def append(self, seq: int, frame: bytes, source: str, position: int) -> None:
        """Mirror another hub: append its encoded ``user`` frame as it numbered it (or,
        with no `source`, the `protocol.hole_frame` of a seq that holds no user). A seq
        that does not follow the last one starts the buffer over at it (clients still
        reading the old part are cut off, and learn what they missed when they resume)."""
        if seq != self._replay.last_seq + 1:
            self._replay.restart_at(seq)
        self._add(Entry(seq, position, frame, source, time.time()))

    def _add(self, entry: Entry) -> None:
        replay, consumers = self._replay, self._consumers
        replay.add(entry)
        if entry.source:  # (not a `protocol.hole_frame`)
            self.published[entry.source] += 1
        replay.evict(consumers.floor())
        consumers.follow()
        replay.wake()

    def mark(self) -> tuple[int, int, bool]:
        return self._replay.mark()

    async def wait_published(self, mark: tuple[int, int, bool]) -> None:
        """Return once the stream moved past `mark` (`mark`: where it stood): a publish,
        the close, or a `nudge` (the plain clients' writer waits here)."""
        await self._replay.wait_published(mark)

    def nudge(self) -> None:
        self._replay.nudge()

    async def wait_for_room(self) -> None:
        """Return once the buffer has room (at once when it has)."""
        while not self.has_room():
            await self._consumers.acks.wait()

    async def publish(
        self, user: dict[str, Any] | msgspec.Raw, source: str, position: int
    ) -> UserMessage:
        """Append one user, first waiting while the buffer is full of unacknowledged frames."""
        await self.wait_for_room()
        return self.publish_nowait(user, source, position)

    # -- plain clients (see `replay`) -------------------------------------------------------

    def subscribe(
        self, peer: str, since: tuple[str, int] | None = None, *, lag_max: int | None = None
    ) -> Subscription:
        """A cursor after `since` = (epoch, last seq received), or at the live end; it may
        fall `lag_max` frames behind (default ``client_lag_max``)."""
        return self._replay.subscribe(peer, since, lag_max=lag_max)

    def unsubscribe(self, sub: Subscription) -> None:
        self._replay.unsubscribe(sub)

    def next_frames_nowait(self, sub: Subscription, limit: int = 1) -> list[bytes] | None:
        """Up to `limit` of the subscriber's next frames, in order; None if it is at the
        live end; Slow if it was cut off."""
        return self._replay.next_frames_nowait(sub, limit)

    async def next_frames(self, sub: Subscription, limit: int = 1) -> list[bytes]:
        """Wait for the subscriber's next frames (at most `limit`); trio.EndOfChannel
        once the hub is closed and the subscriber has everything."""
        return await self._replay.next_frames(sub, limit)

    def next_frame_nowait(self, sub: Subscription) -> str | None:
        """The subscriber's next frame, None if it is at the live end; Slow if cut off."""
        frames = self._replay.next_frames_nowait(sub)
        return None if frames is None else frames[0].decode()

    async def next_frame(self, sub: Subscription) -> str:
        return (await self._replay.next_frames(sub))[0].decode()

    # -- groups (see `groups`) ---------------------------------------------------------------

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
        return self._consumers.declare(
            name,
            watermark=watermark,
            position=position,
            permanent=permanent,
            holds_producer=holds_producer,
        )

    def has_group(self, name: str) -> bool:
        return name in self._consumers.by_name

    def join(self, group_name: str, peer: str, window: int | None = None) -> Member:
        return self._consumers.join(group_name, peer, window)

    def leave(self, member: Member) -> None:
        """The member is gone: what it held unacknowledged goes back to its group."""
        self._consumers.leave(member)

    def evict_silent_members(self, timeout_s: float) -> list[Member]:
        """End every member that holds frames and has acknowledged none for `timeout_s`;
        what they held is redelivered."""
        return self._consumers.evict_silent_members(timeout_s)

    def forget_empty_groups(self, grace_s: float) -> list[str]:
        """Forget the ad-hoc groups that have had no member for `grace_s` (until then,
        a member that joins gets what the last ones held); their names."""
        return self._consumers.forget_empty_groups(grace_s)

    def next_member_frames_nowait(self, member: Member, limit: int = 1) -> Due | None:
        """What the member is due: a gap it missed and its group's checkpoint, then up to
        `limit` users in seq order. None if nothing is due; MemberEnded once it ended."""
        return self._consumers.next_member_frames_nowait(member, limit)

    async def next_member_frames(self, member: Member, limit: int = 1) -> Due:
        return await self._consumers.next_member_frames(member, limit)

    def next_member_frame_nowait(self, member: Member) -> str | None:
        """The member's next frame, one at a time (gap, checkpoint, users)."""
        consumers = self._consumers
        if member.gap is not None or member.checkpoint_due:
            due = consumers.next_member_frames_nowait(member, 0)
        else:
            due = consumers.next_member_frames_nowait(member, 1)
        if due is None:
            return None
        frames = due.control + due.users
        if len(frames) > 1:  # a gap and a checkpoint: give the checkpoint back
            member.checkpoint_due = True
        return frames[0].decode()

    def ack(self, member: Member, seqs: list[int], rejected: Collection[int] = ()) -> None:
        """The member committed these seqs (stored, or `rejected`: set aside instead).
        StaleAck names any it did not hold."""
        self._consumers.ack(member, seqs, rejected)

    def watermark(self, group_name: str) -> tuple[int, int]:
        """(seq, source position) through which the group has acknowledged everything."""
        return self._consumers.watermark(group_name)

    # -- life cycle --------------------------------------------------------------------------

    def drained(self) -> bool:
        """Every group that holds the producer has acknowledged everything published
        (other groups are not waited for: they are bounded, not owed)."""
        return self._consumers.drained()

    async def wait_drained(self) -> None:
        await self._consumers.wait_drained()

    def close(self) -> None:
        """Clients get what is theirs to read, then the end of the stream."""
        self._replay.close()
        self._consumers.close()

    def statistics(self) -> HubStatistics:
        replay = self._replay
        groups = self._consumers.statistics()
        return HubStatistics(
            replay.epoch,
            replay.last_seq,
            len(replay.subs),
            sum(g.members for g in groups),
            len(replay.entries),
            replay.bytes,
            replay.slow_disconnects,
            self.bad_frames,
            self.groups_cut_off,
            self.members_evicted,
            groups,
        )
