"""The wire format: one JSON object per WebSocket text frame, tagged by ``type``.

Server -> client::

    {"type": "welcome", "protocol": 1, "server": "userstreamd/0.1.0",
     "epoch": "9c2f...", "seq": 41, "clients": 3}
    {"type": "user", "epoch": "9c2f...", "seq": 42, "produced_at": "2026-11-27T10:00:00.123456Z",
     "source": "synthetic", "user": {...one Random User API 1.4 record...}}

``seq`` increases by one per user within an ``epoch``; the welcome's ``seq`` is the
last sequence number sent before the client joined (the next user has ``seq + 1``).

Client -> server::

    {"type": "ack", "seq": 42}       sent by consumers after their database commit

Anything else a client sends is counted and logged as a bad frame, then ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from . import __version__
from .errors import ProtocolError

PROTOCOL = 1


class Welcome(msgspec.Struct, tag="welcome", frozen=True, kw_only=True):
    protocol: int = PROTOCOL
    server: str = f"userstreamd/{__version__}"
    epoch: str
    seq: int
    clients: int


class UserMessage(msgspec.Struct, tag="user", frozen=True, kw_only=True):
    epoch: str
    seq: int
    produced_at: datetime
    source: str
    user: dict[str, Any]


class Ack(msgspec.Struct, tag="ack", frozen=True, kw_only=True):
    seq: Annotated[int, msgspec.Meta(ge=0)]


ServerMessage = Welcome | UserMessage

_encoder = msgspec.json.Encoder()
_server_decoder = msgspec.json.Decoder(ServerMessage)
_client_decoder = msgspec.json.Decoder(Ack)


def encode(message: Welcome | UserMessage | Ack) -> str:
    """Encode for a text frame."""
    return _encoder.encode(message).decode()


def decode_server(frame: str | bytes) -> Welcome | UserMessage:
    """Decode a frame a client received; ProtocolError if it is not ours."""
    try:
        return _server_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad server frame: {exc}") from None


def decode_client(frame: str | bytes) -> Ack:
    """Decode a frame a server received; ProtocolError if it is not ours."""
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    try:
        return _client_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad client frame: {exc}") from None
