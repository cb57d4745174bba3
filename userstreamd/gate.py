"""A TCP gate: what stands between a listening port and its connections' handlers.

Both public doors, the ops port (`ops/server.py`) and the broadcaster's WebSocket port
(`serve/edge.py`), accept through one, so that every listener gets the same armour:

- at most `max_connections` connections at once (HTTP 503 beyond) and
  `max_connections_per_ip` from one address (429), each counted from accept until its
  handler returns; the owner may bar an address too (`bar`: the broadcaster's token
  lockout);
- a connection turned away gets a short canned HTTP answer with ``retry-after`` (while
  `turn_away_at_once` are pending; beyond, it is just closed), counted by status and
  logged (the owner's ``*.refused``, throttled);
- accept errors that mean "out of descriptors or memory" (EMFILE, ENFILE, ENOBUFS,
  ENOMEM) are counted, logged (the owner's ``*.accept_failed``, throttled) and waited
  out: accepting resumes as soon as a connection closes, 0.1 s at most. Transient ones
  (a peer that left before it was accepted) are ignored.

The two ports share the process's open-file limit here, in one place: `ops_room` gives
the ops port at most an eighth, `stream_room` the broadcaster the rest less
`STREAM_FD_RESERVE`, so that the two never overlap.
"""

from __future__ import annotations

import errno
import resource
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .logs import Throttle

RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN}

_TITLES = {429: "Too Many Requests", 503: "Service Unavailable"}

Handler = Callable[[trio.socket.SocketType, str, str], Awaitable[None]]
"""Serves one admitted connection: (its socket, the peer's IP, ``ip:port``); it closes
the socket."""


OPS_FD_SHARE = 8  # the ops port holds at most 1/8 of the process's descriptors
STREAM_FD_RESERVE = 128  # descriptors kept for PostgreSQL, logs and the private socket


def fd_room(wanted: int, *, share: int = 1, reserve: int = 0) -> int:
    """How many of `wanted` connections fit in one `share`-th of the open-file limit
    less `reserve` descriptors (at least 1), the soft limit first raised towards
    `wanted` x `share` + `reserve` (up to the hard limit)."""
    soft = _raise_soft_limit(wanted * share + reserve)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - reserve) // share))


def ops_room(wanted: int) -> int:
    """The ops port's connections: at most an eighth of the open-file limit."""
    return fd_room(wanted, share=OPS_FD_SHARE)


