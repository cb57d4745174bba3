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

Both are counted in `faults` (by kind). Like `wsframes`, this reaches into
trio-websocket's connection (its event handlers, `_wsproto`, `_send`), pinned below its
next minor version; `tests/test_edge.py` checks both on the wire.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping


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

    async def receive_request(self, nursery: trio.Nursery) -> WebSocketRequest:
        """The peer's upgrade request, with the connection's reader started in `nursery`
        (trio-websocket's `wrap_server_stream`)."""
        nursery.start_soon(self._reader_task)
        return await self._get_request()
