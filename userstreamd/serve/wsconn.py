"""The server's side of one WebSocket connection: trio-websocket's, with two answers to
a peer corrected.

- **A frame that breaks the protocol** (unmasked, a reserved opcode, an invalid close
  code) or a text message that is not UTF-8: wsproto reports it as a close event with
  code 1002 (1007) while the connection is still open, and trio-websocket then closes
  the TCP connection without a close frame. Here the close frame with that code is sent
  first, as RFC 6455 section 7.1.7 asks ("Fail the WebSocket Connection"), within
  `close_timeout_s` (a peer that reads nothing gets the TCP close alone); the session
  sees the connection closed with that code from then on.
- **A ping after our close frame**: wsproto refuses to answer it once we are closing
  (``LocalProtocolError: Event Pong(...) cannot be sent in state LOCAL_CLOSING``),
  which escaped trio-websocket's reader as our error. Here the ping is ignored, as RFC
  6455 allows, and the close handshake goes on.

Both are counted in `faults` (by kind).

**Who reads.** trio-websocket reads each connection on a task of its own, and queues
its messages for `get_message`. Here the handler's task reads the upgrade request
itself (`receive_request`), and the session then says who reads: a plain client's
session reads on its own task, each message handled as it arrives (`read` with a
`handle`: no queue, no second task), a group member's on a task beside its sender.
Its write lock is a `wsframes.WriteLock`, and it counts the pongs it receives (for
`keepalive`); once accepted, wsproto's handshake state (an h11 connection) and
trio-websocket's never-awaited test event are dropped: an idle connection keeps only
what it needs. Like `wsframes`, this reaches into
trio-websocket's connection (its event handlers, `_wsproto`, `_send`), pinned below its
next minor version; `tests/test_edge.py` checks both on the wire.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Ping, Pong, Request
from wsproto.utilities import RemoteProtocolError

from .wsframes import WriteLock, WriteTimeout, abort, write_rest


class _Nothing:
    """What stands in for an Event no one waits on."""

    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return False


class _HandshakeDone:
    """What stands in for wsproto's finished handshake: it has no events."""

    def events(self) -> Iterator[Event]:
        return iter(())


class _Handled:
    """What stands in for trio-websocket's message queue when `read` is given a
    `handle`: each message is handled as the reader sends it."""

    __slots__ = ("handle",)

    def __init__(self, handle: Callable[[str | bytes], None]) -> None:
        self.handle = handle

    async def send(self, message: str | bytes) -> None:
        self.handle(message)

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> _Handled:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_NOTHING = _Nothing()
_HANDSHAKE_DONE = _HandshakeDone()


class ServerConnection(WebSocketConnection):
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        faults: Counter[str],
        close_timeout_s: float,
        message_queue_size: int,
        max_message_size: int,
        receive_buffer_size: int,
    ) -> None:
        super().__init__(
            stream,
            WSConnection(ConnectionType.SERVER),
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
            receive_buffer_size=receive_buffer_size,
        )
        self._faults = faults
        self._close_timeout_s = close_timeout_s
        # (`wsframes` may take it on one task and give it back on another)
        self._stream_lock = WriteLock()  # type: ignore[assignment]
        self.pongs = 0  # pongs received (`keepalive` pings with raw frames and counts them)
        self._for_testing_peer_closed_connection = _NOTHING  # type: ignore[assignment]
        self._reading = False

    async def receive_request(self) -> WebSocketRequest:
        """Read the peer's upgrade request on this task (then nobody reads until the
        session says who does: `read`); ConnectionClosed if the peer went away before
        it, or sent something that is not one (after a 400)."""
        while True:
            for event in self._wsproto.events():
                if isinstance(event, Request):  # (nothing else comes before it)
                    await self._handle_request_event(event)
                    return await self._get_request()
            try:
                data = await self._stream.receive_some(self._receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise ConnectionClosed(CloseReason(1006, "gone before its upgrade request"))
            try:
                self._wsproto.receive_data(bytes(data))
            except RemoteProtocolError as exc:
                if exc.event_hint is not None:
                    await self._send(exc.event_hint)
                await self._close_stream()
                raise ConnectionClosed(
                    CloseReason(1002, f"not an upgrade request: {exc}")
                ) from None

    async def read(self, handle: Callable[[str | bytes], None] | None = None) -> None:
        """Read the connection on this task until it is closed (trio-websocket's reader:
        pings answered, the close handshake), each message queued for `get_message`, or
        with `handle`, handled as it arrives instead (no queue: `get_message` is not to be
        used then). Cancellable; may be called again (as `close_within` does)."""
        if handle is not None:
            # (trio-websocket's queue goes: its ends are asked only to send and to close)
            self._send_channel = self._recv_channel = _Handled(handle)  # type: ignore[assignment]
        self._reading = True
        try:
            await self._reader_task()
        finally:
            self._reading = False

    async def close_within(self, code: int, reason: str, timeout_s: float) -> None:
        """Start the close handshake and wait at most `timeout_s` for the peer's answer
        (read for it here when no task is reading)."""
        with trio.move_on_after(timeout_s):
            if self._reading:
                await self.aclose(code, reason)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.read)
                await self.aclose(code, reason)
                nursery.cancel_scope.cancel()

    async def _accept(
        self, request: Request, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        await super()._accept(request, subprotocol, extra_headers)
        if self._wsproto.connection is not None:
            # wsproto keeps the handshake (an h11 connection) for the life of the
            # connection, though it only asks it for events, never any after this
            self._wsproto.handshake = _HANDSHAKE_DONE  # type: ignore[assignment]

    async def _send(self, event: Event) -> None:
        """trio-websocket's, with its frame never cut by a cancellation (the reader now
        runs in the session's scope, which its writers cancel): written whole, shielded,
        within ``close_timeout_s``, else the connection is aborted."""
        data = self._wsproto.send(event)
        try:
            await write_rest(self, memoryview(data), 0, self._close_timeout_s)
        except WriteTimeout:
            await abort(self)
            raise ConnectionClosed(self._close_reason) from None

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            # Not the peer's close frame (that moves the state on): wsproto failed the
            # connection on a frame of the peer's. Tell the peer why before closing.
            self._faults[f"protocol_error_{event.code}"] += 1
            # Closed from now on, as trio-websocket does before answering a peer's close:
            # a send of the session's meanwhile raises ConnectionClosed (with this code)
            # instead of a LocalProtocolError from wsproto, which is already closing.
            # The session then ends and its handler cancels this reader: the close frame
            # is written all the same (shielded, bounded).
            self._close_reason = CloseReason(event.code, event.reason or None)
            with trio.move_on_after(self._close_timeout_s, shield=True):
                with contextlib.suppress(ConnectionClosed):
                    await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)

    async def _handle_ping_event(self, event: Ping) -> None:
        if self._wsproto.state is not ConnectionState.OPEN:
            self._faults["ping_while_closing"] += 1
            return
        await super()._handle_ping_event(event)

    async def _handle_pong_event(self, event: Pong) -> None:
        self.pongs += 1
        await super()._handle_pong_event(event)