def stream_room(wanted: int) -> int:
    """The stream's (the broadcaster's) connections: the open-file limit less
    `STREAM_FD_RESERVE` and less the ops port's eighth, so that the two budgets never
    overlap, whichever is taken first (the soft limit only rises: the eighth reserved
    here is never less than the one `ops_room` gave)."""
    reserve = STREAM_FD_RESERVE
    needed = wanted + reserve  # (with the eighth: the least limit whose 7/8 hold it)
    soft = _raise_soft_limit(needed + (needed - 1) // (OPS_FD_SHARE - 1))
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve - soft // OPS_FD_SHARE))


def _raise_soft_limit(target: int) -> int:
    """The soft open-file limit, first raised towards `target` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < target:
        soft = target if hard == resource.RLIM_INFINITY else min(hard, target)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


@dataclass(frozen=True)
class TurnAway:
    """Why a connection is turned away: its HTTP status (429 or 503) and the body."""

    status: int
    reason: str
    retry_after_s: int = 5


class Gate:
    """Connection caps, turn-away and accept errors for one port's listeners."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_connections_per_ip: int,
        turn_away_at_once: int,
        refused_event: str,
        accept_failed_event: str,
        accept_lines_per_10s: int = 5,
        log_peer_port: bool = True,
    ) -> None:
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.turn_away_at_once = turn_away_at_once
        self.refused_event = refused_event
        self.accept_failed_event = accept_failed_event
        self.log_peer_port = log_peer_port  # (else ``*.refused`` names the IP alone)
        self.open = self.accepted = self.accept_errors = 0
        self.turned_away: Counter[int] = Counter()  # HTTP status -> connections
        self._per_ip: Counter[str] = Counter()
        self._turning_away = 0
        self._throttle = Throttle()
        self._accept_throttle = Throttle(per_interval=accept_lines_per_10s)
        self._slot_freed = trio.Event()

    async def serve(
        self,
        sockets: Sequence[trio.socket.SocketType],
        handle: Handler,
        *,
        bar: Callable[[str], TurnAway | None] | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on the listening `sockets` until cancelled, handing each connection
        admitted to `handle`; reports the first one's port. Closes the sockets."""
        try:
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(self._accept_loop, sock, nursery, handle, bar)
                task_status.started(sockets[0].getsockname()[1])
        finally:
            for sock in sockets:
                sock.close()

    async def accept(self, listener: trio.socket.SocketType) -> tuple[trio.socket.SocketType, Any]:
        """The next connection on `listener`, accept errors waited out."""
        while True:
            try:
                return await listener.accept()
            except OSError as exc:
                if exc.errno in TRANSIENT_ERRNOS:
                    continue
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                self.accept_errors += 1
                self._accept_throttle.log(
                    "accept",
                    "error",
                    self.accept_failed_event,
                    error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    accept_errors=self.accept_errors,  # (since the start)
                    open_connections=self.open,
                )
                with trio.move_on_after(0.1):
                    await self._slot_freed.wait()

    def slot_freed(self) -> None:
        """A connection closed: an accept waiting out an error may try again."""
        self._slot_freed.set()
        self._slot_freed = trio.Event()

    async def _accept_loop(
        self,
        listener: trio.socket.SocketType,
        nursery: trio.Nursery,
        handle: Handler,
        bar: Callable[[str], TurnAway | None] | None,
    ) -> None:
        while True:
            sock, address = await self.accept(listener)
            ip = str(address[0])
            peer = f"{ip}:{address[1]}" if ":" not in ip else f"[{ip}]:{address[1]}"
            if self.open >= self.max_connections:
                turn_away: TurnAway | None = TurnAway(503, "too many connections")
            elif self._per_ip[ip] >= self.max_connections_per_ip:
                turn_away = TurnAway(429, "too many connections from this address")
            else:
                turn_away = bar(ip) if bar is not None else None
            if turn_away is not None:
                self._turn_away(nursery, sock, peer if self.log_peer_port else ip, turn_away)
            else:
                self.open += 1
                self._per_ip[ip] += 1
                self.accepted += 1
                nursery.start_soon(self._handle, handle, sock, ip, peer)

    async def _handle(
        self, handle: Handler, sock: trio.socket.SocketType, ip: str, peer: str
    ) -> None:
        try:
            await handle(sock, ip, peer)
        finally:
            self.open -= 1
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]
            self.slot_freed()

    def _turn_away(
        self, nursery: trio.Nursery, sock: trio.socket.SocketType, peer: str, why: TurnAway
    ) -> None:
        """A canned HTTP answer (while few are pending), then closed."""
        self.turned_away[why.status] += 1
        self._throttle.log(
            f"refused-{why.status}",
            "warning",
            self.refused_event,
            peer=peer,
            status=why.status,
            reason=why.reason,
        )
        if self._turning_away >= self.turn_away_at_once:
            sock.close()
            return
        self._turning_away += 1
        nursery.start_soon(self._answer_and_close, sock, why)

    async def _answer_and_close(self, sock: trio.socket.SocketType, why: TurnAway) -> None:
        stream = trio.SocketStream(sock)
        body = why.reason.encode() + b"\n"
        response = (
            f"HTTP/1.1 {why.status} {_TITLES[why.status]}\r\n"
            f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: {why.retry_after_s}\r\nconnection: close\r\n\r\n"
        ).encode() + body
        try:
            with trio.move_on_after(1):
                await stream.send_all(response)
                await stream.send_eof()
                while await stream.receive_some(4096):  # read their request: no RST
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._turning_away -= 1
            await trio.aclose_forcefully(stream)
