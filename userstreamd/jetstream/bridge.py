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
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.loop = loop
        self.thread = thread

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the asyncio loop; its result, or its exception."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(_call(fn, args), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()


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
