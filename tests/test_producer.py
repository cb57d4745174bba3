"""Pacing, retries and fallback of the producer, on trio's autojump clock; prepared pages.

The sources here are in-memory fakes (the clock can only jump when no real I/O is
pending), or synthetic with pages too small for its child process; the real HTTP paths
are in sources/test_randomuser.py and test_e2e.py, the child process (real, on the real
clock) in sources/test_pagegen.py and here where it is killed under a flowing stream.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
from typing import Any, ClassVar

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from userstreamd.errors import BadResponse, SourceUnavailable
from userstreamd.produce import producer as producer_module
from userstreamd.produce.producer import Producer, page_size_for
from userstreamd.sources import synthetic as synthetic_module
from userstreamd.sources.synthetic import SyntheticSource, synthetic_user
from userstreamd.stream.hub import Hub
from userstreamd.stream.records import scrub

from .helpers import eventually


class ScriptedSource:
    """Fails as scripted (one entry per call: an exception, or None to succeed)."""

    name = "randomuser"

    def __init__(self, script: list[BaseException | None], *, ready_at: float = 0.0) -> None:
        self.script = script
        self.calls: list[float] = []
        self.ready_at = ready_at  # like a spent budget: a request waits until then

    async def ready_in_s(self) -> float:
        return max(0.0, self.ready_at - trio.current_time())

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        await trio.sleep(await self.ready_in_s())  # as RandomUserSource waits for its budget
        self.calls.append(trio.current_time())
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return [synthetic_user("scripted", p) for p in range(start, start + count)]


class BusySource:
    """The same few users over and over, built in 10 chunks that each take the loop for
    `chunk_s` (the clock jumps: a CPU-bound generator yielding between chunks)."""

    name = "synthetic"
    users: ClassVar = [synthetic_user("repeat", p) for p in range(1, 11)]

    def __init__(self, clock: trio.testing.MockClock, chunk_s: float) -> None:
        self.clock, self.chunk_s = clock, chunk_s

    async def ready_in_s(self) -> float:
        return 0.0

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        for _ in range(10):
            self.clock.jump(self.chunk_s)
            await trio.lowlevel.checkpoint()
        return [self.users[p % 10] for p in range(start, start + count)]


async def _collect(hub: Hub, into: list[tuple[float, dict[str, Any]]]) -> None:
    sub = hub.subscribe("test")
    while True:
        frame = await hub.next_frame(sub)
        into.append((trio.current_time(), json.loads(frame)))


async def _run_for(producer: Producer, seconds: float) -> list[tuple[float, dict[str, Any]]]:
    got: list[tuple[float, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, producer.hub, got)
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(producer.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return got


def test_page_size_is_five_seconds_of_users_within_the_api_range() -> None:
    assert page_size_for(1) == 5
    assert page_size_for(0.1) == 1
    assert page_size_for(50) == 250
    assert page_size_for(10_000) == 5000


async def test_users_are_paced_evenly_not_in_bursts(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub("e")
    producer = Producer(hub, SyntheticSource("pace"), rate_per_s=10, page_size=50)
    got = await _run_for(producer, 10.05)
    assert len(got) == 100
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    assert all(abs(gap - 0.1) < 1e-6 for gap in gaps), gaps[:5]
    assert [m["seq"] for _, m in got] == list(range(1, 101))
    assert {m["source"] for _, m in got} == {"synthetic"}
    # Stream position p is the source's user p: replayable.
    assert [m["user"]["login"]["uuid"] for _, m in got[:3]] == [
        synthetic_user("pace", p)["login"]["uuid"] for p in (1, 2, 3)
    ]


async def test_rate_change_takes_effect_at_once(autojump_clock: trio.abc.Clock) -> None:
    hub = Hub("e")
    producer = Producer(hub, SyntheticSource("rate"), rate_per_s=2, page_size=100)
    got: list[tuple[float, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, hub, got)
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(producer.run)
        await trio.sleep(5.01)
        producer.set_rate(20)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    before = [t for t, _ in got if t <= 5.01]
    after = [t for t, _ in got if t > 5.01]
    assert len(before) == 10
    assert 95 <= len(after) <= 101


async def test_credentials_dropped_unless_kept(autojump_clock: trio.abc.Clock) -> None:
    for keep, expected in [(False, {"uuid", "username"}), (True, None)]:
        hub = Hub("e")
        producer = Producer(
            hub, SyntheticSource("c"), rate_per_s=10, page_size=5, keep_credentials=keep
        )
        got = await _run_for(producer, 0.5)
        login = got[0][1]["user"]["login"]
        assert set(login) == expected if expected else "password" in login


async def test_retry_delays_grow_and_retry_after_is_honoured(
    autojump_clock: trio.abc.Clock,
) -> None:
    source = ScriptedSource(
        [
            SourceUnavailable("HTTP 503"),
            SourceUnavailable("HTTP 502"),
            SourceUnavailable("timeout"),
            SourceUnavailable("HTTP 504"),
            SourceUnavailable("HTTP 429", retry_after_s=7.0),
            None,
        ]
    )
    producer = Producer(Hub("e"), source, rate_per_s=1, page_size=5, retry_max_s=30)
    got = await _run_for(producer, 12)
    gaps = [b - a for a, b in zip(source.calls, source.calls[1:], strict=False)]
    # 0.1, 0.2, 0.4, 0.8 with jitter in [50%, 100%], then Retry-After exactly.
    for gap, base in zip(gaps[:4], [0.1, 0.2, 0.4, 0.8], strict=True):
        assert base * 0.5 <= gap <= base + 1e-9
    assert abs(gaps[4] - 7.0) < 1e-9
    assert producer.fetch_failures == 5
    assert got, "the stream resumed after the failures"
    assert got[0][0] >= source.calls[5]


def _with_fallback(primary: ScriptedSource) -> Producer:
    """10 users/s in pages of 10; the circuit opens after 3 failures, probes every 5 s."""
    return Producer(
        Hub("e"),
        primary,
        rate_per_s=10,
        page_size=10,
        fallback=SyntheticSource("fb"),
        failures_before_fallback=3,
        probe_interval_s=5,
    )


async def test_fallback_takes_over_then_hands_back(autojump_clock: trio.abc.Clock) -> None:
    failures: list[BaseException | None] = [BadResponse("no users in results")] * 3
    primary = ScriptedSource([*failures, SourceUnavailable("HTTP 503"), None])
    producer = _with_fallback(primary)
    got = await _run_for(producer, 14)
    sources = [m["source"] for _, m in got]
    first_synthetic = sources.index("synthetic")
    assert got[first_synthetic][0] < 1.0, "fallback users flow within a second"
    # Probe at ~5 s fails (503), probe at ~10 s succeeds: the API is used again, once the
    # page already fetched from the fallback (one page ahead, 1 s here) has been sent.
    probes = primary.calls[3:]
    assert len(probes) >= 2 and 4.5 < probes[0] < 7 and 9.5 < probes[1] < 12.5
    assert sources[-1] == "randomuser"
    back = len(sources) - sources[::-1].index("synthetic")
    assert probes[1] < got[back][0] < probes[1] + 2.5
    assert not producer.statistics().fallback_active
    seqs = [m["seq"] for _, m in got]
    assert seqs == list(range(1, len(seqs) + 1)), "no gap in the stream across switches"


async def test_no_fallback_means_retrying_without_inventing_users(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([BadResponse("no users in results")] * 50)
    producer = Producer(Hub("e"), primary, rate_per_s=10, page_size=10)
    got = await _run_for(producer, 20)
    assert got == []
    assert producer.fetch_failures == len(primary.calls) >= 5


async def test_a_restarted_producer_resumes_at_the_first_unpublished_position(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub("e")
    producer = Producer(hub, SyntheticSource("restart"), rate_per_s=10, page_size=50)
    first = await _run_for(producer, 2.05)  # 20 published, a page of 50 fetched ahead
    assert producer.position > producer.next_position == 21
    second = await _run_for(producer, 1.05)
    positions = [m["position"] for _, m in first + second]
    assert positions == list(range(1, 31)), "no position skipped, none repeated"


async def test_the_rate_is_kept_when_the_loop_is_held_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The loop blocked for 0.15 s once a second (a busy CPU), and for 50 ms at a time while
    the next page is built: the users that fell due meanwhile are caught up, so a minute
    still delivers the configured rate."""
    hub = Hub("e", buffer_messages=1000)
    source = BusySource(autojump_clock, chunk_s=0.05)
    producer = Producer(hub, source, rate_per_s=1000, page_size=1000)

    async def hog() -> None:
        while True:
            await trio.sleep(1)
            autojump_clock.jump(0.15)  # time passes and nobody else runs

    with capture_logs():  # (60,000 lines not rendered)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await nursery.start(producer.run)
            await trio.sleep(60)
            nursery.cancel_scope.cancel()
    assert 59_400 <= producer.published <= 60_001


