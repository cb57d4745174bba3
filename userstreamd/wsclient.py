"""A WebSocket client connection that always releases its TCP socket.

trio-websocket's ``open_websocket_url`` leaves the client's TCP stream open after a
close the *server* started (the RFC asks clients to wait for the server's TCP close,
and the stream is then never closed on our side; only garbage collection frees the
socket). Consumers reconnect often, so we own the stream and close it ourselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    connect_timeout_s: float = 5.0,
    message_queue_size: int = 64,
    receive_buffer_size: int = 65536,
) -> AsyncIterator[WebSocketConnection]:
    """Connect to a ``ws://`` URL; on exit close the WebSocket, then the TCP stream."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"expected a ws:// URL, got {url!r}")
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
            try:
                with trio.fail_after(connect_timeout_s):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        host,
                        resource,
                        message_queue_size=message_queue_size,
                        receive_buffer_size=receive_buffer_size,
                    )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
            finally:
                await stream.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the caller's block raised; hand it back as it was.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
