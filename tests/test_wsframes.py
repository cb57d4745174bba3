"""The broadcaster's own framing, read back by wsproto's decoder (what clients run)."""

from __future__ import annotations

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from userstreamd.serve.wsframes import frames


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
