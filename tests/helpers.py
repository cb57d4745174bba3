"""Helpers the tests share: waiting for a condition, database blockers (a lock, a
database made read-only), a daemon run in-process, reading a pseudo-terminal, a client
that resumes."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import psycopg
import trio

from userstreamd.config import load_config
from userstreamd.runtime.daemon import Daemon
from userstreamd.stream.client import open_ws
from userstreamd.stream.protocol import Gap, UserMessage, Users, Welcome, decode_server

from .conftest import daemon_tables, toml_text

T = TypeVar("T")


async def turns_while(work: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """`work()`'s result, and how many times another task got the loop meanwhile (a
    loop held by `work` gives it none)."""
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()  # let it start
        before = turns
        result = await work()
        during = turns - before
        nursery.cancel_scope.cancel()
    return result, during


@asynccontextmanager
async def table_locked(dsn: str, table: str) -> AsyncIterator[None]:
    """Another session holds ``ACCESS EXCLUSIVE`` on `table` (every other statement on it
    waits) until the block ends."""
    conn = await trio.to_thread.run_sync(psycopg.connect, dsn)
    try:
        await trio.to_thread.run_sync(conn.execute, f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)  # rolls back: the lock is released


def read_only(admin_dsn: str, dbname: str, on: bool, *, terminate: bool = True) -> None:
    """`dbname`'s new sessions read-only (or not again), its sessions ended: a failover to
    a hot standby, for this database alone (other tests share the server)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        value = "on" if on else "off"
        conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = {value}')
        if terminate:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )


async def eventually(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Return once `predicate()` holds (checked every 20 ms); fail after `timeout_s`.
    For state with no event to wait on (another process, a database)."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 (nothing to wait on but the condition)
            await trio.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """`eventually` for synchronous tests."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or predicate}")
        time.sleep(0.02)


def write_config(tmp_path: Path, dsn: str, **tables: dict[str, Any]) -> Path:
    """`tmp_path/config.toml`: the tests' daemon tables, with `tables` merged in."""
    merged = daemon_tables(tmp_path, dsn)
    for name, keys in tables.items():
        merged[name] = {**merged.get(name, {}), **keys}
    path = tmp_path / "config.toml"
    path.write_text(toml_text(merged))
    return path


def in_process_daemon(tmp_path: Path, dsn: str, **tables: dict[str, Any]) -> Daemon:
    return Daemon(load_config(write_config(tmp_path, dsn, **tables)))


async def run_until(daemon: Daemon, done: Callable[[], Awaitable[None]]) -> int:
    """Run `daemon` until `done()` returns (it is called once the daemon is ready); the
    daemon's exit code."""
    async with trio.open_nursery() as nursery:
        finished = trio.Event()
        codes: list[int] = []

        async def run() -> None:
            codes.append(await daemon.run(finished.wait))

        nursery.start_soon(run)
        with trio.fail_after(60):
            await daemon.ready.wait()
            await done()
        finished.set()
    return codes[0]


def drain(fd: int, into: bytearray, stop: threading.Event) -> None:
    """Read `fd` (a pseudo-terminal's master side) into `into` until every writer has
    closed it, or `stop` is set and it has been quiet for 0.1 s (a grandchild might still
    hold it). For a reader thread."""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            if stop.is_set():
                return
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer is gone
            return
        if not chunk:
            return
        into += chunk


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (each held
    until all are chosen, so no two are the same)."""
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


async def resumed(
    url: str,
    epoch: str,
    since: int,
    until_seq: int,
    *,
    batch: int = 1,
    then: Callable[[], Awaitable[None]] | None = None,
) -> list[UserMessage | Gap]:
    """What a client that resumes after (`epoch`, `since`) receives, user by user (a
    ``users`` frame's items each on their own), until a user of seq `until_seq` or more of
    the stream's live epoch: its users and gaps, in order. `then()` is awaited before it
    disconnects."""
    got: list[UserMessage | Gap] = []
    query = urlencode({"epoch": epoch, "since": since, "batch": batch})
    async with open_ws(f"{url}?{query}") as ws:
        welcome = decode_server(await ws.get_message())
        assert isinstance(welcome, Welcome)
        while True:
            message = decode_server(await ws.get_message())
            items = message.items if isinstance(message, Users) else [message]
            for item in items:
                assert isinstance(item, UserMessage | Gap), item
                got.append(item)
                if (
                    isinstance(item, UserMessage)
                    and item.epoch == welcome.epoch
                    and item.seq >= until_seq
                ):
                    if then is not None:
                        await then()
                    return got
