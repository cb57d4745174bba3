"""Pings for every connection of a broadcaster from one task: a wheel, not a timer per
connection.

Each connection (`Peer`) is pinged every ``ping_interval_s``; one that has not answered
with a pong within ``pong_timeout_s`` is dead (`DeadPeer`). The due pings and the
deadlines of their pongs are two queues in time order (every connection has the same
interval), so the wheel's one task wakes for what is due, and takes everything due
within the next `slack` seconds at once: 1,000 idle clients cost one wake-up a second,
not 1,000 timers. A ping is a raw frame written without waiting (`wsframes`); only a
connection whose socket is busy or full, or TLS, gets a task for its ping.

`Peer` is also how the writers end a session: `Peer.end` records why (an exception the
session raises) and cancels the session's scope.
"""

from __future__ import annotations

from collections import deque

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .wsframes import WriteTimeout, abort, write_nowait, write_rest

PING = b"\x89\x00"  # an unmasked ping frame without payload (RFC 6455 section 5.5.2)


class DeadPeer(Exception):
    """The peer did not answer a ping in time."""


class Peer:
    """A session's connection, watched by the wheel and written by the broadcaster."""

    __slots__ = ("ended", "finished", "scope", "ws")

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.scope = trio.CancelScope()  # the session's wait: cancelled by `end`
        self.ended: BaseException | None = None  # why, for the session to raise
        self.finished = False  # the session is over: forget it

    def end(self, why: BaseException) -> None:
        """End the session (the first reason wins)."""
        if self.ended is None and not self.finished:
            self.ended = why
            self.scope.cancel()


class KeepAlive:
    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.slack = min(1.0, interval_s / 10, timeout_s / 10)
        self._pings: deque[tuple[float, Peer]] = deque()  # next ping, in time order
        self._pongs: deque[tuple[float, Peer, int]] = deque()  # (deadline, peer, pongs then)
        self._nursery: trio.Nursery | None = None
        self._added = trio.Event()
        self.pinged = 0  # pings sent, since the start

    def watch(self, peer: Peer) -> None:
        """Ping `peer` from `ping_interval_s` from now on, until it is finished."""
        self._pings.append((trio.current_time() + self.interval_s, peer))
        self._added.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                now = trio.current_time()
                self._turn(now + self.slack)
                heads = [queue[0][0] for queue in (self._pings, self._pongs) if queue]
                if heads:
                    await trio.sleep_until(min(heads))
                else:
                    await self._added.wait()
                    self._added = trio.Event()

    def _turn(self, until: float) -> None:
        """Judge the pongs due by now; send the pings due by `until` (a little early, so
        that one wake-up sends many)."""
        pings, pongs = self._pings, self._pongs
        now = trio.current_time()
        while pongs and pongs[0][0] <= now:
            _, peer, before = pongs.popleft()
            if not peer.finished and peer.ws.pongs == before:  # type: ignore[attr-defined]
                peer.end(DeadPeer(f"no pong within {self.timeout_s:g} s"))
        while pings and pings[0][0] <= until:
            _, peer = pings.popleft()
            if peer.finished or peer.ended is not None:
                continue
            pongs.append((now + self.timeout_s, peer, peer.ws.pongs))  # type: ignore[attr-defined]
            pings.append((now + self.interval_s, peer))
            self.pinged += 1
            self._ping(peer)

    def _ping(self, peer: Peer) -> None:
        try:
            sent = write_nowait(peer.ws, PING)
        except ConnectionClosed:
            return  # (closing: the session is ending)
        if sent != len(PING):
            assert self._nursery is not None
            self._nursery.start_soon(self._ping_when_writable, peer, sent or 0)

    async def _ping_when_writable(self, peer: Peer, sent: int) -> None:
        """A ping behind another write, on a full socket, or over TLS: within the pong's
        timeout, or the peer is dead (it reads nothing)."""
        try:
            await write_rest(peer.ws, memoryview(PING), sent, self.timeout_s, [PING])
        except WriteTimeout as exc:
            peer.end(DeadPeer(f"took no ping for {self.timeout_s:g} s"))
            if not exc.intact:
                await abort(peer.ws)
        except ConnectionClosed:
            pass
