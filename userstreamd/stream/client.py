"""A WebSocket client connection that always releases its TCP socket.

trio-websocket's ``open_websocket_url`` leaves the client's TCP stream open after a
close the *server* started (the RFC asks clients to wait for the server's TCP close,
and the stream is then never closed on our side; only garbage collection frees the
socket). Consumers reconnect often, so we own the stream and close it ourselves.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def _connect(url: str, ca_file: str | None) -> tuple[Stream, str, str]:
    """The stream to the server, the Host header and the request target."""
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    if parts.scheme == "ws+unix":
        return await trio.open_unix_socket(parts.path), "localhost", "/" + query
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"expected a ws://, wss:// or ws+unix:// URL, got {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    resource = (parts.path or "/") + query
    if not tls:
        return await trio.open_tcp_stream(parts.hostname, port), host, resource
    context = ssl.create_default_context(cafile=ca_file)
    stream = await trio.open_ssl_over_tcp_stream(parts.hostname, port, ssl_context=context)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, host, resource


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    token: str | None = None,
    ca_file: str | None = None,
    connect_timeout_s: float = 5.0,
    message_queue_size: int = 64,
    receive_buffer_size: int = 65536,
) -> AsyncIterator[WebSocketConnection]:
    """Connect (sending `token` as a Bearer header if given); on exit close the
    WebSocket, then the stream."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout_s):
                stream, host, resource = await _connect(url, ca_file)
            try:
                with trio.fail_after(connect_timeout_s):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        host,
                        resource,
                        extra_headers=headers,
                        message_queue_size=message_queue_size,
                        receive_buffer_size=receive_buffer_size,
                    )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
            finally:
                await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the caller's block raised; hand it back as it was.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__  # (keeps why, say, a TLS handshake failed)
        raise
