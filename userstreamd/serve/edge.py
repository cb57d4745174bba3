"""The broadcaster's listeners: who gets a WebSocket, and nothing a stranger does escapes.

Two doors. The **public** one is TCP (``broadcaster.host:port``, TLS when a certificate
is configured): every connection counts against ``max_connections`` and
``max_connections_per_ip`` from accept to close (over either: an HTTP 503 or 429 and
the door shuts), must finish TLS and the upgrade within ``handshake_timeout_s``, and is
admitted by `admission.admit` (path, query, Origin, token, permission) or answered with
the HTTP status it earned. The **private** one is a Unix socket in a 0700 directory of
the daemon's (the socket itself 0600): the daemon's own consumers use it, nobody else can
open it, and it is not subject to the public limits; only there can the daemon's own
group be joined.

Every connection runs in its own handler; whatever a peer sends or fails to send ends
there, counted and logged (`Throttle`-limited, never with a token), and the TCP socket
is always closed when the handler ends. Accept errors such as EMFILE are logged as JSON
(throttled) and accepting resumes as soon as a connection closes, 0.1 s at most. The
caps, the turn-away and the accept errors are a `gate.Gate`'s, as on the ops port.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from ..config import BroadcasterConfig, Config
from ..errors import ConfigError, describe
from ..gate import Gate, TurnAway, stream_room
from ..logs import Throttle, get_logger
from .admission import Admission, Policy, Refused, WrongToken, admit
from .auth import Lockouts
from .wsconn import ServerConnection

Session = Callable[[ServerConnection, Admission, str, bool], Awaitable[None]]

_RECEIVE_BUFFER = 65536
_PRIVATE_MAX_MESSAGE = 16 * 2**20


@dataclass(frozen=True)
class EdgeStatistics:
    open_connections: int
    accepted: int
    refused: dict[int, int]  # HTTP status -> count (the gate's turn-aways included)
    # turned away at the gate (over a connection cap, or an address locked out): a subset
    # of `refused`, not to be added to it
    over_limit: int
    handshake_timeouts: int
    handshakes_failed: int
    accept_errors: int
    handler_errors: int
    max_connections: int
    # what peers did that breaks the protocol, by kind: protocol_error_1002 (_1007: a
    # close frame with that code was sent), ping_while_closing (ignored), state_error
    peer_faults: dict[str, int]
    token_lockouts: int  # an address locked out after too many wrong tokens (`auth.Lockouts`)


_LOCKED_OUT_REASON = "too many wrong tokens from this address"
_CLOSING_STATES = (
    ConnectionState.LOCAL_CLOSING,
    ConnectionState.REMOTE_CLOSING,
    ConnectionState.CLOSED,
)
# wsproto's refusals a peer can cause: a send on a connection its close frame (or its
# leaving) has moved on, or its data after the close; its timing, never our mistake
_OUT_OF_STEP = tuple(f"cannot be sent in state {state}." for state in _CLOSING_STATES)
_ALREADY_CLOSED = "Connection already closed."


def peer_out_of_step(exc: BaseException) -> bool:
    """Whether `exc` is a wsproto refusal a peer can cause: a send refused because the
    connection is closing or closed (``Event Pong(...) cannot be sent in state
    LOCAL_CLOSING``), or data received after the close. Any other LocalProtocolError
    is a mistake of ours (a handler error)."""
    if not isinstance(exc, LocalProtocolError):
        return False
    text = str(exc)
    return text == _ALREADY_CLOSED or text.endswith(_OUT_OF_STEP)


class LockedOut(Refused):
    """429: the address was locked out (`auth.Lockouts`) while this connection was in
    flight; answered with ``retry-after``."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(429, _LOCKED_OUT_REASON)
        self.retry_after_s = retry_after_s


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None; ConfigError if the files do not load."""
    b = config.broadcaster
    if not b.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.resolve(b.tls_cert_file), config.resolve(b.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config.path}: broadcaster.tls_cert_file/tls_key_file: cannot load "
            f"{config.resolve(b.tls_cert_file)}: {exc}"
        ) from None
    return context


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards `wanted` (up to the hard limit); the
    connections it leaves room for (`gate.stream_room`: the ops port's eighth and a
    reserve set aside)."""
    return stream_room(wanted)


def private_socket_path(state_dir: Path) -> Path:
    """Where the private socket goes: ``STATE/run/broadcaster.sock``, or, when that path
    is too long for a Unix socket (108 bytes), a fresh 0700 temporary directory."""
    path = state_dir / "run" / "broadcaster.sock"
    if len(os.fsencode(path)) < 100:
        return path
    import tempfile

    return Path(tempfile.mkdtemp(prefix="userstreamd-")) / "broadcaster.sock"


def _listen_private(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, 0600 in a 0700 directory (so it is private from
    the moment it exists)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    _unlink(path)  # left by a daemon that died (we hold the state directory's lock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def reuse_port_sockets(host: str, port: int, *, listen: bool) -> list[socket.socket]:
    """Sockets bound to `host`:`port` with SO_REUSEPORT, so that several processes can
    listen on the same port (the kernel spreads new connections over the listening ones).
    Bound without `listen`, a socket only holds the port (it is given no connections):
    how the daemon reserves the port its fan-out workers share. It first binds the port
    alone, so that a port some other program (or daemon) holds is EADDRINUSE, as it
    would be without workers, rather than silently shared."""
    sockets = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if not listen:
                with socket.socket(family, kind, proto) as alone:
                    alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    alone.bind(address)
                    address = alone.getsockname()  # (port 0: the one it was given)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if listen:
                sock.listen(1024)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Edge:
    def __init__(
        self,
        settings: BroadcasterConfig,
        policy: Policy,
        session: Session,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.session = session
        self.ssl_context = ssl_context
        self.gate = Gate(
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
            turn_away_at_once=64,  # (answered at once; beyond that, just closed)
            refused_event="broadcaster.refused",
            accept_failed_event="broadcaster.accept_failed",
        )
        self.handshake_timeouts = self.handshakes_failed = self.handler_errors = 0
        self.refused: Counter[int] = Counter()  # by the handshake (`admit`)
        self.peer_faults: Counter[str] = Counter()
        self.lockouts = Lockouts()
        self._throttle = Throttle()

    @property
    def max_connections(self) -> int:
        return self.gate.max_connections

    def statistics(self) -> EdgeStatistics:
        gate = self.gate
        return EdgeStatistics(
            gate.open,
            gate.accepted,
            dict(self.refused + gate.turned_away),
            gate.turned_away.total(),
            self.handshake_timeouts,
            self.handshakes_failed,
            gate.accept_errors,
            self.handler_errors,
            gate.max_connections,
            dict(self.peer_faults),
            self.lockouts.lockouts,
        )

    # -- listeners -----------------------------------------------------------------------

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.gate.max_connections = raise_fd_limit(self.settings.max_connections)
        if self.gate.max_connections < self.settings.max_connections:
            get_logger().warning(
                "broadcaster.fd_limit",
                max_connections=self.settings.max_connections,
                effective=self.gate.max_connections,
                hint="raise LimitNOFILE (ulimit -n) to allow max_connections",
            )
        if reuse_port:
            bound = await trio.to_thread.run_sync(
                partial(reuse_port_sockets, host, port, listen=True)
            )
            sockets = [trio.socket.from_stdlib_socket(sock) for sock in bound]
        else:
            sockets = [
                listener.socket
                for listener in await trio.open_tcp_listeners(port, host=host, backlog=1024)
            ]
        handle = partial(self._handle, private=False)
        await self.gate.serve(sockets, handle, bar=self._locked_out, task_status=task_status)

    async def serve_unix(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.from_stdlib_socket(_listen_private(path))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_private, sock, nursery)
                task_status.started()
        finally:
            sock.close()
            _unlink(path)

    async def _accept_private(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery
    ) -> None:
        while True:
            sock, _ = await self.gate.accept(listener)
            nursery.start_soon(self._handle, sock, "private", "private", True)

    def _locked_out(self, ip: str) -> TurnAway | None:
        """At accept: an address locked out is turned away before any handshake (and
        checked again before `admit`, for the connections already in flight)."""
        if (locked_s := self.lockouts.locked_for(ip)) > 0:
            return TurnAway(429, _LOCKED_OUT_REASON, math.ceil(locked_s))
        return None

    # -- one connection ------------------------------------------------------------------

    async def _handle(
        self, sock: trio.socket.SocketType, ip: str, peer: str, private: bool
    ) -> None:
        stream: trio.abc.Stream = trio.SocketStream(sock)
        try:
            if self.ssl_context is not None and not private:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
            admitted = await self._handshake(stream, ip, peer, private)
            if admitted is not None:
                await self.session(admitted[0], admitted[1], peer, private)
        except* Exception as group:  # nothing a client does escapes its own handler
            out_of_step, failed = group.split(peer_out_of_step)
            if out_of_step is not None:  # the peer's timing, never our fault
                self.peer_faults["state_error"] += 1
                self._throttle.log(
                    "peer_state",
                    "info",
                    "broadcaster.peer_out_of_step",
                    peer=peer,
                    detail=describe(out_of_step),
                )
            if failed is not None:
                self.handler_errors += 1
                self._throttle.log(
                    "handler",
                    "error",
                    "broadcaster.connection_failed",
                    peer=peer,
                    error=describe(failed),
                    exc_info=failed,
                )
        finally:
            await trio.aclose_forcefully(stream)
            if private:  # (a public connection's slot is the gate's)
                self.gate.slot_freed()

    async def _handshake(
        self, stream: trio.abc.Stream, ip: str, peer: str, private: bool
    ) -> tuple[ServerConnection, Admission] | None:
        """TLS, the upgrade request and the admission decision, within the timeout."""
        log = get_logger()
        with trio.move_on_after(self.settings.handshake_timeout_s) as timeout:
            try:
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                connection = ServerConnection(
                    stream,
                    faults=self.peer_faults,
                    close_timeout_s=self.settings.close_timeout_s,
                    message_queue_size=16,
                    max_message_size=(
                        _PRIVATE_MAX_MESSAGE if private else self.settings.max_message_bytes
                    ),
                    receive_buffer_size=_RECEIVE_BUFFER,
                )
                request = await connection.receive_request()
                if (locked_s := self.lockouts.locked_for(ip)) > 0:
                    # (locked out while this connection was in flight: the gate let it
                    # in before, and it must not be a free guess)
                    await self._refuse(request, peer, LockedOut(math.ceil(locked_s)))
                    return None
                try:
                    admission = admit(request.path, request.headers, self.policy, private=private)
                except Refused as refused:
                    if isinstance(refused, WrongToken) and (wait := self.lockouts.failed(ip)):
                        self._throttle.log(
                            "token_lockout",
                            "warning",
                            "broadcaster.address_locked_out",
                            peer=peer,
                            why="too many wrong tokens",
                            retry_after_s=round(wait, 1),
                        )
                    await self._refuse(request, peer, refused)
                    return None
                await request.accept()
                return connection, admission
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed) as exc:
                self.handshakes_failed += 1
                log.debug("broadcaster.handshake_failed", peer=peer, error=describe(exc))
                return None
        if timeout.cancelled_caught:
            self.handshake_timeouts += 1
            self._throttle.log(
                "handshake_timeout",
                "info",
                "broadcaster.handshake_timeout",
                peer=peer,
                after_s=self.settings.handshake_timeout_s,
            )
        return None

    async def _refuse(self, request: WebSocketRequest, peer: str, refused: Refused) -> None:
        """Answer the upgrade `request` with `refused`'s status and reason (counted, logged)."""
        self._refuse_logged(peer, refused)
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if refused.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="userstreamd"'))
        if isinstance(refused, LockedOut):
            headers.append((b"retry-after", str(refused.retry_after_s).encode()))
        await request.reject(
            refused.status, extra_headers=headers, body=refused.reason.encode() + b"\n"
        )

    def _refuse_logged(self, peer: str, refused: Refused) -> None:
        self.refused[refused.status] += 1
        self._throttle.log(
            f"refused-{refused.status}",
            "warning",
            "broadcaster.refused",
            peer=peer,
            status=refused.status,
            reason=refused.reason,
        )
