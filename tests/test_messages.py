"""Golden frames: the wire format, byte for byte. A change here breaks every client, so
it must be deliberate (and bump `PROTOCOL`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from userstreamd import __version__
from userstreamd.errors import ProtocolError
from userstreamd.stream.protocol import (
    Ack,
    Checkpoint,
    Gap,
    UserMessage,
    Welcome,
    decode_client,
    decode_server,
    encode,
)

GOLDEN = [
    (
        Welcome(epoch="9c2f41d0a1b2c3d4", seq=41, clients=3),
        '{"type":"welcome","protocol":2,"server":"userstreamd/' + __version__ + '",'
        '"epoch":"9c2f41d0a1b2c3d4","seq":41,"clients":3,"group":null}',
    ),
    (
        UserMessage(
            epoch="9c2f41d0a1b2c3d4",
            seq=42,
            position=42,
            produced_at=datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC),
            source="synthetic",
            user={"gender": "female", "name": {"first": "Laura", "last": "Woods"}},
        ),
        '{"type":"user","epoch":"9c2f41d0a1b2c3d4","seq":42,"position":42,'
        '"produced_at":"2026-11-27T10:00:00.123456Z","source":"synthetic",'
        '"user":{"gender":"female","name":{"first":"Laura","last":"Woods"}}}',
    ),
    (
        Gap(epoch="9c2f41d0a1b2c3d4", from_seq=43, to_seq=10041, reason="gone"),
        '{"type":"gap","epoch":"9c2f41d0a1b2c3d4","from_seq":43,"to_seq":10041,"reason":"gone"}',
    ),
    (
        Gap(epoch="9c2f41d0a1b2c3d4", from_seq=None, to_seq=7, reason="unknown epoch"),
        '{"type":"gap","epoch":"9c2f41d0a1b2c3d4","from_seq":null,"to_seq":7,'
        '"reason":"unknown epoch"}',
    ),
    (
        Checkpoint(group="db", epoch="9c2f41d0a1b2c3d4", seq=40, position=40),
        '{"type":"checkpoint","group":"db","epoch":"9c2f41d0a1b2c3d4","seq":40,"position":40}',
    ),
]


@pytest.mark.parametrize(("message", "frame"), GOLDEN)
def test_server_frames_are_exactly_these(message: object, frame: str) -> None:
    assert encode(message) == frame  # type: ignore[arg-type]
    assert decode_server(frame) == message


def test_an_ack_is_exactly_this() -> None:
    assert encode(Ack(seqs=[42, 45, 46])) == '{"type":"ack","seqs":[42,45,46]}'
    assert decode_client('{"type":"ack","seqs":[42,45,46]}') == Ack(seqs=[42, 45, 46])


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"ack","seqs":[-1]}',
        '{"type":"ack"}',
        '{"type":"welcome","epoch":"e","seq":1,"clients":1}',
        "[1,2]",
        "not json",
        b'{"type":"ack","seqs":[1]}',
    ],
)
def test_anything_else_from_a_client_is_a_protocol_error(frame: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_client(frame)
