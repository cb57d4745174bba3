"""The wire format: one JSON object per WebSocket text frame, tagged by ``type``.

Connect to ``ws://HOST:PORT/`` for the plain broadcast, optionally resuming with
``?epoch=E&since=S`` (S = the last seq you received), or join a consumer group with
``?group=NAME`` (each user goes to one member of each group; members ``ack``).

Server -> client::

    {"type": "welcome", "protocol": 2, "server": "userstreamd/0.1.0",
     "epoch": "9c2f...", "seq": 41, "clients": 3, "group": null}
    {"type": "user", "epoch": "9c2f...", "seq": 42, "position": 42,
     "produced_at": "2026-11-27T10:00:00.123456Z", "source": "synthetic", "user": {...}}
    {"type": "gap", "epoch": "9c2f...", "from_seq": 3, "to_seq": 1041,
     "reason": "no longer in the replay buffer"}
    {"type": "checkpoint", "group": "db", "epoch": "9c2f...", "seq": 40, "position": 40}
    {"type": "users", "items": [{"type": "user", "seq": 43, ...}, {"type": "user", ...}]}

``seq`` increases by one per user within an ``epoch``; ``position`` is the user's place
in its source (replayable). The welcome's ``seq`` is where the stream stands: a plain
client's next user is ``seq + 1`` unless it resumed. ``gap`` says which seqs a resuming
client will never get (``from_seq`` null: an unknown epoch). ``checkpoint`` tells group
members the group's watermark: every seq up to it is committed by some member.

``users`` carries several user messages, in seq order, in one frame. Only a client that
asked for it at the handshake (``?batch=N``: at most N users per frame) ever gets one;
the daemon's own consumers always ask. Everyone else gets one ``user`` per frame.

Client -> server::

    {"type": "ack", "seqs": [42, 45, 46]}    group members, after their database commit

The daemon's own consumers (on the private socket) add what the metrics need: the seqs
they set aside instead of storing (``rejected``: invalid, or refused by the database and
dead-lettered) and, once per batch, ``batch``: ``{"rows": 500, "inserted": 498,
"commit_s": 0.012}``. Elsewhere both are ignored. A fan-out worker (see `fanout`) reports
its own clients there, every second: ``{"type": "fanout", "worker": 1, "pid": 4242,
"clients": 120, "sent": 51234, "slow_closes": 0}``.

Anything else a client sends is counted and logged as a bad frame, then ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from .. import __version__
from ..errors import ProtocolError

PROTOCOL = 2

Seq = Annotated[int, msgspec.Meta(ge=0)]


class Welcome(msgspec.Struct, tag="welcome", frozen=True, kw_only=True):
    protocol: int = PROTOCOL
    server: str = f"userstreamd/{__version__}"
    epoch: str
    seq: int
    clients: int
    group: str | None = None


class UserMessage(msgspec.Struct, tag="user", frozen=True, kw_only=True):
    epoch: str
    seq: int
    position: int
    produced_at: datetime
    source: str
    user: dict[str, Any]  # (the hub may be given it pre-encoded: msgspec.Raw)


class Users(msgspec.Struct, tag="users", frozen=True, kw_only=True):
    items: list[UserMessage]


class Gap(msgspec.Struct, tag="gap", frozen=True, kw_only=True):
    epoch: str
    from_seq: int | None
    to_seq: int
    reason: str


class Checkpoint(msgspec.Struct, tag="checkpoint", frozen=True, kw_only=True):
    group: str
    epoch: str
    seq: int
    position: int


class Batch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rows: Annotated[int, msgspec.Meta(ge=0)]
    inserted: Annotated[int, msgspec.Meta(ge=0)]
    commit_s: Annotated[float, msgspec.Meta(ge=0)]


class Ack(msgspec.Struct, tag="ack", frozen=True, kw_only=True, omit_defaults=True):
    seqs: list[Seq]
    rejected: list[Seq] = []
    batch: Batch | None = None


class FanoutReport(msgspec.Struct, tag="fanout", frozen=True, kw_only=True):
    """A fan-out worker's own counts (since its process started), for the daemon's metrics."""

    worker: Annotated[int, msgspec.Meta(ge=1)]
    pid: int
    clients: Annotated[int, msgspec.Meta(ge=0)]
    sent: Annotated[int, msgspec.Meta(ge=0)]
    slow_closes: Annotated[int, msgspec.Meta(ge=0)]


ServerMessage = Welcome | UserMessage | Users | Gap | Checkpoint

_encoder = msgspec.json.Encoder()
_server_decoder = msgspec.json.Decoder(ServerMessage)
_client_decoder = msgspec.json.Decoder(Ack | FanoutReport)


def encode(message: Welcome | UserMessage | Gap | Checkpoint | Ack | FanoutReport) -> str:
    """Encode for a text frame."""
    return _encoder.encode(message).decode()


def users_frame(frames: list[bytes]) -> bytes:
    """One ``users`` frame from encoded ``user`` frames (no decoding, no re-encoding)."""
    return b'{"type":"users","items":[' + b",".join(frames) + b"]}"


GAP_PREFIX = b'{"type":"gap"'  # how an encoded `Gap` starts (the tag comes first)


def hole_frame(epoch: str, seq: int, reason: str) -> bytes:
    """A `Gap` over the one seq of a message that is not a user, in its place in the
    stream (the NATS bus: something else published on the stream's subject)."""
    return _encoder.encode(Gap(epoch=epoch, from_seq=seq, to_seq=seq, reason=reason))


def decode_server(frame: str | bytes) -> Welcome | UserMessage | Users | Gap | Checkpoint:
    """Decode a frame a client received; ProtocolError if it is not ours."""
    try:
        return _server_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad server frame: {exc}") from None


def decode_client(frame: str | bytes) -> Ack | FanoutReport:
    """Decode a frame a server received; ProtocolError if it is not ours."""
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    try:
        return _client_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad client frame: {exc}") from None
