"""The operations port's listener: hypercorn's HTTP/1.1 behind the armour every port gets.

hypercorn's own `serve` accepts with `trio.serve_listeners` (no limit; EMFILE logged once
per attempt) and writes every answer shielded, with no timeout: a peer that never reads
holds its connection, its descriptor and its task for good, and the requests it
pipelined are answered after it is gone. So this module accepts through a `gate.Gate`
(the same caps, turn-away and accept-error handling as the broadcaster's port), and
hands each admitted connection to hypercorn's per-connection server (`TCPServer`: h11 parsing and
sizes, the keep-alive timer) over a `_Guarded` stream:

- at most ``http.max_connections`` connections at once (HTTP 503 beyond) and
  ``http.max_connections_per_ip`` from one address (429), and never more than an eighth
  of the process's open-file limit (`gate.ops_room`): the rest is the stream's
  (`gate.stream_room` leaves that eighth out);
- a request must arrive whole within ``read_timeout_s`` of the connection opening or of
  the previous answer; no read timeout runs while an answer is computed or written
  (however long that takes: the write has its own timeout);
- the peer's kernel must take an answer within ``write_timeout_s``, else the connection
  is dropped;
- a connection that is over (reset by the peer, a write refused or timed out, or closed
  by the peer once every request it sent is answered) is cancelled whole at once: it
  frees its slot, and the requests it pipelined are never computed;
- accept errors such as EMFILE are logged once per 10 s with how many there were, and
  accepting resumes as soon as a connection closes (0.1 s at most).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, Updated
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper
from hypercorn.utils import wrap_app

from ..config import HttpConfig, url_host
from ..errors import InUseError, address_in_use, describe, in_use_text
from ..gate import Gate, ops_room
from ..logs import Throttle, get_logger

App = Callable[
    [
        dict[str, Any],
        Callable[[], Awaitable[dict[str, Any]]],
        Callable[[dict[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]
"""An ASGI app as the ops port serves it (`app.OpsApp`; tests bring their own)."""


@dataclass(frozen=True)
class OpsPortStatistics:
    open_connections: int
    max_connections: int
    accepted: int
    over_limit: dict[int, int]  # HTTP status (503, 429) -> connections turned away
    write_timeouts: int
    peers_gone: int  # connections reset by the peer, or whose answer it refused
    accept_errors: int


class _Guarded(trio.abc.HalfCloseableStream):
    """A connection's socket stream as hypercorn sees it. The connection (its `scope`)
    is cancelled whole as soon as it is over: the peer reset it, sent nothing for
    ``read_timeout_s`` while a request was awaited (never while one is answered), did not
    take an answer within ``write_timeout_s`` (hypercorn writes shielded: only a deadline
    inside reaches the write), or closed its side and has no answer coming
    (`_Connection`). hypercorn alone would keep a closed connection until its keep-alive
    timer ends, and would go on computing answers to a peer that is gone."""

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope, port: OpsPort) -> None:
        self.transport = stream
        self.socket = stream.socket  # (hypercorn reads the addresses from it)
        self.scope = scope
        self.port = port
        self.over = False
        self.answering = False  # a request is being answered
        self.peer_closed = False  # the peer sent EOF (it may still read its answer)
        self._read_timer = trio.CancelScope()  # (the read under way's deadline)

    def end(self, why: str) -> None:
        if not self.over:
            self.over = True
            self.port.ended(why)
            self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.over:
            raise trio.BrokenResourceError("the connection is over")
        with trio.move_on_after(self.port.settings.write_timeout_s) as timeout:
            try:
                await self.transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.end("gone")
                raise
        if timeout.cancelled_caught:
            self.end("write_timeout")
            raise trio.BrokenResourceError("the peer took nothing within write_timeout_s")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = b""
        with trio.CancelScope(deadline=self._read_deadline()) as self._read_timer:
            try:
                data = await self.transport.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.end("gone")
                raise
        if self._read_timer.cancelled_caught:
            self.end("read_timeout")
        elif not data:
            self.peer_closed = True
            self.end_if_done()
        return data

    def _read_deadline(self) -> float:
        """No read timeout while an answer is computed or written (the write has its
        own); else ``read_timeout_s`` from now."""
        if self.answering:
            return math.inf
        return trio.current_time() + self.port.settings.read_timeout_s

    def set_answering(self, answering: bool) -> None:
        """A request is being answered, or the last one was: a read under way gets no
        deadline, or ``read_timeout_s`` from the end of the answer."""
        self.answering = answering
        self._read_timer.deadline = self._read_deadline()

    def end_if_done(self) -> None:
        """The peer closed its side: the connection is over once nothing is left to
        answer."""
        if self.peer_closed and not self.answering:
            self.end("closed")

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self.over:
            raise trio.BrokenResourceError("the connection is over")
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


class _Connection(TCPServer):
    """hypercorn's server of one connection, which tells its stream when an answer is
    under way (hypercorn's ``Updated``: not idle from a request to its answer's end): a
    peer that closed its side then gets every answer to what it sent, and nothing
    after."""

    async def protocol_send(self, event: Event) -> None:
        stream = self.stream
        guarded = stream if isinstance(stream, _Guarded) else None
        if guarded is not None and isinstance(event, Updated):
            # (set as the event is sent: hypercorn's handling of it may let the next
            # pipelined request's start, or the peer's EOF, through first)
            guarded.set_answering(not event.idle)
        await super().protocol_send(event)
        if guarded is not None and isinstance(event, Updated) and event.idle:
            guarded.end_if_done()  # (the state now, not as it was when the event came)


class OpsPort:
    """The listener of the ops port around `app`; `serve` runs it until cancelled."""

    def __init__(self, app: App, settings: HttpConfig) -> None:
        self.settings = settings
        self.app: AppWrapper = wrap_app(app, 0, "asgi")  # type: ignore[arg-type]
        self.hypercorn = _hypercorn_config(settings)
        self.context = WorkerContext(None)
        self.gate = Gate(
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
            turn_away_at_once=16,  # (answered at once; beyond that, just closed)
            refused_event="http.refused",
            accept_failed_event="http.accept_failed",
            accept_lines_per_10s=1,
            log_peer_port=False,
        )
        self.write_timeouts = self.peers_gone = 0
        self._throttle = Throttle()

    def statistics(self) -> OpsPortStatistics:
        gate = self.gate
        return OpsPortStatistics(
            gate.open,
            gate.max_connections,
            gate.accepted,
            dict(gate.turned_away),
            self.write_timeouts,
            self.peers_gone,
            gate.accept_errors,
        )

    def ended(self, why: str) -> None:
        """A connection is over: the peer closed it, or is `gone` (a reset, a refused
        write), or timed out (`read_timeout`, `write_timeout`)."""
        if why == "gone":
            self.peers_gone += 1
        elif why == "write_timeout":
            self.write_timeouts += 1
            self._throttle.log(
                "write_timeout",
                "info",
                "http.write_timeout",
                after_s=self.settings.write_timeout_s,
                hint="a client that does not read its answer is dropped",
            )

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on `host`:`port` until cancelled; reports the bound port."""
        self.gate.max_connections = ops_room(self.settings.max_connections)
        if self.gate.max_connections < self.settings.max_connections:
            get_logger().warning(
                "http.fd_limit",
                max_connections=self.settings.max_connections,
                effective=self.gate.max_connections,
                hint="the ops port holds at most an eighth of LimitNOFILE (ulimit -n)",
            )
        try:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        except OSError as exc:
            if address_in_use(exc):
                raise InUseError(in_use_text(f"{url_host(host)}:{port}", "http.port")) from exc
            raise
        sockets = [listener.socket for listener in listeners]
        await self.gate.serve(sockets, self._handle, task_status=task_status)

    async def _handle(self, sock: trio.socket.SocketType, ip: str, peer: str) -> None:
        stream = trio.SocketStream(sock)
        try:
            with trio.CancelScope() as scope:
                guarded = _Guarded(stream, scope, self)
                await _Connection(self.app, self.hypercorn, self.context, {}, guarded)  # type: ignore[arg-type]
        except Exception as exc:  # nothing a client does escapes its own handler
            self._throttle.log(
                "handler", "error", "http.connection_failed", error=describe(exc), exc_info=exc
            )
        finally:
            await trio.aclose_forcefully(stream)


def _hypercorn_config(settings: HttpConfig) -> HypercornConfig:
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # (into our logs, warnings up)
    config.include_server_header = False
    config.keep_alive_timeout = settings.read_timeout_s  # (a request sent byte by byte)
    return config
