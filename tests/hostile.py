"""Hostile and careless WebSocket clients, as a separate process: ``python -m tests.hostile
PORT``. Everything targets 127.0.0.1, from source addresses 127.0.0.2-8 (one per kind of
abuse, so per-IP limits apply to each), bounded in count and time. Prints one JSON
object: the HTTP statuses and close codes it was answered with.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter

import trio

UPGRADE = (
    "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
seen: Counter[str] = Counter()


async def tcp(port: int, ip: str = "127.0.0.1", rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.bind((ip, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (the mask applied with big-integer XOR: fast for MiBs)."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return header + mask + masked


async def upgrade(
    port: int, ip: str, target: str = "/", rcvbuf: int | None = None
) -> tuple[trio.SocketStream, bytes]:
    stream = await tcp(port, ip, rcvbuf)
    await stream.send_all(UPGRADE.format(target=target).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        head += chunk
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "none"
    seen[f"status_{status}"] += 1
    return stream, head.partition(b"\r\n\r\n")[2]


async def server_close(stream: trio.SocketStream, data: bytes = b"") -> int | str:
    """Read the server's frames until its close frame: its code; or "eof" / "reset"."""
    try:
        while True:
            while len(data) >= 2:
                opcode, n, start = data[0] & 0x0F, data[1] & 0x7F, 2
                if n == 126:
                    n, start = int.from_bytes(data[2:4], "big"), 4
                elif n == 127:
                    n, start = int.from_bytes(data[2:10], "big"), 10
                if len(data) < start + n:
                    break
                if opcode == 0x8:
                    return int.from_bytes(data[start : start + 2], "big")
                data = data[start + n :]
            chunk = await stream.receive_some(65536)
            if not chunk:
                return "eof"
            data += chunk
    except trio.BrokenResourceError:
        return "reset"


async def close_code(stream: trio.SocketStream, pending: bytes = b"") -> None:
    """Read server frames until a close frame or EOF (10 s at most); count its code."""
    with trio.move_on_after(10):
        code = await server_close(stream, pending)
        seen[f"close_{code}" if isinstance(code, int) else code] += 1
    await stream.aclose()


async def send_then_close_code(port: int, ip: str, *frames: bytes) -> None:
    stream, rest = await upgrade(port, ip)
    try:
        for f in frames:
            await stream.send_all(f)
    except trio.BrokenResourceError:
        seen["send_refused"] += 1
    await close_code(stream, rest)


async def half_open(port: int, count: int) -> None:
    """`count` connections that send half a request and wait (the per-IP limit and the
    handshake timeout deal with them)."""
    streams = []
    for _ in range(count):
        stream = await tcp(port, "127.0.0.2")
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        streams.append(stream)
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(answer, stream)


async def answer(stream: trio.SocketStream) -> None:
    """Whatever the server answers a half-sent request: an HTTP status, or just EOF."""
    data = b""
    with trio.move_on_after(10):
        try:
            while chunk := await stream.receive_some(4096):
                data += chunk
        except trio.BrokenResourceError:
            seen["reset"] += 1
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "none"
    seen[f"half_open_{status}"] += 1
    await stream.aclose()


async def closed_early(port: int, count: int) -> None:
    for n in range(count):
        stream = await tcp(port, "127.0.0.3")
        if n % 2:
            await stream.send_all(UPGRADE.format(target="/").encode())
        stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await stream.aclose()  # RST: the server finds a connection already gone


async def malformed(port: int) -> None:
    for target in [
        "//[x",
        "/nope",
        "/?since=x",
        "/?epoch=e&since=1&since=2",
        "/?group=db",
        "/?x=<script>",
    ]:
        for _ in range(20):
            stream, _ = await upgrade(port, "127.0.0.4", target)
            await stream.aclose()


async def bad_frames(port: int) -> None:
    ip = "127.0.0.5"
    await send_then_close_code(port, ip, frame(b"x" * 2**20))
    await send_then_close_code(port, ip, frame(b"x" * 16 * 2**20))
    await send_then_close_code(port, ip, frame(b"\xff\xfe invalid utf-8"))
    await send_then_close_code(port, ip, *[frame(b'{"type":"ack","seqs":[1]}')] * 500)
    await send_then_close_code(port, ip, *[frame(b'{"type":"launch"}'), frame(b"\x00", 0x2)] * 3)


async def never_read(port: int, count: int, seconds: float) -> None:
    streams = [(await upgrade(port, "127.0.0.6", rcvbuf=4096))[0] for _ in range(count)]
    await trio.sleep(seconds)
    for stream in streams:
        await stream.aclose()


async def silent_member(port: int) -> None:
    stream, rest = await upgrade(port, "127.0.0.7", "/?group=audit&window=50")
    await stream.send_all(frame(b'{"type":"ack","seqs":[999999999]}'))  # never delivered
    await close_code(stream, rest)  # never acks: evicted with 4000


async def main(port: int) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(half_open, port, 500)
            nursery.start_soon(closed_early, port, 200)
            nursery.start_soon(malformed, port)
            nursery.start_soon(bad_frames, port)
            nursery.start_soon(never_read, port, 100, 15.0)
            nursery.start_soon(silent_member, port)
    print(json.dumps(dict(seen)))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
