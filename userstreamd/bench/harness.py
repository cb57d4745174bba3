"""The fan-out client harness: N plain WebSocket clients in one process, written for speed.

``python -m userstreamd.bench.harness URL [URL ...] CLIENTS`` opens CLIENTS connections
(ws:// on a literal address; with several URLs, client i to URL i mod their number) as
plain clients, one user per frame, like ``wscat``: raw
non-blocking sockets under one selector, a minimal HTTP/1.1 upgrade (no extensions, so
no compression) and a minimal frame parser (`FrameReader`: frames split across reads or
several in one; 7-, 16- and 64-bit lengths; fragments; a ping is answered with a masked
pong, a close with a masked close). A close with code 3008 counts as a slow close.

Every text frame is decoded (msgspec, only ``type``, ``seq`` and ``produced_at``; other
fields are skipped). A ``users`` frame (batched, which only clients that ask get) counts
each of its users. Latency is the time the frame's bytes were read minus its
``produced_at`` (both wall clock on the same machine), kept in a histogram of 0.1 ms
buckets: every frame is measured, none sampled.

It talks to the bench on its standard input and output, one JSON object per line:

- out ``{"event": "connected", "clients": N, "failed": F, "errors": [...]}`` once every
  handshake has finished or failed;
- in ``stall K``: open K stalled clients (`stalled`: they finish the handshake, then never
  read), out ``{"event": "stalled", "clients": K, "failed": F, "errors": [...]}``;
- in ``measure SECONDS``: counts restart, and after SECONDS out ``{"event": "measured",
  ...}`` (`Harness.result`); meanwhile the stalled clients are watched from that start;
- in ``settle``: read what the stalled clients were sent, out ``{"event": "settled",
  ...}`` (`StalledClients.result`: how and when each was closed, or still open);
- in ``quit`` or the end of input: close everything and exit.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import resource
import selectors
import socket
import sys
import time
from array import array
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from ..stream.protocol import CLOSE_SLOW, decode_timed
from .stalled import StalledClients, stalled_socket

RESOLUTION_MS = 0.1  # a latency histogram bucket
MAX_LATENCY_MS = 60_000  # longer ones land in the last bucket
CONNECTING_MAX = 128  # handshakes in flight at once
CONNECT_TIMEOUT_S = 30.0
RECV_BYTES = 262_144
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


def mask(payload: bytes, key: bytes) -> bytes:
    """`payload` XOR the repeated 4-byte `key` (RFC 6455 5.3; it is its own inverse)."""
    n = len(payload)
    if n == 0:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final frame as a client sends it: masked."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + key + mask(payload, key)


class FrameReader:
    """Bytes in as they arrive, whole messages out: `feed(data)` returns ``(opcode,
    payload)`` for every message completed by `data` (control frames as they come, data
    frames once their last fragment is in); the rest waits for the next `feed`."""

    def __init__(self) -> None:
        self._buf = b""
        self._opcode = 0
        self._fragments: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, pos + 2
            if length == 126:
                if n - head < 2:
                    break
                length, head = (buf[head] << 8) | buf[head + 1], head + 2
            elif length == 127:
                if n - head < 8:
                    break
                length, head = int.from_bytes(buf[head : head + 8], "big"), head + 8
            key = b""
            if b1 & 0x80:  # (a server must not mask; unmasked anyway)
                if n - head < 4:
                    break
                key, head = buf[head : head + 4], head + 4
            end = head + length
            if end > n:
                break
            payload = buf[head:end]
            if key:
                payload = mask(payload, key)
            pos = end
            opcode = b0 & 0x0F
            if opcode >= CLOSE or (opcode and b0 & 0x80):  # control, or a whole message
                out.append((opcode, payload))
            elif opcode:  # the first of several fragments
                self._opcode, self._fragments = opcode, [payload]
            else:  # a continuation
                self._fragments.append(payload)
                if b0 & 0x80:
                    out.append((self._opcode, b"".join(self._fragments)))
                    self._fragments = []
        self._buf = buf[pos:]
        return out


class _Client:
    __slots__ = (
        "expect",
        "handshake",
        "last_seq",
        "reader",
        "request",
        "sock",
        "stalled",
        "state",
    )

    def __init__(self, sock: socket.socket, request: bytes, expect: bytes, stalled: bool) -> None:
        self.sock, self.request, self.expect = sock, request, expect
        self.stalled = stalled  # never read once open (its handshake's leftover is kept)
        self.state = "connecting"  # -> "handshake" -> "open" -> "closed"
        self.handshake = b""
        self.reader = FrameReader()
        self.last_seq = 0


class _Target(NamedTuple):
    address: tuple[str, int]
    path: str


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"the harness speaks ws:// only: {url}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target((parts.hostname, parts.port or 80), path)


class Harness:
    def __init__(self, urls: list[str], clients: int) -> None:
        self.targets = [_target(url) for url in urls]  # client i: targets[i % len]
        self.wanted = clients
        self.selector = selectors.DefaultSelector()
        self.clients: list[_Client] = []
        self.errors: list[str] = []
        self.failed = 0
        self.closes: dict[int, int] = {}  # close code -> clients, since the start
        self.dropped = 0  # connections that ended without a close frame
        self.bad_frames = 0  # text frames that were not JSON
        self.users_total = self.missed_total = 0
        self.stalled = StalledClients(FrameReader)
        self._reset()

    def _reset(self) -> None:
        self.users = self.missed = 0
        self.hist = array("L", [0]) * (int(MAX_LATENCY_MS / RESOLUTION_MS) + 1)
        self.started = time.monotonic()
        self.cpu_started = _cpu_s()

    # -- connecting ------------------------------------------------------------------

    def _open(self, into: list[_Client], stalled: bool) -> None:
        address, path = self.targets[len(into) % len(self.targets)]
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = stalled_socket(family) if stalled else socket.socket(family)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        host = f"{address[0]}:{address[1]}".encode()
        request = (
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        expect = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        client = _Client(sock, request, expect, stalled)
        into.append(client)
        sock.connect_ex(address)
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def connect(self) -> None:
        """Open every client, at most CONNECTING_MAX handshakes at a time."""
        self._connect(self.clients, self.wanted, stalled=False)

    def connect_stalled(self, wanted: int) -> tuple[int, list[str]]:
        """Open `wanted` stalled clients (the others go on being read meanwhile); how many
        failed and why (the first few)."""
        opening: list[_Client] = []
        failed, errors = self.failed, self.errors
        self.failed, self.errors = 0, []  # (theirs: the reading clients' stay as they were)
        try:
            self._connect(opening, wanted, stalled=True)
        finally:
            stalled_failed, stalled_errors = self.failed, self.errors
            self.failed, self.errors = failed, errors
        for client in opening:
            if client.state == "open":
                self.stalled.add(client.sock, client.handshake)
        return stalled_failed, stalled_errors

    def _connect(self, into: list[_Client], wanted: int, *, stalled: bool) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + wanted / 100
        opened = 0
        while True:
            pending = sum(c.state in ("connecting", "handshake") for c in into)
            while opened < wanted and pending < CONNECTING_MAX:
                self._open(into, stalled)
                opened, pending = opened + 1, pending + 1
            if opened == wanted and pending == 0:
                return
            if time.monotonic() > deadline:
                for client in into:
                    if client.state in ("connecting", "handshake"):
                        self._fail(client, "handshake timed out")
                return
            for key, events in self.selector.select(0.5):
                client = key.data
                if client is None:
                    continue  # (the commands: read once connected)
                if client.state == "connecting" and events & selectors.EVENT_WRITE:
                    error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        self._fail(client, os.strerror(error))
                        continue
                    client.sock.sendall(client.request)  # (small: fits the empty buffer)
                    client.state = "handshake"
                    self.selector.modify(client.sock, selectors.EVENT_READ, client)
                elif client.state == "handshake":
                    self._read_handshake(client)
                else:
                    self._read(client, time.time())

    def _read_handshake(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except OSError as exc:
            self._fail(client, str(exc))
            return
        if not data:
            self._fail(client, "closed during the handshake")
            return
        client.handshake += data
        head, found, rest = client.handshake.partition(b"\r\n\r\n")
        if not found:
            return
        status = head.split(b"\r\n", 1)[0]
        if status.split()[1:2] != [b"101"]:
            self._fail(client, status.decode(errors="replace"))
            return
        if client.expect not in head:
            self._fail(client, "wrong Sec-WebSocket-Accept")
            return
        if client.stalled:  # (what came with the answer waits with it, unread)
            client.state, client.handshake = "open", rest
            self.selector.unregister(client.sock)
            return
        client.state, client.handshake = "open", b""
        if rest:
            self._frames(client, client.reader.feed(rest), time.time())

    def _fail(self, client: _Client, reason: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(reason)
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        client.state = "closed"
        self.selector.unregister(client.sock)
        client.sock.close()

    # -- receiving -------------------------------------------------------------------

    def _read(self, client: _Client, now: float) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.dropped += 1
            self._drop(client)
            return
        self._frames(client, client.reader.feed(data), now)

    def _frames(self, client: _Client, frames: list[tuple[int, bytes]], now: float) -> None:
        hist, top = self.hist, len(self.hist) - 1
        scale = 1000 / RESOLUTION_MS
        for opcode, payload in frames:
            if opcode == TEXT:
                try:
                    frame = decode_timed(payload)
                except msgspec.DecodeError:
                    self.bad_frames += 1
                    continue
                for item in frame.items if frame.type == "users" else (frame,):
                    if item.produced_at is None:
                        continue  # a welcome, a gap
                    seq = item.seq
                    if client.last_seq and seq > client.last_seq + 1:
                        self.missed += seq - client.last_seq - 1
                    client.last_seq = seq
                    self.users += 1
                    bucket = int((now - item.produced_at.timestamp()) * scale)
                    hist[min(max(bucket, 0), top)] += 1
            elif opcode == PING:
                with contextlib.suppress(OSError):  # (a full buffer: the server will say so)
                    client.sock.send(client_frame(PONG, payload))
            elif opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.closes[code] = self.closes.get(code, 0) + 1
                with contextlib.suppress(OSError):
                    client.sock.send(client_frame(CLOSE, payload[:2]))
                self._drop(client)
                return

    def serve(self, commands: Any) -> None:
        """Receive until `commands` (a binary stream: our stdin) says quit or ends."""
        self.selector.register(commands, selectors.EVENT_READ, None)
        pending = b""
        until = 0.0
        while True:
            now = time.monotonic()
            if until and now >= until:
                self._emit(self.result())
                until = 0.0
            elif until and self.stalled.clients:
                self.stalled.check(now)
            timeout = min(0.1, until - now) if until else 0.1
            for key, _ in self.selector.select(max(timeout, 0)):
                if key.data is not None:
                    self._read(key.data, time.time())
                    continue
                chunk = os.read(commands.fileno(), 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    words = line.decode().split()
                    if words[:1] == ["quit"]:
                        return
                    if words[:1] == ["stall"]:
                        failed, errors = self.connect_stalled(int(words[1]))
                        self._emit(
                            {
                                "event": "stalled",
                                "clients": len(self.stalled.clients),
                                "failed": failed,
                                "errors": errors,
                            }
                        )
                    if words[:1] == ["settle"]:
                        self.stalled.settle()
                        self._emit({"event": "settled", **self.stalled.result()})
                    if words[:1] == ["measure"]:
                        self._fold()
                        self._reset()
                        self.stalled.start()
                        until = self.started + float(words[1])

    def _fold(self) -> None:
        self.users_total += self.users
        self.missed_total += self.missed

    def result(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        hist = [[i, c] for i, c in enumerate(self.hist) if c]
        return {
            "event": "measured",
            "seconds": round(seconds, 3),
            "users": self.users,
            "missed": self.missed,
            "users_total": self.users_total + self.users,
            "missed_total": self.missed_total + self.missed,
            "latency_hist": hist,  # [bucket, count]: bucket * RESOLUTION_MS ms and up
            "resolution_ms": RESOLUTION_MS,
            "slow_closes": self.closes.get(CLOSE_SLOW, 0),
            "closes": {str(code): n for code, n in sorted(self.closes.items())},
            "dropped": self.dropped,
            "bad_frames": self.bad_frames,
            "connected": sum(c.state == "open" for c in self.clients),
            "cpu_pct": round(100 * (_cpu_s() - self.cpu_started) / seconds, 1),
        }

    def close(self) -> None:
        for client in self.clients:
            if client.state != "closed":
                self._drop(client)
        self.stalled.close()

    @staticmethod
    def _emit(event: dict[str, Any]) -> None:
        sys.stdout.buffer.write(msgspec.json.encode(event) + b"\n")
        sys.stdout.buffer.flush()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raise_file_limit(files: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = files + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def main(argv: list[str] | None = None) -> int:
    *urls, clients = argv if argv is not None else sys.argv[1:]
    _raise_file_limit(int(clients))
    harness = Harness(urls, int(clients))
    try:
        harness.connect()
        connected = sum(c.state == "open" for c in harness.clients)
        harness._emit(
            {
                "event": "connected",
                "clients": connected,
                "failed": harness.failed,
                "errors": harness.errors,
            }
        )
        harness.serve(sys.stdin)
    finally:
        harness.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
