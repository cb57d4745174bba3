"""Supervision in-process, on the autojump clock: restart, isolation, ordered stop."""

from __future__ import annotations

import trio
import trio.testing

from userstreamd.supervisor import Supervisor


async def test_crash_restarts_only_that_component(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    ticks = 0

    async def flaky(task_status: trio.TaskStatus[str]) -> None:
        starts.append(trio.current_time())
        task_status.started("ready")
        await trio.sleep(1)
        raise RuntimeError("boom")

    async def steady(task_status: trio.TaskStatus[None]) -> None:
        nonlocal ticks
        task_status.started()
        while True:
            await trio.sleep(0.1)
            ticks += 1

    async with trio.open_nursery() as nursery:
        sup = Supervisor(nursery, restart_delay_s=0.5)
        assert await sup.start("flaky", flaky) == "ready"
        await sup.start("steady", steady)
        await trio.sleep(5)
        snapshot = {s.name: s for s in sup.snapshot()}
        await sup.stop_all()
    assert [round(t, 6) for t in starts[:4]] == [0.0, 1.5, 3.0, 4.5]
    assert snapshot["flaky"].restarts == 3
    assert snapshot["flaky"].last_exit == "RuntimeError: boom"
    assert snapshot["steady"].restarts == 0 and snapshot["steady"].state == "running"
    assert ticks >= 49


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
