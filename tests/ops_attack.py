"""The ops-port attacker of issue 22 item 20, as a separate process:
``python -m tests.ops_attack PORT COUNT``. Opens COUNT connections to 127.0.0.1:PORT
from 127.0.0.2, each with a 4 KiB receive buffer, sends 20 pipelined ``GET /metrics`` on
each and never reads; prints how many connected, then holds them until killed (its
kernel then resets them: the attacker is gone). It first raises its own open-file limit
to the hard limit: a runner whose soft limit is below COUNT would otherwise attack with
fewer connections than asked (the test checks how many connected).
"""

from __future__ import annotations

import resource
import socket
import sys

import trio

PIPELINED = 20
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * PIPELINED


async def main(port: int, count: int) -> None:
    held: list[trio.socket.SocketType] = []
    connected = 0

    async def one() -> None:
        nonlocal connected
        try:
            sock = trio.socket.socket()  # (EMFILE here is one connection fewer, not a crash)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.bind(("127.0.0.2", 0))
            with trio.move_on_after(3):
                await sock.connect(("127.0.0.1", port))
                connected += 1
                await sock.send(REQUEST)
        except OSError:
            pass  # (refused or reset: the daemon's business)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    print(connected, flush=True)
    await trio.sleep_forever()


def raise_open_file_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    raise_open_file_limit()
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
