"""WebSocket consumer groups on the NATS bus: each group a durable JetStream consumer.

``?group=NAME`` on any broadcaster of the stream joins the durable pull consumer
``ws~NAME`` (`consumer_name`: the ``~``, which no group name has, keeps it apart from
``consumers.group``'s; a ``.`` of NAME, which a consumer name may not have, becomes a
``~`` too). Its members, on any broadcaster, share its users: the server hands each
message to one of them. The wire protocol is the embedded bus's (welcome, ``user`` and
``users`` frames as the producer encoded them, ``checkpoint``, the member's ``ack``), and
so are the permissions (`admission`), windows and close codes:

- **Window.** A member asks the server for at most ``window`` users minus those it holds
  (one pull request outstanding, as the daemon's consumers: `pull`). The group as a whole
  holds at most ``broadcaster.group_lag_max`` unacknowledged (its ``MaxAckPending``).
- **Acks.** A member acknowledges after its commit; each seq acknowledged becomes the
  message's JetStream ack (fire and forget, as `consumer._ack`). An ack of a seq it does
  not hold is stale, as on the embedded bus.
- **A member that leaves** (its connection closed or broken, the broadcaster stopping):
  what it held, and what the server had sent it that it was not given yet, is NAKed:
  redelivered to another member at once.
- **A silent member** (holding users, acknowledging none for ``ack_timeout_s``) is closed
  with 4000 (`AckTimeout`) and what it held is NAKed. A broadcaster that dies NAKs
  nothing: the server redelivers its members' users after ``cluster.ack_wait_s``.
- **No 4001.** The stream holds a group's backlog (up to its own limits,
  ``cluster.max_messages`` and ``max_age_s``), so a group behind is never cut off.
- **Checkpoint.** At most once a second, after a member's acks, it is sent the group's
  ack floor (read from the server: everything up to it acknowledged by some member).

- **A pull that fails** (the consumer's leader changed, the consumer was deleted) is
  made again (and the consumer with it); what the member holds stays its own.

**A new group** is owed the users published after it was made (``DeliverPolicy.NEW``),
as on the embedded bus: a named one (``broadcaster.groups``) as a broadcaster starts
(`declare_groups`), an ad-hoc one when its first member joins. It then keeps its place
on the servers, across broadcasters and their restarts. An ad-hoc group's consumer is
deleted by the servers once inactive (no member pulling or acknowledging) for
``ad_hoc_group_grace_s`` (at least a second); a named one stays.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import trio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ...backoff import Backoff
from ...config import Config
from ...errors import ProtocolError, describe
from ...logs import get_logger
from ...stream.groups import AckTimeout, Due, Group, Member, StaleAck
from ...stream.hub import Hub
from ...stream.protocol import Checkpoint, decode_head
from .bus import Bus
from .consumer import _floor
from .pull import FETCH_WAIT_S, Pull

PREFIX = "ws~"
CHECKPOINT_EVERY_S = 1.0
AD_HOC_GRACE_MIN_S = 1.0  # (an inactive threshold of 0 would be none)
ACK_WAIT_MARGIN_S = 5.0  # a group's AckWait: ack_timeout_s and this, at least
_ACK, _NAK = b"", b"-NAK"
_encoder = msgspec.json.Encoder()


def consumer_name(group: str) -> str:
    """The durable consumer of WebSocket group `group`."""
    return PREFIX + group.replace(".", "~")


class _Taker:
    """(On the client's loop.) One member's pull from its group's durable consumer, and
    the reply subject of each message it holds (to ack or NAK it)."""

    def __init__(self, bus: Bus, consumer: str) -> None:
        self.bus = bus
        self.consumer = consumer
        self.pull: Pull | None = None
        self.replies: dict[int, str] = {}  # seq -> reply subject, until acked or NAKed

    async def start(self) -> None:
        """A new pull (in place of one that failed: what came to it untaken is NAKed;
        what the member holds, it still holds)."""
        await self._stop_pull()
        self.pull = Pull(self.bus, self.consumer, 1)
        await self.pull.start()

    async def _stop_pull(self) -> None:
        if self.pull is not None:
            pull, self.pull = self.pull, None
            for msg in await pull.stop():
                await msg.nak()

    async def take(self, room: int) -> list[tuple[int, bytes]]:
        """What came, asking for at most `room` users in all (`Pull.take`)."""
        assert self.pull is not None, "start() first"
        self.pull.batch = room
        taken = []
        for msg in await self.pull.take():
            seq = msg.metadata.sequence.stream
            self.replies[seq] = msg.reply
            taken.append((seq, msg.data))
        return taken

    async def settle(self, seqs: list[int], answer: bytes) -> None:
        publish = self.bus.nc.publish
        for seq in seqs:
            if (reply := self.replies.pop(seq, None)) is not None:
                await publish(reply, answer)

    async def stop(self) -> None:
        """Unsubscribe; NAK what came untaken and what is held."""
        with contextlib.suppress(nats.errors.Error):
            await self._stop_pull()
        with contextlib.suppress(nats.errors.Error):
            await self.settle(list(self.replies), _NAK)


@dataclass(eq=False)
class _State:
    taker: _Taker
    bound: bool = False  # (its pull started, and has not failed since)
    floor_read_at: float = float("-inf")
    floor_sent: int = 0
    acked_max: int = 0  # the highest seq the member acknowledged


async def _ensure(bus: Bus, consumer: str, config: ConsumerConfig) -> None:
    """(On the client's loop.) The durable consumer, made if missing, its AckWait,
    MaxAckPending and inactive threshold brought to `config`'s (a group once ad hoc,
    now named, is no longer deleted when inactive)."""
    try:
        info = await bus.js.consumer_info(bus.stream, consumer)
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # made meanwhile
            await bus.js.add_consumer(bus.stream, config)
        return
    have = info.config
    if (
        have.max_ack_pending != config.max_ack_pending
        or round(have.ack_wait or 0) != round(config.ack_wait or 0)
        or round(have.inactive_threshold or 0) != round(config.inactive_threshold or 0)
    ):
        await bus.js.add_consumer(  # (an update, for a durable that exists)
            bus.stream,
            have.evolve(
                max_ack_pending=config.max_ack_pending,
                ack_wait=config.ack_wait,
                inactive_threshold=config.inactive_threshold or 0,
            ),
        )


def consumer_config(bus: Bus, config: Config, group: str) -> ConsumerConfig:
    """Group `group`'s durable consumer, as made when missing."""
    b = config.broadcaster
    ad_hoc = group not in b.groups
    return ConsumerConfig(
        durable_name=consumer_name(group),
        ack_policy=AckPolicy.EXPLICIT,
        # (never sooner than a member is judged silent: a member still holding a user
        # would get it again, or another would, while it may yet commit it)
        ack_wait=max(config.cluster.ack_wait_s, b.ack_timeout_s + ACK_WAIT_MARGIN_S),
        max_ack_pending=b.group_lag_max,
        max_deliver=-1,
        filter_subject=bus.subject,
        deliver_policy=DeliverPolicy.NEW,
        # (a group whose members all hold full windows pulls nothing for up to
        # ack_timeout_s: still in use)
        inactive_threshold=(
            max(b.ad_hoc_group_grace_s, AD_HOC_GRACE_MIN_S) + b.ack_timeout_s if ad_hoc else None
        ),
    )


async def declare_groups(bus: Bus, config: Config) -> None:
    """Make the consumers of the named groups (``broadcaster.groups``) that are missing:
    from now on, each is owed what is published, members or not (as on the embedded
    bus, where the broadcaster declares them as it starts)."""
    for group in config.broadcaster.groups:
        await bus.retrying(
            "broadcaster.nats_unavailable",
            _ensure,
            bus,
            consumer_name(group),
            consumer_config(bus, config, group),
        )


class NatsGroups:
    """The `MemberGroups` of a broadcaster on the NATS bus (the end of the stream is
    `hub`'s, the broadcaster's mirror)."""

    def __init__(self, bus: Bus, config: Config, hub: Hub) -> None:
        self.bus = bus
        self.config = config
        self.hub = hub
        self.by_name: dict[str, Group] = {}  # the groups with members here
        self.members_evicted = 0
        self.foreign = 0  # messages skipped (and acknowledged): not users of this stream
        self._states: dict[int, _State] = {}
        self._ids = itertools.count()

    def join(self, group_name: str, peer: str, window: int | None = None) -> Member:
        group = self.by_name.get(group_name)
        if group is None:
            group = self.by_name[group_name] = Group(group_name, 0)
        member = Member(next(self._ids), peer, group, window or self.config.consumers.window)
        group.members[member.id] = member
        self._states[member.id] = _State(_Taker(self.bus, consumer_name(group_name)))
        return member

    def leave(self, member: Member) -> None:
        state = self._states.pop(member.id, None)
        if state is None:
            return
        group = member.group
        group.members.pop(member.id, None)
        if not group.members:
            self.by_name.pop(group.name, None)
        member.in_flight.clear()
        member.due.fire()
        self._submit(state.taker.stop)

    def _submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start `fn` on the client's loop, not waiting for it (acks and NAKs: one that is
        lost is redelivered after ``cluster.ack_wait_s``)."""
        with contextlib.suppress(RuntimeError):  # (the loop closed: the bus is gone)
            self.bus.thread.submit(fn, *args)

    async def _bind(self, member: Member, state: _State) -> None:
        """The group's consumer (made if missing), and a pull from it."""
        bus, name = self.bus, member.group.name
        await bus.retrying(
            "broadcaster.nats_unavailable",
            _ensure,
            bus,
            state.taker.consumer,
            consumer_config(bus, self.config, name),
        )
        await bus.call(state.taker.start)
        state.bound = True

    async def next_member_frames(self, member: Member, limit: int = 1) -> Due:
        """The users the server gave the member (as many as came: `limit` is the hub's)
        and its group's checkpoint; waits while its window is full or nothing comes."""
        state = self._states[member.id]
        delays = Backoff(0.1, 5.0).delays()
        while True:
            if member.ended is not None:
                raise member.ended
            if self.hub.closed:
                raise trio.EndOfChannel
            control = await self._checkpoint(member, state)
            room = member.window - len(member.in_flight)
            if room <= 0:
                if control:
                    return Due(control, [])
                with trio.move_on_after(FETCH_WAIT_S):
                    await member.due.wait()  # (an ack, or the member ended)
                continue
            if not state.bound:
                await self._bind(member, state)
            try:
                taken = await self.bus.call(state.taker.take, room)
                delays.reset()
            except (nats.errors.Error, TimeoutError) as exc:  # (a leader change, say)
                get_logger().warning(
                    "broadcaster.group_pull_failed", group=member.group.name, error=describe(exc)
                )
                state.bound = False
                await delays.sleep()
                continue
            if member.ended is not None:  # (evicted while it waited: not its users now)
                self._submit(state.taker.settle, [seq for seq, _ in taken], _NAK)
                raise member.ended
            users = self._users(member, state.taker, taken)
            if users or control:
                return Due(control, users)

    def _users(self, member: Member, taker: _Taker, taken: list[tuple[int, bytes]]) -> list[bytes]:
        """The users of `taken`, now held by the member; anything else is acknowledged
        (skipped) and counted."""
        users, foreign = [], []
        epoch = self.bus.epoch
        for seq, data in taken:
            try:
                head = decode_head(data)
                if head.seq != seq or head.epoch != epoch:
                    raise ProtocolError(f"seq {head.seq} in epoch {head.epoch}")
            except ProtocolError as exc:
                foreign.append(seq)
                get_logger().warning("broadcaster.foreign_message", seq=seq, error=str(exc))
                continue
            if seq in member.in_flight:  # (redelivered to the member that holds it)
                continue
            users.append(data)
            if not member.in_flight:
                member.silent_since = trio.current_time()
            member.in_flight.add(seq)
        if foreign:
            self.foreign += len(foreign)
            self._submit(taker.settle, foreign, _ACK)
        return users

    async def _checkpoint(self, member: Member, state: _State) -> list[bytes]:
        """The group's ack floor, once a second at most after the member acknowledged
        something (if it moved since the last one sent)."""
        now = trio.current_time()
        if not member.checkpoint_due or now - state.floor_read_at < CHECKPOINT_EVERY_S:
            return []
        state.floor_read_at = now
        name = member.group.name
        try:
            seq, position = await self.bus.call(_floor, self.bus, consumer_name(name))
        except (nats.errors.Error, TimeoutError, ProtocolError):
            return []  # (asked again in a second)
        # (until it passes what the member acknowledged: acks reach the server later,
        # and the floor waits for what other members hold)
        member.checkpoint_due = seq < state.acked_max
        if seq <= state.floor_sent:
            return []
        state.floor_sent = seq
        checkpoint = Checkpoint(group=name, epoch=self.bus.epoch, seq=seq, position=position)
        return [_encoder.encode(checkpoint)]

    def ack(self, member: Member, seqs: list[int], rejected: Collection[int] = ()) -> None:
        """The member committed these seqs: their messages are acknowledged. StaleAck
        names any it did not hold."""
        held = [s for s in seqs if s in member.in_flight]
        state = self._states.get(member.id)
        if held and state is not None:
            member.in_flight.difference_update(held)
            member.silent_since = trio.current_time()
            member.checkpoint_due = True
            state.acked_max = max(state.acked_max, *held)
            member.due.fire()
            self._submit(state.taker.settle, held, _ACK)
        if len(held) < len(seqs):
            raise StaleAck(f"not held by this member: {[s for s in seqs if s not in held][:5]}")

    def evict_silent_members(self, timeout_s: float) -> list[Member]:
        """End every member that holds users and acknowledged none for `timeout_s` (its
        session closes it; leaving, it NAKs what it held)."""
        deadline = trio.current_time() - timeout_s
        silent = [
            m
            for g in self.by_name.values()
            for m in g.members.values()
            if m.ended is None and m.in_flight and m.silent_since <= deadline
        ]
        for member in silent:
            self.members_evicted += 1
            member.ended = AckTimeout(f"acknowledged nothing for {timeout_s:g} s")
            member.due.fire()
        return silent

    def forget_empty_groups(self, grace_s: float) -> list[str]:
        """Nothing: the server deletes an ad-hoc group's consumer (its inactive threshold)."""
        return []
