"""Prepared synthetic pages, from a real child process: the same users as `synthetic_user`,
a loop that keeps running meanwhile, a child that dies or hangs, a parent that dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from userstreamd.errors import SourceUnavailable
from userstreamd.sources.synthetic import GENERATE_CHUNK, SyntheticSource, synthetic_user
from userstreamd.stream.records import scrub

from ..helpers import turns_while

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@asynccontextmanager
async def offloaded(
    seed: str, nats: Sequence[str] = (), exc: Sequence[str] = ()
) -> AsyncIterator[SyntheticSource]:
    """A source that prepares every page in its child process; released afterwards."""
    source = SyntheticSource(seed, nats, exc=exc, offload=True)
    try:
        yield source
    finally:
        await source.release()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_child_pages_are_the_users_synthetic_user_makes() -> None:
    async with offloaded("same", nats=["de", "IR", "us"]) as source:
        with trio.fail_after(30):
            for keep in (True, False, False):
                page = await source.fetch_prepared(101, 300, keep_credentials=keep, now=NOW)
                assert source.generator.pid is not None, "prepared in the child"
                assert page.rejected == {}
                for position, raw in enumerate(page.users, start=101):
                    user = synthetic_user("same", position, ["DE", "IR", "US"], now=NOW)
                    expected = user if keep else scrub(user)
                    assert bytes(raw) == msgspec.json.encode(expected)
                    assert msgspec.json.decode(raw) == expected


async def test_child_and_event_loop_prepare_the_same_bytes() -> None:
    in_loop = SyntheticSource("both", exc=["picture", "id"], offload=False)
    async with offloaded("both", exc=["picture", "id"]) as source:
        with trio.fail_after(30):
            child = await source.fetch_prepared(7, 500, keep_credentials=False, now=NOW)
            local = await in_loop.fetch_prepared(7, 500, keep_credentials=False, now=NOW)
    assert in_loop.generator.pid is None
    assert [bytes(u) for u in child.users] == [bytes(u) for u in local.users]
    assert all(b'"picture"' not in bytes(u) for u in child.users)


async def test_big_pages_and_pages_asked_for_fast_go_to_the_child(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0  # (real time, plus the jumps below: 21 s of fail_after's 60)
    source = SyntheticSource("auto")
    try:
        with trio.fail_after(60):
            await source.fetch_prepared(1, 999, keep_credentials=False)
            mock_clock.jump(10)
            await source.fetch_prepared(1000, 999, keep_credentials=False)  # ~100 users/s
            mock_clock.jump(1)
            await source.fetch_prepared(1999, 100, keep_credentials=False)  # ~100 users/s
            await source.fetch_prepared(2099, 100, keep_credentials=False)  # at once, once
            assert source.generator.pid is None, "a slow stream stays in the event loop"
            await source.fetch_prepared(2199, 100, keep_credentials=False)  # at once again
            assert source.generator.pid is not None, "a fast one goes to the child"
            await source.release()
            mock_clock.jump(10)  # (a slow stream, but a page of 1000)
            await source.fetch_prepared(2299, 1000, keep_credentials=False)  # a big page
            assert source.generator.pid is not None
    finally:
        await source.release()


async def test_the_loop_keeps_running_while_the_child_prepares_a_big_page() -> None:
    async with offloaded("busy") as source:
        with trio.fail_after(60):
            page, during = await turns_while(
                partial(source.fetch_prepared, 1, 5000, keep_credentials=False)
            )
    assert len(page.users) == 5000
    # In the event loop, a page gives other tasks one turn per chunk (5000 / 128 = 40).
    assert during > 25 * (5000 // GENERATE_CHUNK), f"the other task ran {during} times"


async def test_a_child_killed_mid_page_fails_that_page_and_the_next_starts_a_new_one() -> None:
    async with offloaded("kill") as source:
        with trio.fail_after(60):
            await source.fetch_prepared(1, 10, keep_credentials=False)
            first = source.generator.pid
            assert first is not None
            failure: list[SourceUnavailable] = []

            async def fetch_big_page() -> None:
                with pytest.raises(SourceUnavailable) as caught:
                    await source.fetch_prepared(11, 5000, keep_credentials=False)
                failure.append(caught.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_big_page)
                await trio.testing.wait_all_tasks_blocked()  # it waits for the child's page
                os.kill(first, signal.SIGKILL)
            assert failure[0].kind == "generator_died"
            assert "killed by SIGKILL" in str(failure[0])
            assert source.generator.pid is None
            page = await source.fetch_prepared(11, 5000, keep_credentials=False, now=NOW)
            assert source.generator.pid not in (None, first), "a new child"
    assert _gone(first)
    uuids = [msgspec.json.decode(u)["login"]["uuid"] for u in page.users[::499]]
    assert uuids == [synthetic_user("kill", p)["login"]["uuid"] for p in range(11, 5011, 499)]


async def test_a_child_that_hangs_is_killed_and_replaced() -> None:
    async with offloaded("hang") as source:
        source.generator.page_timeout_s = 2.0
        with trio.fail_after(60):
            await source.fetch_prepared(1, 10, keep_credentials=False)
            stopped = source.generator.pid
            assert stopped is not None
            os.kill(stopped, signal.SIGSTOP)
            with pytest.raises(SourceUnavailable) as caught:  # (not the page read ahead)
                await source.fetch_prepared(1001, 10, keep_credentials=False)
            assert caught.value.kind == "timeout"
            page = await source.fetch_prepared(1001, 10, keep_credentials=False)
            assert len(page.users) == 10 and source.generator.pid != stopped
    assert _gone(stopped)


async def test_release_stops_the_child_and_a_later_page_starts_another() -> None:
    source = SyntheticSource("release", offload=True)
    with trio.fail_after(30):
        await source.fetch_prepared(1, 1000, keep_credentials=False)  # (one read ahead)
        first = source.generator.pid
        assert first is not None
        await source.release()
        assert source.generator.pid is None and _gone(first)
        try:
            await source.fetch_prepared(1001, 10, keep_credentials=False)
            assert source.generator.pid not in (None, first)
        finally:
            await source.release()


_PARENT = textwrap.dedent(
    """
    import sys, trio
    from userstreamd.sources.synthetic import SyntheticSource

    async def main():
        source = SyntheticSource("orphan", offload=True)
        await source.fetch_prepared(1, 10, keep_credentials=False)
        print("child", source.generator.pid, flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_the_child_does_not_outlive_a_parent_killed_by_sigkill() -> None:
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        with trio.fail_after(30):
            said = b""
            while not (found := re.search(rb"^child (\d+)\n", said, re.MULTILINE)):
                chunk = await parent.stdout.receive_some()
                assert chunk, said
                said += chunk
            child = int(found[1])
            assert not _gone(child)
            parent.kill()
            while not _gone(child):  # noqa: ASYNC110 (bounded by fail_after)
                await trio.sleep(0.05)
    finally:
        parent.kill()
        with trio.CancelScope(shield=True):
            await parent.wait()
            if parent.stdout is not None:
                await parent.stdout.aclose()
