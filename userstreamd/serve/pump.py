"""One writer for every plain client of a broadcaster (one per event loop).

`Pump.run` waits for the hub's next frames, then makes one pass over its clients: to
each, everything due (up to FRAMES_PER_WRITE users) in one non-blocking write(2) of
frames built once per user per pass (`wsframes`). No task is woken per client per user.
Only a client whose socket could not take it all (full, or busy with a pong or a close
frame, or TLS) is set aside: a task of its own finishes that write within
``write_timeout_s``, then hands it back to the pump (so a client costs a task only
while its socket is full).

**Coalescing costs nothing when idle.** A publish to an idle pump goes out in the pass
it wakes. With ``coalesce_ms`` > 0 the next pass comes no sooner than that after the
last one, so under load each pass writes several users per client in one call, and a
lone user is never held back.

A client the pump must let go (cut off as slow, a write timed out, the connection
broke, the stream ended and it has everything) is ended through its `Peer`: its session
closes it as the broadcaster's close codes say.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..stream.hub import Hub, Slow, Subscription
from .keepalive import Peer
from .wsframes import WriteTimeout, abort, frames, write_nowait, write_rest

FRAMES_PER_WRITE = 256  # at most, to one client in one write (about 256 KiB of users)


class Plain(Peer):
    """A plain client: its cursor, how it wants its users, whether a task of its own is
    writing to it."""

    __slots__ = ("batch", "busy", "sub")

    def __init__(self, ws: WebSocketConnection, sub: Subscription, batch: int) -> None:
        super().__init__(ws)
        self.sub, self.batch, self.busy = sub, batch, False


class Pump:
    def __init__(
        self,
        hub: Hub,
        write_timeout_s: float,
        coalesce_s: float,
        in_frames: Callable[[list[bytes], int], list[bytes]],
        sent: Counter[str],
    ) -> None:
        """`in_frames(users, batch)`: the payloads a client that asked for `batch` gets
        for `users`; `sent["plain"]` counts the users written."""
        self.hub = hub
        self.write_timeout_s, self.coalesce_s = write_timeout_s, coalesce_s
        self.in_frames = in_frames
        self.sent = sent
        self.clients: dict[int, Plain] = {}  # by subscription id
        self.set_aside = 0  # clients handed a task of their own, since the start
        self._nursery: trio.Nursery | None = None
        # this pass: (first seq, last seq, batch) -> the bytes of that write, its payloads
        self._built: dict[tuple[int, int, int], tuple[bytes, list[bytes]]] = {}

    def add(self, client: Plain) -> None:
        """Write to `client` from its cursor on (at once: it may have frames due)."""
        self.clients[client.sub.id] = client
        self.hub.nudge()

    def remove(self, client: Plain) -> None:
        self.clients.pop(client.sub.id, None)

    async def run(self) -> None:
        hub = self.hub
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                mark = hub.mark()
                behind = self._pass()
                if self.coalesce_s:
                    await trio.sleep(self.coalesce_s)
                elif behind:  # (a client with more due than one write: after the others)
                    await trio.lowlevel.checkpoint()
                if not behind:  # (at once if anything came since the pass began)
                    await hub.wait_published(mark)

    def _pass(self) -> bool:
        """One write to each client with frames due; whether one has more due still.
        Clients at the same place (most of them, when they keep up) share the bytes of
        one write, built once."""
        hub, built = self.hub, self._built
        behind = False
        closed = hub.closed
        written = 0
        for client in self.clients.values():
            if client.busy or client.ended is not None:
                continue
            try:
                due = hub.take(client.sub, FRAMES_PER_WRITE)
            except Slow as exc:
                client.end(exc)
                continue
            if due is None:
                if closed:
                    client.end(trio.EndOfChannel())
                continue
            key = (*due, client.batch)
            if (write := built.get(key)) is None:
                payloads = self.in_frames(hub.frames(*due), client.batch)
                write = built[key] = (frames(payloads), payloads)
            data = write[0]
            users = due[1] - due[0] + 1
            behind = behind or users == FRAMES_PER_WRITE
            try:
                sent = write_nowait(client.ws, data)
            except ConnectionClosed as exc:
                client.end(exc)
                continue
            if sent == len(data):
                written += users
                if closed and due[1] == hub.last_seq:  # (it has everything: the end)
                    client.end(trio.EndOfChannel())
            else:
                client.busy = True
                self.set_aside += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._finish, client, write[1], data, sent, users)
        built.clear()
        self.sent["plain"] += written
        return behind

    async def _finish(
        self, client: Plain, payloads: list[bytes], data: bytes, sent: int | None, users: int
    ) -> None:
        """The client's own task, while its socket has no room: the rest of its write
        (`users` users; a frame begun is always finished, or the connection aborted),
        then the pump takes it back."""
        try:
            await write_rest(client.ws, memoryview(data), sent or 0, self.write_timeout_s, payloads)
            self.sent["plain"] += users
        except (WriteTimeout, ConnectionClosed) as exc:
            client.end(exc)  # (first: the session learns why before the abort ends it)
            if isinstance(exc, WriteTimeout) and not exc.intact:
                await abort(client.ws)
        finally:
            client.busy = False
        self.hub.nudge()  # (more may be due to it: the pump was not writing to it)
