"""nats-py's asyncio loop in its own thread, awaited from trio (`topology.nats.bridge`)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from userstreamd.topology.nats.bridge import open_asyncio_thread


async def test_a_coroutine_runs_on_the_loop_thread_and_returns_its_value() -> None:
    async def where(x: int) -> tuple[str, int]:
        await asyncio.sleep(0)
        return threading.current_thread().name, x * 2

    async with open_asyncio_thread("test") as thread:
        name, doubled = await thread.run(where, 21)
    assert (name, doubled) == ("userstreamd-test", 42)
    assert not thread.thread.is_alive()  # (stopped with the block)


async def test_an_exception_on_the_loop_is_raised_in_trio() -> None:
    async def fail() -> None:
        raise KeyError("nope")

    async with open_asyncio_thread() as thread:
        with pytest.raises(KeyError, match="nope"):
            await thread.run(fail)


async def test_cancelling_in_trio_cancels_the_asyncio_task_and_returns_at_once() -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with open_asyncio_thread() as thread:
        with trio.move_on_after(0.2) as scope:
            await thread.run(forever)
        assert scope.cancelled_caught and started.is_set()
        await trio.to_thread.run_sync(cancelled.wait, 5)
        assert cancelled.is_set()
        # The loop is still fine afterwards.
        assert await thread.run(asyncio.sleep, 0, "ok") == "ok"


async def test_tasks_left_on_the_loop_are_cancelled_when_the_block_ends() -> None:
    cancelled = threading.Event()

    async def lingering() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def spawn() -> None:
        asyncio.get_running_loop().create_task(lingering())
        await asyncio.sleep(0)

    async with open_asyncio_thread() as thread:
        await thread.run(spawn)
    assert cancelled.is_set()