async def test_waiting_for_room_in_the_hub_is_not_owed(autojump_clock: trio.abc.Clock) -> None:
    """The hub is full from ~5 s to 10 s (a group not acknowledging): afterwards the
    producer goes on at its rate, without a burst for the time it was held back."""
    hub = Hub("e", buffer_messages=50)
    hub.declare_group("db", watermark=0, holds_producer=True)
    member = hub.join("db", "consumer", window=1000)
    producer = Producer(hub, SyntheticSource("full"), rate_per_s=10, page_size=100)

    async def acknowledge_from_10_s() -> None:
        await trio.sleep(10)
        while True:
            hub.ack(member, sorted(member.in_flight))
            await trio.sleep(0.05)

    got: list[tuple[float, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, hub, got)
        nursery.start_soon(acknowledge_from_10_s)
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(producer.run)
        await trio.sleep(15.01)
        nursery.cancel_scope.cancel()
    assert producer.backpressure_waits >= 1
    times = [t for t, _ in got]
    assert len([t for t in times if t <= 10]) == 51  # 50 buffered, the 51st at 10 s
    after = [t for t in times if t > 10]
    assert 49 <= len(after) <= 51, "10/s after the stall, no catching up on it"
    assert all(b - a > 0.05 for a, b in itertools.pairwise(after))


async def test_a_probe_never_waits_for_the_budget_while_the_fallback_serves(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([BadResponse("no users in results")] * 3)
    producer = _with_fallback(primary)
    got: list[tuple[float, dict[str, Any]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, producer.hub, got)
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(producer.run)
        await trio.sleep(1)
        assert producer.fallback_active
        primary.ready_at = 100.0  # its budget is spent until then
        await trio.sleep(109)
        nursery.cancel_scope.cancel()
    synthetic = [t for t, m in got if m["source"] == "synthetic"]
    assert len([t for t in synthetic if 10 <= t < 90]) >= 795, "the fallback never stopped"
    probe = primary.calls[3]
    assert probe >= 100.0, "no probe before the budget had room"
    assert got[-1][1]["source"] == "randomuser"


async def test_a_killed_generator_is_replaced_without_a_gap_or_a_repeat() -> None:
    """The child that prepares the pages is SIGKILLed twice while the stream flows: each
    time the page it owed is fetched again from a new child, from the same position."""
    hub = Hub("e")
    source = SyntheticSource("sigkill", offload=True)
    producer = Producer(hub, source, rate_per_s=20_000, page_size=500, stop_at_position=6000)
    got: list[tuple[float, dict[str, Any]]] = []
    killed: list[int] = []

    async def kill_the_generator_at(published: int) -> None:
        await eventually(lambda: producer.published >= published)
        pid = source.generator.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with trio.fail_after(60), capture_logs():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, hub, got)
            await nursery.start(producer.run)
            await kill_the_generator_at(1000)
            await kill_the_generator_at(3000)
            await eventually(lambda: len(got) == 6000)
            nursery.cancel_scope.cancel()
    assert source.generator.pid is None, "released when the producer stopped"
    assert producer.failures_by_kind["generator_died"] == 2
    assert len(set(killed)) == 2
    assert [m["position"] for _, m in got] == list(range(1, 6001))
    assert [m["seq"] for _, m in got] == list(range(1, 6001))
    assert [m["user"]["login"]["uuid"] for _, m in got[::250]] == [
        synthetic_user("sigkill", p)["login"]["uuid"] for p in range(1, 6001, 250)
    ]


async def test_prepared_users_are_not_validated_again(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    validated: list[Any] = []
    monkeypatch.setattr(producer_module, "parse_user", validated.append)
    producer = Producer(Hub("e"), SyntheticSource("once"), rate_per_s=100, page_size=50)
    got = await _run_for(producer, 1.005)
    assert len(got) == 100 and validated == []
    first = got[0][1]["user"]
    assert first == scrub(synthetic_user("once", 1)) | {
        "dob": first["dob"],  # (ages: against the time of the run)
        "registered": first["registered"],
    }


async def test_an_invalid_prepared_user_is_counted_and_logged_never_published(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_user = synthetic_module._make_user

    def broken_third(seed: str, position: int, *args: Any) -> dict[str, Any]:
        user = make_user(seed, position, *args)
        if position == 3:
            user["location"]["coordinates"]["latitude"] = "123.0"
        return user

    monkeypatch.setattr(synthetic_module, "_make_user", broken_third)
    producer = Producer(Hub("e"), SyntheticSource("bad"), rate_per_s=10, page_size=10)
    with capture_logs() as logs:
        got = await _run_for(producer, 0.55)
    assert [m["position"] for _, m in got] == [1, 2, 4, 5]
    assert producer.invalid == 1 and producer.invalid_by_source == {"synthetic": 1}
    (invalid,) = [e for e in logs if e["event"] == "producer.invalid_record"]
    assert invalid["position"] == 3 and "latitude" in invalid["error"]


async def test_each_user_is_logged_at_info_below_the_threshold_and_not_at_all_when_off(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with capture_logs() as logs:
        await _run_for(Producer(Hub("e"), SyntheticSource("log"), rate_per_s=2, page_size=10), 1.55)
    lines = [e for e in logs if e["event"] == "producer.published"]
    assert [e["log_level"] for e in lines] == ["info"] * 3
    user = synthetic_user("log", 2)
    assert lines[1] == {
        "event": "producer.published",
        "log_level": "info",
        "seq": 2,
        "uuid": user["login"]["uuid"],
        "source": "synthetic",
        "name": f"{user['name']['first']} {user['name']['last']}",
        "country": user["location"]["country"],
        "clients": 1,  # (the test's own subscription)
    }
    # Above the threshold the lines are at debug: with debug off, nothing is decoded for them.
    decoded: list[Any] = []
    monkeypatch.setattr(producer_module, "_decode_user", decoded.append)
    previous = structlog.get_config()
    try:
        with capture_logs() as logs:
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
            producer = Producer(Hub("e"), SyntheticSource("off"), rate_per_s=100, page_size=50)
            await _run_for(producer, 1.005)
    finally:
        structlog.configure(**previous)
    assert producer.published == 100
    assert decoded == [] and not [e for e in logs if e["event"] == "producer.published"]


async def test_a_new_rate_gets_pages_of_its_size_unless_the_size_is_fixed() -> None:
    """A reload from 1 to 1,000 users/s must not keep fetching 5-user pages (200 a
    second, which capped the stream below the rate); a fixed page size (the API's, which
    maps positions to pages) stays."""
    auto = Producer(
        Hub("e"),
        SyntheticSource("s"),
        rate_per_s=1,
        page_size=page_size_for(1),
        page_size_for_rate=page_size_for,
    )
    fixed = Producer(Hub("e"), SyntheticSource("s"), rate_per_s=1, page_size=100)
    for producer in (auto, fixed):
        producer.set_rate(1000)
    assert (auto.page_size, fixed.page_size) == (5000, 100)
