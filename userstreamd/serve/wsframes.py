"""Server-to-client text frames, framed here and written several per socket write.

trio-websocket frames each message through wsproto and writes it on its own: one frame
built and one ``send`` per message per client. A broadcast sends the same encoded frame
to every client, so the broadcaster frames it here (RFC 6455 section 5.2: FIN, opcode
text, unmasked, the payload's length; no extension is ever negotiated) and writes all
the frames due to a client in one ``send_all``, under the connection's own write lock,
so that they never interleave with its pings, pongs or close frame. A client sees the
same frames either way: `send_frames` only changes how many reach the kernel at once.

This reaches into trio-websocket's connection (`_stream`, `_stream_lock`,
`_close_reason`); the dependency is pinned below its next minor version, and
`send_frames` falls back to one `send_message` per frame when those are missing.
"""

from __future__ import annotations

import os
import struct

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

_TEXT_FIN = 0x81
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def header(length: int) -> bytes:
    """The header of an unmasked, final text frame carrying `length` bytes."""
    if length < 126:
        return _SHORT.pack(_TEXT_FIN, length)
    if length < 65536:
        return _MEDIUM.pack(_TEXT_FIN, 126, length)
    return _LONG.pack(_TEXT_FIN, 127, length)


def frames(payloads: list[bytes]) -> bytes:
    """The payloads (UTF-8 JSON), each as one text frame, back to back."""
    parts = []
    for payload in payloads:
        parts.append(header(len(payload)))
        parts.append(payload)
    return b"".join(parts)


class WriteTimeout(Exception):
    """A write to the peer took longer than its timeout: it reads too slowly, or not at
    all. `intact`: the write stopped between two frames, so a close frame can still
    follow; otherwise a frame was torn, and the connection has been aborted (no close
    frame can follow: the peer would read it as the rest of the torn frame)."""

    def __init__(self, timeout_s: float, *, intact: bool) -> None:
        super().__init__(f"took nothing for {timeout_s:g} s")
        self.timeout_s = timeout_s
        self.intact = intact


async def send_frames(ws: WebSocketConnection, payloads: list[bytes], timeout_s: float) -> None:
    """Send each payload as one text frame, all of them in one write; ConnectionClosed
    as `send_message` would raise it.

    The write is not cancelled half-way (a torn frame would turn the close frame that
    follows into garbage for the client): a cancellation waits for it to finish. A write
    that takes longer than `timeout_s` raises WriteTimeout: between two frames the
    connection is left for the caller to close; in the middle of one it is aborted."""
    stream = getattr(ws, "_stream", None)
    lock = getattr(ws, "_stream_lock", None)
    if stream is None or lock is None or not hasattr(ws, "_close_reason"):
        for payload in payloads:
            await ws.send_message(payload.decode())
        return
    # (a sender that always has frames due never waits: here it yields, and can be
    # cancelled, once per write)
    await trio.lowlevel.checkpoint()
    if ws._close_reason is not None:
        raise ConnectionClosed(ws._close_reason)
    data = memoryview(frames(payloads))
    deadline = trio.current_time() + timeout_s
    sent: int | None = 0
    if isinstance(stream, trio.SocketStream) and not lock.locked():
        # The common case, a socket with room: one write(2) under the lock, taken and
        # given back without waiting (nothing else runs meanwhile).
        lock.acquire_nowait()
        try:
            sent = _write_some(stream, data)
            if sent == len(data):
                return
            sent = await _send_rest(stream, data, sent, deadline)  # (still holding the lock)
        finally:
            lock.release()
    else:  # (TLS, or a ping or pong being written: wait for the lock, bounded too)
        with trio.CancelScope(shield=True, deadline=deadline):
            async with lock:
                sent = await _send_rest(stream, data, 0, deadline)
    if sent == len(data):
        return
    if sent is not None and sent in _frame_ends(payloads):
        raise WriteTimeout(timeout_s, intact=True)
    with trio.CancelScope(shield=True):  # (its wake-ups must not cancel us before we say why)
        await ws._abort_web_socket()
    if sent is None:
        raise ConnectionClosed(ws._close_reason)
    raise WriteTimeout(timeout_s, intact=False)


def _frame_ends(payloads: list[bytes]) -> set[int]:
    """The offsets in `frames(payloads)` where a frame starts or ends."""
    ends, at = {0}, 0
    for payload in payloads:
        at += len(header(len(payload))) + len(payload)
        ends.add(at)
    return ends


def _write_some(stream: trio.SocketStream, data: memoryview) -> int:
    """What a non-blocking write takes of `data` now (0: no room, or a broken socket,
    which the blocking send that follows reports)."""
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:  # (BlockingIOError: no room)
        return 0


async def _send_rest(
    stream: trio.abc.SendStream, data: memoryview, sent: int, deadline: float
) -> int | None:
    """Send `data` from `sent` on, not cancellable (a torn frame must not be followed by
    another) but only until `deadline`: how much of `data` is sent then (-1: unknown,
    TLS), None if the stream broke (or another task closed it)."""
    with trio.CancelScope(shield=True, deadline=deadline):
        if not isinstance(stream, trio.SocketStream):
            try:
                await stream.send_all(data[sent:])
                return len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
        sock = stream.socket
        while sent < len(data):
            try:
                await trio.lowlevel.wait_writable(sock)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return None  # (another task closed the socket: the peer is gone)
            try:
                sent += os.write(sock.fileno(), data[sent:])
            except BlockingIOError:
                pass
            except OSError:
                return None
        return sent
    return sent if isinstance(stream, trio.SocketStream) else -1
