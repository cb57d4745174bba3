"""The broadcaster's own framing, read back by wsproto's decoder (what clients run)."""

from __future__ import annotations

import socket

import pytest
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode

from userstreamd.serve.wsframes import _send_rest, frames


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_every_length_encoding_reads_back_as_whole_text_frames(length: int) -> None:
    payloads = ["é".encode() * (length // 2) + b"a" * (length % 2), b'{"x":1}']
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(frames(payloads))
    got = list(reader.received_frames())
    assert [(f.opcode, f.message_finished, f.frame_finished) for f in got] == [
        (Opcode.TEXT, True, True)
    ] * 2
    assert [f.payload.encode() for f in got] == payloads


async def test_a_write_waiting_on_a_socket_another_task_closes_ends_as_the_peer_gone() -> None:
    """A write blocked on a full socket whose connection another task closes (the
    reader, on the peer's close) returns as a broken stream does: None, no error."""
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = trio.SocketStream(ours)
    data = memoryview(b"x" * 2**22)  # (never read by `theirs`: the write blocks)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            result: list[int | None] = []

            async def write() -> None:
                result.append(await _send_rest(stream, data, 0, trio.current_time() + 30))

            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            ours.close()
    assert result == [None]
    theirs.close()
