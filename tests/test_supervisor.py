"""Supervision in-process, on the autojump clock: policies, backoff, intensity, order."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from userstreamd.runtime.supervisor import Intensity, RestartPolicy, Supervisor


def _crasher(starts: list[float], uptime_s: float = 0.0):  # type: ignore[no-untyped-def]
    async def run(task_status: trio.TaskStatus[str]) -> None:
        starts.append(trio.current_time())
        task_status.started("ready")
        await trio.sleep(uptime_s)
        raise RuntimeError("boom")

    return run


async def test_crash_restarts_only_that_component_with_growing_delays(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []
    ticks = 0

    async def steady(task_status: trio.TaskStatus[None]) -> None:
        nonlocal ticks
        task_status.started()
        while True:
            await trio.sleep(0.1)
            ticks += 1

    policy = RestartPolicy(delay_min_s=0.1, delay_max_s=1.0, reset_after_s=100)
    async with trio.open_nursery() as nursery:
        sup = Supervisor(nursery, policy=policy, intensity=Intensity(100, 60))
        assert await sup.start("flaky", _crasher(starts)) == "ready"
        await sup.start("steady", steady)
        await trio.sleep(8)
        snapshot = {s.name: s for s in sup.snapshot()}
        await sup.stop_all()
    delays = [b - a for a, b in itertools.pairwise(starts)]
    # 0.1, 0.2, 0.4, 0.8, then capped at 1.0; each jittered into [d/2, d].
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0], strict=False):
        assert base / 2 - 1e-9 <= delay <= base + 1e-9, delays
    assert delays[:4] == sorted(delays[:4])
    assert len(starts) - 1 <= snapshot["flaky"].restarts <= len(starts)
    assert len(starts) >= 8
    assert snapshot["flaky"].last_exit == "RuntimeError: boom"
    assert snapshot["steady"].restarts == 0 and snapshot["steady"].state == "running"
    assert ticks >= 79


async def test_delay_resets_after_the_component_stayed_up(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    policy = RestartPolicy(delay_min_s=0.1, delay_max_s=10, reset_after_s=2)
    async with trio.open_nursery() as nursery:
        sup = Supervisor(nursery, policy=policy, intensity=Intensity(100, 60))
        await sup.start("slow-crasher", _crasher(starts, uptime_s=3))
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    delays = [b - a - 3 for a, b in itertools.pairwise(starts)]
    assert all(0.05 - 1e-9 <= d <= 0.1 + 1e-9 for d in delays), delays


async def test_intensity_limit_escalates_naming_the_component(
    autojump_clock: trio.abc.Clock,
) -> None:
    reasons: list[str] = []
    starts: list[float] = []
    async with trio.open_nursery() as nursery:
        sup = Supervisor(
            nursery,
            policy=RestartPolicy(delay_min_s=0.1, delay_max_s=0.4),
            intensity=Intensity(3, 10),
            on_escalate=reasons.append,
        )
        await sup.start("crashy", _crasher(starts))
        await trio.sleep(30)
        state = sup.snapshot()[0]
        assert sup.failure is not None
        await sup.stop_all()
    assert len(starts) == 4  # the first start and 3 restarts; the 4th is refused
    assert state.state == "failed"
    assert reasons == ["crashy: more than 3 restarts in 10 s; last exit: RuntimeError: boom"]


@pytest.mark.parametrize(("restart", "expected_starts"), [("transient", 1), ("permanent", 3)])
# (delays are jittered into [0.5, 1] s: 2.5 s hold at least 3 starts of a permanent one)
async def test_transient_is_not_restarted_after_a_normal_exit(
    autojump_clock: trio.abc.Clock, restart: str, expected_starts: int
) -> None:
    starts: list[float] = []

    async def one_shot(task_status: trio.TaskStatus[None]) -> None:
        starts.append(trio.current_time())
        task_status.started()

    async with trio.open_nursery() as nursery:
        sup = Supervisor(
            nursery,
            policy=RestartPolicy(restart, delay_min_s=1, delay_max_s=1),  # type: ignore[arg-type]
            intensity=Intensity(100, 60),
        )
        await sup.start("job", one_shot)
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    assert len(starts) == 1 if restart == "transient" else len(starts) >= expected_starts


async def test_transient_is_restarted_after_a_crash(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    async with trio.open_nursery() as nursery:
        sup = Supervisor(
            nursery,
            policy=RestartPolicy("transient", delay_min_s=1, delay_max_s=1),
            intensity=Intensity(100, 60),
        )
        await sup.start("job", _crasher(starts))
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    assert len(starts) >= 3


async def test_stop_all_runs_in_reverse_start_order(autojump_clock: trio.abc.Clock) -> None:
    stopped: list[str] = []

    def component(name: str):  # type: ignore[no-untyped-def]
        async def run(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                stopped.append(name)

        return run

    async with trio.open_nursery() as nursery:
        sup = Supervisor(nursery)
        for name in ["database", "broadcaster", "consumer", "producer"]:
            await sup.start(name, component(name))
        await sup.stop("producer")
        assert stopped == ["producer"]
        await sup.stop_all()
    assert stopped == ["producer", "consumer", "broadcaster", "database"]
    assert {s.state for s in sup.snapshot()} == {"stopped"}


async def test_stop_is_bounded_by_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    async def stubborn(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(100)

    async with trio.open_nursery() as nursery:
        sup = Supervisor(nursery, stop_timeout_s=3)
        await sup.start("stubborn", stubborn)
        before = trio.current_time()
        await sup.stop("stubborn")
        assert trio.current_time() - before == 3
        nursery.cancel_scope.cancel()


async def test_a_port_held_at_start_escalates_at_once_without_a_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    """InUseError (here inside the component's own nursery's group, as a real bind
    failure arrives) is a configuration fault: failed at once, one escalation naming it,
    no crash log, no restart (issue 22 item 10)."""
    from structlog.testing import capture_logs

    from userstreamd.errors import InUseError

    starts = 0

    async def held(task_status: trio.TaskStatus[None]) -> None:
        nonlocal starts
        starts += 1
        async with trio.open_nursery():
            raise InUseError("cannot listen on 127.0.0.1:8765 (broadcaster.port): in use")

    reasons: list[str] = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(nursery, intensity=Intensity(5, 60), on_escalate=reasons.append)

            async def start() -> None:
                await sup.start("broadcaster", held)

            nursery.start_soon(start)
            await trio.sleep(60)
            [state] = sup.snapshot()
            nursery.cancel_scope.cancel()
    assert starts == 1
    assert (state.state, state.restarts) == ("failed", 0)
    assert reasons == ["broadcaster: cannot listen on 127.0.0.1:8765 (broadcaster.port): in use"]
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == []
