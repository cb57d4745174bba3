"""The harness's stalled clients (``bench fanout --stalled K``): plain WebSocket clients
that finish the handshake and then never read a byte, their receive buffer set small
(STALLED_RCVBUF_BYTES, before connecting) so that the server's writes to them stall after
kilobytes. They count in no delivered or latency figure; what is reported is what the
server did with them.

A client that never reads cannot see a close frame, nor even the end of its connection
(the FIN waits behind everything the server could not send it). So `StalledClients`
looks without reading, every CHECK_INTERVAL_S from the start of the measured phase
(`check`), and the time reported is when the harness noticed, within CHECK_INTERVAL_S:

- its receive buffer, peeked at (``MSG_PEEK``: nothing is consumed, the window offered
  stays shut): a close frame there (its code, e.g. 3008) among what the server managed to
  send, or the end of the connection (reset, or closed with no close frame before it);
- the kernel's table of TCP connections (``/proc/net/tcp`` and ``tcp6``: this machine's,
  the server's end of each connection included): once the server's end of a stalled
  connection is no longer ESTABLISHED, the server has closed or reset its socket, though
  what it sent last (a close frame, maybe) still waits behind what it could not send.

At the end of the measured phase (`settle`) the harness reads everything pending on the
stalled sockets whose close frame it has not seen, for up to SETTLE_S: a close frame
found then, or the connection's end, says how (``"none"``: closed or reset without a
close frame). One whose close frame is found only then counts as closed at the end of the
measured phase; one whose server end was seen closed but whose close frame or end was not
reached within SETTLE_S is closed ``"unknown"``; the rest are still open. A reset drops
what the client had not read: a close frame the server sent before resetting is seen
only if a check peeked at it first.

Reading ``/proc/net/tcp`` makes this Linux only, like the rest of the bench's figures.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

STALLED_RCVBUF_BYTES = 4096
PEEK_BYTES = 65536  # more than the kernel lets a STALLED_RCVBUF_BYTES buffer hold
CHECK_INTERVAL_S = 0.5
SETTLE_S = 1.0  # at most, reading what the stalled clients were sent
QUIET_S = 0.2  # no more bytes for this long: all they were sent is read
NO_CLOSE_FRAME = "none"  # closed or reset without a close frame
UNKNOWN = "unknown"  # its server end closed, but what it was sent not read to the end
CLOSE = 8  # the close frame's opcode
_ESTABLISHED = "01"
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def established_pairs() -> set[tuple[int, int]]:
    """(local port, remote port) of every ESTABLISHED TCP connection on this machine (the
    server's port and a client's own name a connection on one machine: no addresses)."""
    pairs: set[tuple[int, int]] = set()
    for table in _TABLES:
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            next(rows, None)
            for row in rows:
                fields = row.split()
                if fields[3] == _ESTABLISHED:
                    local, remote = fields[1], fields[2]
                    pairs.add((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)))
    return pairs


class Reader(Protocol):
    """The harness's `FrameReader`: bytes in, whole ``(opcode, payload)`` messages out."""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]: ...


class Stalled:
    """One stalled client: its socket and what became of it."""

    __slots__ = ("closed_after_s", "how", "pending", "ports", "sock")

    def __init__(self, sock: socket.socket, pending: bytes) -> None:
        self.sock = sock
        self.pending = pending  # what came with the handshake's answer (unread so far)
        local, server = sock.getsockname()[1], sock.getpeername()[1]
        self.ports = (server, local)  # the server's end, as its row in /proc/net/tcp
        self.closed_after_s: float | None = None  # since the start of the measured phase
        self.how: str | None = None  # the close frame's code, or NO_CLOSE_FRAME


def stalled_socket(family: socket.AddressFamily) -> socket.socket:
    """A non-blocking socket whose receive buffer is STALLED_RCVBUF_BYTES (set before
    connecting, so that the window it offers stays that small)."""
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF_BYTES)
    sock.setblocking(False)
    return sock


class StalledClients:
    """The stalled clients of one harness; `new_reader()` makes a frame parser."""

    def __init__(self, new_reader: Callable[[], Reader]) -> None:
        self.new_reader = new_reader
        self.clients: list[Stalled] = []
        self.started = time.monotonic()  # the measured phase's start
        self.checked = 0.0

    def add(self, sock: socket.socket, pending: bytes) -> None:
        self.clients.append(Stalled(sock, pending))

    def start(self) -> None:
        self.started = self.checked = time.monotonic()

    def check(self, now: float) -> None:
        """Every CHECK_INTERVAL_S: note the clients closed since (module docstring)."""
        if now - self.checked < CHECK_INTERVAL_S:
            return
        self.checked = now
        after = round(now - self.started, 2)
        for client in self.clients:
            if client.how is None and self._peek(client) and client.closed_after_s is None:
                client.closed_after_s = after
        open_ = [c for c in self.clients if c.closed_after_s is None]
        if not open_:
            return
        established = established_pairs()
        for client in open_:
            if client.ports not in established:
                client.closed_after_s = after

    def _peek(self, client: Stalled) -> bool:
        """Whether its receive buffer holds a close frame or its connection's end."""
        try:
            data = client.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:  # (reset)
            data = b""
        if self._feed(client, self.new_reader(), client.pending + (data or b"")):
            return True
        if data == b"":
            client.how = NO_CLOSE_FRAME
            return True
        return False

    def settle(self) -> None:
        """Read what each was sent whose close frame is not seen yet (up to SETTLE_S in
        all): how each was closed."""
        now = time.monotonic()
        self.checked = now - CHECK_INTERVAL_S
        self.check(now)  # (one last look, before reading)
        end = round(now - self.started, 2)
        readers = {id(c): self.new_reader() for c in self.clients}
        selector = selectors.DefaultSelector()
        for client in self.clients:
            if client.how is not None or self._feed(client, readers[id(client)], client.pending):
                continue
            selector.register(client.sock, selectors.EVENT_READ, client)
        deadline = quiet = time.monotonic()
        deadline += SETTLE_S
        while selector.get_map() and (now := time.monotonic()) < deadline and now - quiet < QUIET_S:
            for key, _ in selector.select(min(QUIET_S, deadline - now)):
                client = key.data
                quiet = time.monotonic()
                if self._read(client, readers[id(client)]):
                    selector.unregister(client.sock)
        selector.close()
        for client in self.clients:
            if client.how is None and client.closed_after_s is not None:
                client.how = UNKNOWN
            elif client.how is not None and client.closed_after_s is None:
                client.closed_after_s = end  # (a close frame, its connection still open)

    def _read(self, client: Stalled, reader: Reader) -> bool:
        """Whatever is pending on its socket; whether it is over (closed, either way)."""
        while True:
            try:
                data = client.sock.recv(262_144)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:
                client.how = client.how or NO_CLOSE_FRAME
                return True
            if self._feed(client, reader, data):
                return True

    @staticmethod
    def _feed(client: Stalled, reader: Reader, data: bytes) -> bool:
        for opcode, payload in reader.feed(data):
            if opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                client.how = str(code)
                return True
        return False

    def result(self) -> dict[str, Any]:
        closes: dict[str, int] = {}
        for client in self.clients:
            if client.how is not None:
                closes[client.how] = closes.get(client.how, 0) + 1
        return {
            "stalled": len(self.clients),
            "stalled_closes": dict(sorted(closes.items())),
            "stalled_closed_after_s": sorted(
                c.closed_after_s for c in self.clients if c.closed_after_s is not None
            ),
            "stalled_open": sum(c.how is None for c in self.clients),
        }

    def close(self) -> None:
        for client in self.clients:
            client.sock.close()
        self.clients = []
