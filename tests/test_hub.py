"""The hub's sequencing, replay buffer, groups and acks: pure logic, no sockets."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from userstreamd.stream.groups import EMPTY_GROUPS_MAX
from userstreamd.stream.hub import (
    AckTimeout,
    GroupLagging,
    Hub,
    Member,
    Slow,
    StaleAck,
    Subscription,
)


def _publish(hub: Hub, n: int) -> None:
    for _ in range(n):
        hub.publish_nowait({"n": hub.last_seq + 1}, "synthetic", hub.last_seq + 1)


def _read(hub: Hub, sub: Subscription) -> list[dict[str, Any]]:
    frames = []
    while (frame := hub.next_frame_nowait(sub)) is not None:
        frames.append(json.loads(frame))
    return frames


def _take(hub: Hub, member: Member) -> list[int]:
    seqs = []
    while (frame := hub.next_member_frame_nowait(member)) is not None:
        message = json.loads(frame)
        if message["type"] == "user":
            seqs.append(message["seq"])
    return seqs


# -- plain clients -------------------------------------------------------------------------


def test_publish_numbers_users_and_every_client_reads_the_same_frames() -> None:
    hub = Hub("ep")
    a, b = hub.subscribe("a"), hub.subscribe("b")
    _publish(hub, 3)
    got_a, got_b = _read(hub, a), _read(hub, b)
    assert [m["seq"] for m in got_a] == [1, 2, 3] and got_a == got_b
    assert {m["epoch"] for m in got_a} == {"ep"}
    assert [m["position"] for m in got_a] == [1, 2, 3]


def test_resume_after_a_short_disconnect_replays_what_was_missed() -> None:
    hub = Hub("ep")
    _publish(hub, 5)
    sub = hub.subscribe("again", since=("ep", 2))
    assert sub.gap is None
    assert [m["seq"] for m in _read(hub, sub)] == [3, 4, 5]
    _publish(hub, 1)
    assert [m["seq"] for m in _read(hub, sub)] == [6]


def test_resume_past_the_buffer_reports_the_gap() -> None:
    hub = Hub("ep", buffer_messages=10)
    _publish(hub, 30)  # no group holds anything: the buffer keeps the last 10
    sub = hub.subscribe("late", since=("ep", 4))
    assert sub.gap is not None
    # It starts half the buffer behind (not at its oldest user, which the next publish
    # would evict, cutting it off at once).
    assert (sub.gap.from_seq, sub.gap.to_seq) == (5, 25)
    assert sub.gap.reason == "no longer in the replay buffer"
    assert [m["seq"] for m in _read(hub, sub)] == list(range(26, 31))


def test_a_resume_past_a_full_buffer_survives_the_publishes_that_follow() -> None:
    hub = Hub("ep", buffer_messages=1000)
    _publish(hub, 3000)
    sub = hub.subscribe("late", since=("ep", 1500))
    assert sub.gap is not None and (sub.gap.from_seq, sub.gap.to_seq) == (1501, 2500)
    _publish(hub, 400)  # evicts the 400 oldest: none of them is the client's
    assert [m["seq"] for m in _read(hub, sub)] == list(range(2501, 3401))
    assert not sub.slow


def test_a_resume_far_ahead_of_this_epoch_says_it_is_ahead() -> None:
    hub = Hub("ep")
    _publish(hub, 3)
    sub = hub.subscribe("future", since=("ep", 1_000_003))
    assert sub.gap is not None and (sub.gap.from_seq, sub.gap.to_seq) == (None, 3)
    assert "ahead of this stream" in sub.gap.reason and "is not this stream's" not in sub.gap.reason
    assert hub.subscribe("other", since=("old", 2)).gap.reason.startswith(  # type: ignore[union-attr]
        "epoch old is not this stream's history"
    )


def test_resume_from_another_epoch_is_a_gap_and_continues_live() -> None:
    hub = Hub("new")
    _publish(hub, 3)
    sub = hub.subscribe("old", since=("old-epoch", 7))
    assert sub.gap is not None and sub.gap.from_seq is None
    assert _read(hub, sub) == []


def test_a_lagging_client_is_cut_off_at_its_next_read_and_nobody_waits_for_it() -> None:
    hub = Hub("ep", client_lag_max=5)
    slow, fast = hub.subscribe("slow"), hub.subscribe("fast")
    for _ in range(8):
        _publish(hub, 1)
        _read(hub, fast)
    with pytest.raises(Slow):
        hub.next_frame_nowait(slow)
    assert slow.slow and not fast.slow and hub.slow_disconnects == 1


def test_a_lagging_client_that_never_reads_is_cut_off_within_64_publishes() -> None:
    """(A client whose write is stuck never reads: the scan every 64 publishes finds it,
    so that it is closed as slow once its write ends.)"""
    hub = Hub("ep", client_lag_max=5)
    stuck = hub.subscribe("stuck")
    _publish(hub, 63)
    assert not stuck.slow
    _publish(hub, 1)
    assert stuck.slow and hub.slow_disconnects == 1


# -- groups ----------------------------------------------------------------------------------


def test_each_user_goes_to_one_member_and_members_share_the_load() -> None:
    hub = Hub("ep", window=100)
    a, b = hub.join("db", "a"), hub.join("db", "b")
    other = hub.join("audit", "c")
    _publish(hub, 10)
    got_a, got_b = _take(hub, a), _take(hub, b)
    assert sorted(got_a + got_b) == list(range(1, 11))
    assert len(got_a) == len(got_b) == 5
    assert _take(hub, other) == list(range(1, 11))


def test_window_bounds_what_a_member_holds_and_acks_open_it_again() -> None:
    hub = Hub("ep")
    member = hub.join("db", "a", window=3)
    _publish(hub, 10)
    assert _take(hub, member) == [1, 2, 3]
    hub.ack(member, [1, 2])
    assert _take(hub, member) == [4, 5]
    assert hub.watermark("db") == (2, 2)


def test_unacked_users_of_a_member_that_leaves_are_redelivered() -> None:
    hub = Hub("ep", window=4)
    a, b = hub.join("db", "a"), hub.join("db", "b")
    _publish(hub, 8)
    got_a, got_b = _take(hub, a), _take(hub, b)
    hub.ack(a, got_a[:1])
    hub.leave(a)
    hub.ack(b, got_b)
    redelivered = _take(hub, b)
    assert redelivered == got_a[1:]
    hub.ack(b, redelivered)
    assert hub.watermark("db")[0] == 8


async def test_an_emptied_ad_hoc_group_keeps_what_it_held_for_the_grace_then_is_forgotten(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub("ep", window=100)
    member = hub.join("adhoc", "a")
    _publish(hub, 50)
    assert _take(hub, member) == list(range(1, 51))
    hub.leave(member)  # held 50, acknowledged none
    await trio.sleep(20)
    assert hub.forget_empty_groups(30) == []
    again = hub.join("adhoc", "a")
    assert _take(hub, again) == list(range(1, 51)), "50 of 50 redelivered within the grace"
    hub.leave(again)
    await trio.sleep(30)
    assert hub.forget_empty_groups(30) == ["adhoc"]
    assert not hub.has_group("adhoc") and hub.statistics().groups == ()
    late = hub.join("adhoc", "a")  # a new group, at the live end
    _publish(hub, 1)
    assert _take(hub, late) == [51]


def test_empty_ad_hoc_groups_kept_are_bounded_and_a_declared_group_is_never_forgotten() -> None:
    hub = Hub("ep")
    hub.declare_group("audit")
    hub.leave(hub.join("audit", "a"))
    for n in range(EMPTY_GROUPS_MAX + 10):
        hub.leave(hub.join(f"g{n}", "a"))
    names = [g.name for g in hub.statistics().groups]
    assert len(names) == EMPTY_GROUPS_MAX + 1 and "audit" in names
    assert "g0" not in names and f"g{EMPTY_GROUPS_MAX + 9}" in names, "the oldest go first"
    assert sorted(hub.forget_empty_groups(0)) == sorted(n for n in names if n != "audit")
    assert [g.name for g in hub.statistics().groups] == ["audit"]


def test_acks_for_seqs_not_held_are_stale() -> None:
    hub = Hub("ep")
    member = hub.join("db", "a")
    _publish(hub, 2)
    _take(hub, member)
    hub.ack(member, [1])
    with pytest.raises(StaleAck):
        hub.ack(member, [1, 2])
    assert hub.watermark("db")[0] == 2  # the held one still counted


def test_checkpoint_frame_follows_the_watermark() -> None:
    hub = Hub("ep")
    member = hub.join("db", "a")
    _publish(hub, 3)
    _take(hub, member)
    hub.ack(member, [2])
    assert hub.next_member_frame_nowait(member) is None  # 1 missing: no progress
    hub.ack(member, [1])
    checkpoint = json.loads(hub.next_member_frame_nowait(member) or "{}")
    assert checkpoint == {
        "type": "checkpoint",
        "group": "db",
        "epoch": "ep",
        "seq": 2,
        "position": 2,
    }


def test_a_full_buffer_of_unacked_users_holds_the_producer() -> None:
    hub = Hub("ep", buffer_messages=5)
    hub.declare_group("db", holds_producer=True)  # the daemon's own: even with no member
    _publish(hub, 5)
    assert not hub.has_room()
    member = hub.join("db", "late")
    hub.ack(member, _take(hub, member)[:2])
    assert hub.has_room()
    _publish(hub, 2)
    assert not hub.has_room()


def test_a_group_that_does_not_hold_the_producer_is_cut_off_instead_of_filling_the_buffer() -> None:
    hub = Hub("ep", buffer_messages=3)
    member = hub.join("tmp", "a")  # never acks
    _publish(hub, 10)
    assert hub.has_room() and hub.last_seq == 10
    assert isinstance(member.ended, GroupLagging)
    with pytest.raises(GroupLagging):
        hub.next_member_frame_nowait(member)
    assert not hub.has_group("tmp"), "an ad hoc group ends with its last member"
    assert hub.statistics().groups_cut_off == 1


def test_a_declared_group_too_far_behind_restarts_live_and_tells_the_next_member_the_gap() -> None:
    hub = Hub("ep", group_lag_max=5, window=100)
    hub.declare_group("audit")
    a = hub.join("audit", "a")
    _publish(hub, 3)
    assert _take(hub, a) == [1, 2, 3]
    hub.ack(a, [1])
    _publish(hub, 5)  # at seq 7 it is 6 behind its watermark (1): more than 5
    assert isinstance(a.ended, GroupLagging)
    b = hub.join("audit", "b")
    gap = json.loads(hub.next_member_frame_nowait(b) or "{}")
    assert (gap["type"], gap["from_seq"], gap["to_seq"]) == ("gap", 2, 7)
    _publish(hub, 2)
    assert _take(hub, b) == [8, 9, 10]
    assert hub.watermark("audit")[0] == 7


async def test_a_member_that_holds_users_and_never_acks_is_evicted_and_they_are_redelivered(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub("ep", window=100)
    hub.declare_group("db", holds_producer=True)
    mute, good = hub.join("db", "mute"), hub.join("db", "good")
    _publish(hub, 4)
    held, got = _take(hub, mute), _take(hub, good)
    assert held and got
    await trio.sleep(5)
    hub.ack(good, got)
    assert hub.evict_silent_members(10) == []  # 5 s silent: not yet
    await trio.sleep(6)
    assert hub.evict_silent_members(10) == [mute]
    with pytest.raises(AckTimeout):
        hub.next_member_frame_nowait(mute)
    assert _take(hub, good) == held
    hub.ack(good, held)
    assert hub.watermark("db")[0] == 4
    assert hub.statistics().members_evicted == 1
    assert hub.evict_silent_members(10) == [], "a member holding nothing is never silent"


def test_resume_from_further_back_than_the_lag_bound_skips_to_where_it_can_keep_up() -> None:
    hub = Hub("ep", client_lag_max=100)
    _publish(hub, 500)
    sub = hub.subscribe("far", since=("ep", 10))
    assert sub.gap is not None and (sub.gap.from_seq, sub.gap.to_seq) == (11, 450)
    assert [m["seq"] for m in _read(hub, sub)] == list(range(451, 501))
    assert not sub.slow


async def test_publish_waits_for_room_then_goes_on(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub("ep", buffer_messages=2)
    hub.declare_group("db", holds_producer=True)
    member = hub.join("db", "a")
    done: list[int] = []

    async def produce() -> None:
        for n in range(1, 5):
            await hub.publish({"n": n}, "s", n)
            done.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [1, 2]
        hub.ack(member, _take(hub, member))
        await trio.testing.wait_all_tasks_blocked()
        assert done == [1, 2, 3, 4]


async def test_wait_drained_waits_for_the_group_that_holds_the_producer_only(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub("ep")
    hub.declare_group("db", holds_producer=True)
    a, b = hub.join("db", "a"), hub.join("audit", "b")
    _publish(hub, 3)
    drained = trio.Event()

    async def waiter() -> None:
        await hub.wait_drained()
        drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()
        hub.ack(a, _take(hub, a))  # audit (b) has acked nothing: not waited for
        await trio.testing.wait_all_tasks_blocked()
        assert drained.is_set() and b.in_flight


# -- properties ------------------------------------------------------------------------------

Op = tuple[str, int]
ops = st.lists(
    st.tuples(st.sampled_from(["publish", "join", "leave", "ack", "take"]), st.integers(0, 7)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, window=st.integers(1, 4))
def test_every_seq_reaches_each_group_exactly_once_until_acked(ops: list[Op], window: int) -> None:
    """Whatever members come and go, each group ends up acknowledging every seq exactly
    once; a seq is redelivered only if its holder left before acking it; and the seqs each
    member receives for the first time arrive in increasing order."""
    hub = Hub("ep", window=window)
    groups = ["g1", "g2"]
    for g in groups:
        hub.declare_group(g)
    members: list[Member] = []
    taken: dict[int, list[int]] = {}
    acked: dict[str, list[int]] = {g: [] for g in groups}
    seen: dict[str, set[int]] = {g: set() for g in groups}
    lost: dict[str, set[int]] = {g: set() for g in groups}
    redelivered: dict[str, set[int]] = {g: set() for g in groups}

    def take(member: Member) -> None:
        for seq in _take(hub, member):
            group = member.group.name
            if seq in lost[group]:  # its holder left before acking: redelivery is due
                lost[group].discard(seq)
                redelivered[group].add(seq)
            else:
                assert seq not in seen[group], f"{seq} delivered twice to {group}"
                fresh = [s for s in taken[member.id] if s not in redelivered[group]]
                assert not fresh or seq > max(fresh), "fresh seqs arrive in order"
            seen[group].add(seq)
            taken[member.id].append(seq)

    for op, arg in ops:
        live = [m for m in members if m.id in m.group.members]
        if op == "publish":
            _publish(hub, arg + 1)
        elif op == "join":
            member = hub.join(groups[arg % 2], f"m{len(members)}")
            members.append(member)
            taken[member.id] = []
        elif op == "leave" and live:
            member = live[arg % len(live)]
            lost[member.group.name] |= set(member.in_flight)
            hub.leave(member)
        elif op == "take" and live:
            take(live[arg % len(live)])
        elif op == "ack" and live:
            member = live[arg % len(live)]
            sent = [s for s in taken[member.id] if s in member.in_flight]
            hub.ack(member, sent[: arg + 1])
            acked[member.group.name] += sent[: arg + 1]
    # Finally one fresh member per group takes and acks until nothing is left.
    for g in groups:
        member = hub.join(g, "closer", window=10_000)
        taken[member.id] = []
        take(member)
        sent = [s for s in taken[member.id] if s in member.in_flight]
        hub.ack(member, sent)
        acked[g] += sent
        for m in list(hub._groups[g].members.values()):  # the rest ack what they hold
            held = sorted(m.in_flight)
            hub.ack(m, held)
            acked[g] += held
    for g in groups:
        assert sorted(acked[g]) == list(range(1, hub.last_seq + 1)), g
        assert hub.watermark(g)[0] == hub.last_seq


# -- counts (what /metrics reports) ----------------------------------------------------------


def test_each_committed_seq_is_counted_once_by_source_whoever_acks_it() -> None:
    latencies: list[float] = []
    hub = Hub("ep", window=10, on_committed=latencies.append)
    hub.declare_group("db", watermark=0, holds_producer=True)
    a, b = hub.join("db", "a"), hub.join("db", "b")
    for p in range(1, 7):
        hub.publish_nowait({"n": p}, "synthetic" if p % 2 else "randomuser", p)
    held_by_a = _take(hub, a)
    hub.ack(a, held_by_a[:1])
    hub.leave(a)  # a dies before acknowledging the rest: they go to b
    hub.ack(b, _take(hub, b), rejected={6})
    with pytest.raises(StaleAck):
        hub.ack(b, [1, 2])  # again, after a reconnect: counted once only
    assert hub.published == {"synthetic": 3, "randomuser": 3}
    assert hub.committed == {"synthetic": 3, "randomuser": 2}
    assert hub.rejected == {"randomuser": 1}
    assert len(latencies) == 5 and all(0 <= s < 60 for s in latencies)


def test_acks_of_a_group_that_does_not_hold_the_producer_count_no_commit() -> None:
    hub = Hub("ep")
    hub.declare_group("audit")
    member = hub.join("audit", "m")
    _publish(hub, 3)
    hub.ack(member, _take(hub, member), rejected={1})
    assert hub.watermark("audit")[0] == 3
    assert not hub.committed and not hub.rejected


# -- wake-ups, coalescing, several frames at once -----------------------------------------


def test_next_frames_takes_what_is_due_in_order_up_to_the_limit() -> None:
    hub = Hub("e")
    sub = hub.subscribe("s")
    assert hub.next_frames_nowait(sub, 10) is None
    _publish(hub, 7)
    first = hub.next_frames_nowait(sub, 5) or []
    rest = hub.next_frames_nowait(sub, 5) or []
    assert [json.loads(f)["seq"] for f in first] == [1, 2, 3, 4, 5]
    assert [json.loads(f)["seq"] for f in rest] == [6, 7]
    assert hub.next_frames_nowait(sub, 5) is None


def test_a_member_takes_its_checkpoint_and_its_users_at_once() -> None:
    hub = Hub("e")
    hub.declare_group("db", watermark=0)
    member = hub.join("db", "m")
    _publish(hub, 3)
    due = hub.next_member_frames_nowait(member, 10)
    assert due is not None and due.control == []
    assert [json.loads(f)["seq"] for f in due.users] == [1, 2, 3]
    hub.ack(member, [1, 2])
    _publish(hub, 2)
    due = hub.next_member_frames_nowait(member, 10)
    assert due is not None
    assert [json.loads(f)["type"] for f in due.control] == ["checkpoint"]
    assert json.loads(due.control[0])["seq"] == 2
    assert [json.loads(f)["seq"] for f in due.users] == [4, 5]


async def _read_paced(
    hub: Hub, sub: Subscription, until: int, into: list[tuple[float, list[int]]]
) -> None:
    seq = 0
    while seq < until:
        frames = await hub.next_frames(sub, 1000)
        seqs = [json.loads(f)["seq"] for f in frames]
        into.append((trio.current_time(), seqs))
        seq = seqs[-1]


async def test_a_publish_wakes_a_waiting_reader_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub("e")
    sub = hub.subscribe("s")
    reads: list[tuple[float, list[int]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_paced, hub, sub, 3, reads)
        for _ in range(3):
            await trio.sleep(1)
            hub.publish_nowait({}, "synthetic", hub.last_seq + 1)
    assert reads == [(1.0, [1]), (2.0, [2]), (3.0, [3])]


class _Wakes(trio.abc.Instrument):
    """How often each named task was scheduled."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.count[task.name] += 1


async def test_acks_wake_neither_plain_clients_nor_other_groups() -> None:
    """Per-waiter wake-ups: 200 acks (and the checkpoints they bring) schedule no plain
    reader and no member of another group; a publish schedules each of them once."""
    hub = Hub("e")
    hub.declare_group("db", watermark=0, holds_producer=True)
    hub.declare_group("other", watermark=0)
    acker, idle = hub.join("db", "acker"), hub.join("other", "idle")
    sub = hub.subscribe("plain")
    _publish(hub, 200)
    wakes = _Wakes()

    async def drain_plain() -> None:
        while True:
            await hub.next_frames(sub, 1000)

    async def drain_member() -> None:
        while True:
            await hub.next_member_frames(idle, 1000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_plain, name="plain")
        nursery.start_soon(drain_member, name="other-member")
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(wakes)
        for seq in range(1, 201):
            hub.ack(acker, [seq])
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()
        assert wakes.count["plain"] == wakes.count["other-member"] == 0
        assert hub.watermark("db")[0] == 200
        hub.publish_nowait({}, "synthetic", 201)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(wakes)
        nursery.cancel_scope.cancel()
    assert wakes.count["plain"] == wakes.count["other-member"] == 1
