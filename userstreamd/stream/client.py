"""The one client of the stream: every reader of it (consumers, ``tail``, fan-out mirrors)
connects, resumes and reconnects through `StreamClient`.

`StreamClient.run` keeps a session going: it connects (``ws://``, ``wss://`` with a CA
file, ``ws+unix://``), reads the welcome, hands the connection to the caller's session,
pings the server when asked (a server that vanished without a FIN is noticed by its
missing pong), and after a connection is lost reconnects with `Backoff` from the
resume cursor (``?epoch=E&since=S``) the caller keeps with `resume_after`. A group member
(``group``) does not resume by seq: the group keeps its place. The backoff starts over
once a connection made progress (`progressed`), so a server that accepts and closes at
once (a daemon stopping) is retried ever more slowly, not in a tight loop.

`open_ws` is the bare connection underneath.
trio-websocket's ``open_websocket_url`` leaves the client's TCP stream open after a
close the *server* started (the RFC asks clients to wait for the server's TCP close,
and the stream is then never closed on our side; only garbage collection frees the
socket). Consumers reconnect often, so we own the stream and close it ourselves.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ..backoff import Backoff
from ..errors import ProtocolError, describe
from .protocol import Welcome, close_meaning, decode_server

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]
WELCOME_TIMEOUT_S = 10.0  # the server sends it right after the handshake
CLOSE_WAIT_S = 2.0  # for the server's answer to our close
CLOSE_SENT_S = 0.1  # to send our close when no answer can be read


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
                    # Cancelled from outside, the reader task is cancelled too: it can
                    # read no answer to our close, so the close is sent, not waited on.
                    cancelled = trio.current_effective_deadline() == -math.inf
                    with trio.move_on_after(
                        CLOSE_SENT_S if cancelled else CLOSE_WAIT_S, shield=True
                    ):
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


class DeadServer(Exception):
    """The server did not answer a ping in time."""


class Reconnect(Exception):
    """Raised by a session: connect again at once (no backoff), from the cursor as it is."""


# What ends a connection without ending the client: it reconnects after a backoff.
LOST: tuple[type[BaseException], ...] = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    ProtocolError,  # (a first frame that is not a welcome)
    trio.TooSlowError,
    trio.BrokenResourceError,
    DeadServer,
)

RECONNECT = Backoff(0.1, 5.0)  # between connections, unless the caller says otherwise

Session = Callable[[WebSocketConnection, Welcome], Awaitable[None]]


def describe_lost(exc: BaseException) -> str:
    """One line on why a connection ended: for a close, its code, reason and meaning
    (``closed 1008 message rate exceeded: too many messages from us``)."""
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        code, reason = exc.reason.code, exc.reason.reason
        return f"closed {code} {reason or ''}".strip() + f": {close_meaning(code)}"
    return describe(exc)


def closed_with(exc: BaseException, code: int) -> bool:
    """Whether `exc` is a close the server sent with `code`."""
    return isinstance(exc, ConnectionClosed) and exc.reason is not None and exc.reason.code == code


def unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Nurseries' groups (nested) holding one plain exception: that exception (else the
    group)."""
    if len(group.exceptions) == 1:
        only = group.exceptions[0]
        if isinstance(only, BaseExceptionGroup):
            inner = unwrap(only)
            return group if inner is only else inner
        if not isinstance(only, trio.Cancelled):
            return only
    return group


class StreamClient:
    """A reader of the stream at `url`: one connection at a time, resumed after each loss."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        group: str | None = None,
        backoff: Backoff = RECONNECT,
        ping_interval_s: float | None = None,
        pong_timeout_s: float = 15.0,
    ) -> None:
        self.url = url
        self.token, self.ca_file = token, ca_file
        self.group = group
        self.ping_interval_s, self.pong_timeout_s = ping_interval_s, pong_timeout_s
        self.epoch: str | None = None  # the resume cursor: the last seq seen of `epoch`
        self.seq: int | None = None
        self.reconnects = 0  # connections lost (or refused), in total
        self.ws: WebSocketConnection | None = None  # the connection, while there is one
        self._delays = backoff.delays()

    @property
    def connected(self) -> bool:
        return self.ws is not None

    @property
    def retry_in_s(self) -> float:
        """The longest the next pause may be (what a log announces)."""
        return self._delays.ceiling_s

    def resume_after(self, epoch: str | None, seq: int | None) -> None:
        """The next connection asks for what follows `seq` of `epoch` (None: the live
        stream)."""
        self.epoch, self.seq = epoch, seq

    def progressed(self) -> None:
        """The connection carried something: after its loss, the backoff starts over."""
        self._delays.reset()

    def target(self) -> str:
        """The URL to connect to now: resuming after the cursor, or joining the group
        (in place of those keys in `url`); `url` as it is when neither is set."""
        managed = set()
        if self.group is not None:
            managed.add("group")
        elif self.epoch is not None and self.seq is not None:
            managed.update(("epoch", "since"))
        if not managed:
            return self.url
        parts = urlsplit(self.url)
        query = [
            (key, value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in managed
        ]
        if self.group is not None:
            query.append(("group", self.group))
        elif self.epoch is not None and self.seq is not None:
            query += [("epoch", self.epoch), ("since", str(self.seq))]
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def run(
        self, session: Session, on_lost: Callable[[BaseException], None] | None = None
    ) -> None:
        """Run `session(ws, welcome)` on each connection until one returns (then return);
        after a loss (`LOST`), call `on_lost` (it may raise to end the client), pause
        (`Backoff`) and connect again. `Reconnect` from a session: again at once."""
        while True:
            try:
                await self.run_once(session)
                return
            except Reconnect:
                continue
            except LOST as exc:
                self.reconnects += 1
                if on_lost is not None:
                    on_lost(exc)
            await self._delays.sleep()

    async def run_once(self, session: Session) -> None:
        """One connection: connect, read the welcome, run `session` (and the keepalive)."""
        try:
            async with open_ws(self.target(), token=self.token, ca_file=self.ca_file) as ws:
                self.ws = ws
                try:
                    welcome = await self.wait_welcome(ws)
                    async with trio.open_nursery() as nursery:
                        if self.ping_interval_s is not None:
                            nursery.start_soon(self._keep_alive, ws)
                        await session(ws, welcome)
                        nursery.cancel_scope.cancel()
                finally:
                    self.ws = None
        except BaseExceptionGroup as group:
            raise unwrap(group) from None

    @staticmethod
    async def wait_welcome(ws: WebSocketConnection) -> Welcome:
        """The first frame, which must be the welcome, within WELCOME_TIMEOUT_S (a server
        that vanished after the handshake is noticed: the keepalive starts after it)."""
        with trio.fail_after(WELCOME_TIMEOUT_S):
            frame = await ws.get_message()
        message = decode_server(frame)
        if not isinstance(message, Welcome):
            raise ProtocolError(f"expected a welcome, got a {type(message).__name__} frame")
        return message

    async def _keep_alive(self, ws: WebSocketConnection) -> None:
        assert self.ping_interval_s is not None
        while True:
            await trio.sleep(self.ping_interval_s)
            with trio.move_on_after(self.pong_timeout_s):
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the session learns it too
                continue
            raise DeadServer(f"no pong within {self.pong_timeout_s:g} s")
