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

WRITE_TIMEOUT_S = 5.0  # a write that takes longer is given up, the connection aborted
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


async def send_frames(
    ws: WebSocketConnection, payloads: list[bytes], timeout_s: float = WRITE_TIMEOUT_S
) -> None:
    """Send each payload as one text frame, all of them in one write; ConnectionClosed
    as `send_message` would raise it.

    The write is not cancelled half-way (a torn frame would turn the close frame that
    follows into garbage for the client): a cancellation waits for it to finish. A write
    that takes longer than `timeout_s` is torn anyway, so the connection is aborted, with
    no close frame, and ConnectionClosed raised."""
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
    if isinstance(stream, trio.SocketStream) and not lock.locked():
        # The common case, a socket with room: one write(2) under the lock, taken and
        # given back without waiting (nothing else runs meanwhile).
        lock.acquire_nowait()
        try:
            data = data[_write_some(stream, data) :]
            if not data:
                return
            if await _send_rest(stream, data, timeout_s):  # (still holding the lock)
                return
        finally:
            lock.release()
    else:  # (TLS, or a ping or pong being written: wait for the lock, bounded too)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout_s):
            async with lock:
                if await _send_rest(stream, data, timeout_s):
                    return
    await ws._abort_web_socket()
    raise ConnectionClosed(ws._close_reason)


def _write_some(stream: trio.SocketStream, data: memoryview) -> int:
    """What a non-blocking write takes of `data` now (0: no room, or a broken socket,
    which the blocking send that follows reports)."""
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:  # (BlockingIOError: no room)
        return 0


async def _send_rest(stream: trio.abc.SendStream, data: memoryview, timeout_s: float) -> bool:
    """Send all of `data`, not cancellable (a torn frame must not be followed by another)
    but bounded by `timeout_s`; False if the stream broke or the time ran out."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout_s):
        try:
            await stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return False
