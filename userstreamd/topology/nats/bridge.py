"""nats-py under trio: its own asyncio loop in a dedicated thread.

nats-py is written for asyncio (its reader, writer, pings and reconnects are asyncio
tasks). The daemon stays a trio program: `AsyncioThread` runs one stock asyncio event
loop in a thread of its own, and `AsyncioThread.run` awaits a coroutine on it from trio.
The call crosses threads twice (`asyncio.run_coroutine_threadsafe`, then the trio token
to wake the caller), so callers cross once per *batch* (a page published, a batch
fetched, a batch acknowledged), never per user.

Why not trio-asyncio: it runs asyncio callbacks on the trio loop, one more layer under
a client whose reconnect logic leans on asyncio details (streams, ``wait_for``, SSL
transports); a plain loop in a thread is how nats-py is tested, and a stalled nats-py
cannot stall the trio loop.

A cancelled `run` cancels the asyncio task and returns at once (the task may still be
finishing on its loop: an abandoned fetch, say; nothing the caller waits for).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.loop = loop
        self.thread = thread

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the asyncio loop; its result, or its exception."""
        return await self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Submitted[T]:
        """Start ``fn(*args)`` on the asyncio loop now (calls start in the order they are
        submitted); await `Submitted.result` for its outcome."""
        return Submitted(asyncio.run_coroutine_threadsafe(_call(fn, args), self.loop))


class Submitted(Generic[T]):
    """A coroutine running on the asyncio loop, awaited from trio."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self.future = future
        self._done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._done.set)

        future.add_done_callback(wake)

    async def result(self) -> T:
        """Its result or exception; cancelled, it cancels the coroutine and returns."""
        try:
            await self._done.wait()
        except trio.Cancelled:
            self.future.cancel()
            raise
        return self.future.result()


async def _call(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    return await fn(*args)


@contextlib.asynccontextmanager
async def open_asyncio_thread(name: str = "nats") -> AsyncIterator[AsyncioThread]:
    """A thread running an asyncio loop until the block ends (tasks still on it are
    cancelled, then the loop closes)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_serve, args=(loop,), name=f"userstreamd-{name}", daemon=True)
    thread.start()
    try:
        yield AsyncioThread(loop, thread)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, 10.0)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
