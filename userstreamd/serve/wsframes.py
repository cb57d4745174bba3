"""Server-to-client text frames, framed here and written several per socket write.

trio-websocket frames each message through wsproto and writes it on its own: one frame
built and one ``send`` per message per client. A broadcast sends the same encoded frame
to every client, so the broadcaster frames it here (RFC 6455 section 5.2: FIN, opcode
text, unmasked, the payload's length; no extension is ever negotiated) and writes all
the frames due to a client in one ``send_all``, under the connection's own write lock,
so that they never interleave with its pings, pongs or close frame. A client sees the
same frames either way: `send_frames` only changes how many reach the kernel at once.

This reaches into trio-websocket's connection (`_stream`, `_close_reason`, and its write
lock, which `wsconn.ServerConnection` makes a `WriteLock`); the dependency is pinned
below its next minor version.
"""

from __future__ import annotations

import os
import struct
from typing import cast

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
    follow; otherwise a frame was torn, and the connection must be aborted (no close
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
    # (a sender that always has frames due never waits: here it yields, and can be
    # cancelled, once per write)
    await trio.lowlevel.checkpoint()
    data = memoryview(frames(payloads))
    sent = write_nowait(ws, data)
    if sent != len(data):
        try:
            await write_rest(ws, data, sent or 0, timeout_s, payloads)
        except WriteTimeout as exc:
            if not exc.intact:
                await abort(ws)
            raise


def write_nowait(ws: WebSocketConnection, data: bytes | memoryview) -> int | None:
    """What one non-blocking write(2) of `data` to the client's socket took (0: no room,
    or a broken socket, which `write_rest` reports); None when it cannot be tried now:
    TLS, or another write (a pong, a close frame) holds the socket. ConnectionClosed
    once the connection is closing. Never waits, never yields.

    A write that took part of `data` has torn a frame: it leaves the connection's write
    lock taken (a `WriteLock`, which any task may give back), for `write_rest` to finish
    the frame before anything else is written."""
    if ws._close_reason is not None:
        raise ConnectionClosed(ws._close_reason)
    stream, lock = ws._stream, cast(WriteLock, ws._stream_lock)
    if lock.held or not isinstance(stream, trio.SocketStream):
        return None
    try:
        sent = os.write(stream.socket.fileno(), data)
    except OSError:  # (BlockingIOError: no room)
        return 0
    if 0 < sent < len(data):
        lock.acquire_nowait()
    return sent


async def write_rest(
    ws: WebSocketConnection,
    data: memoryview,
    sent: int,
    timeout_s: float,
    payloads: list[bytes] | None = None,
) -> None:
    """Write `data` from `sent` on (after `write_nowait` took `sent` bytes of it: it
    holds the write lock then; otherwise it is taken here, so that nothing interleaves),
    not cancellable, within `timeout_s`: WriteTimeout after that (if not `intact`, the
    caller records why, then calls `abort`), ConnectionClosed if the stream broke."""
    deadline = trio.current_time() + timeout_s
    stream, lock = ws._stream, ws._stream_lock
    done: int | None = sent
    held = sent > 0
    try:
        with trio.CancelScope(shield=True, deadline=deadline):
            if not held:
                await lock.acquire()
                held = True
            done = await _send_rest(stream, data, sent, deadline)
    finally:
        if held:
            lock.release()
    if done == len(data):
        return
    if done is None:
        await abort(ws)
        raise ConnectionClosed(ws._close_reason)
    raise WriteTimeout(timeout_s, intact=done in _frame_ends(payloads or []))


async def abort(ws: WebSocketConnection) -> None:
    """Close the connection without a close frame (after a torn frame: see WriteTimeout)."""
    with trio.CancelScope(shield=True):  # (its wake-ups must not cancel us before we say why)
        await ws._abort_web_socket()


class WriteLock:
    """A connection's write lock that any task may give back: `write_nowait` takes it on
    the pump's task when it tears a frame, and the task that finishes the frame gives it
    back. FIFO (handed to the longest waiter), as trio's own locks; `held` is a plain
    attribute, and the parking lot is made only when someone has to wait."""

    __slots__ = ("_lot", "held")

    def __init__(self) -> None:
        self.held = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    def acquire_nowait(self) -> None:
        if self.held:
            raise trio.WouldBlock
        self.held = True

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.held:
            self.held = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()  # (woken by `release`, which hands the lock over)

    def release(self) -> None:
        if self._lot:
            self._lot.unpark()  # (still held: by the task it wakes)
        else:
            self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


def _frame_ends(payloads: list[bytes]) -> set[int]:
    """The offsets in `frames(payloads)` where a frame starts or ends."""
    ends, at = {0}, 0
    for payload in payloads:
        at += len(header(len(payload))) + len(payload)
        ends.add(at)
    return ends


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
            if sock.fileno() < 0:
                return None  # (the session ended and closed the socket: the peer is gone)
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
