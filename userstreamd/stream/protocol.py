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
"clients": 120, "sent": 51234, "slow_closes": 0, "write_timeouts": 0}``.

Anything else a client sends is counted and logged as a bad frame, then ignored.

This module owns the format: every frame type, the partial decoders the hot paths use
(`RawUser`: the record left as JSON text; `UserHead`: only what routing needs;
`FrameKind`: a frame's type and its items undecoded), the handshake's query limits and
the close codes with their meanings (`CLOSE_MEANINGS`). Nothing else defines a frame.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import msgspec

from .. import __version__
from ..errors import ProtocolError

PROTOCOL = 2

Seq = Annotated[int, msgspec.Meta(ge=0)]

# -- the handshake's query (``?epoch=E&since=S``, ``?group=NAME&window=N``, ``?batch=N``)

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # an epoch or a group
MAX_WINDOW = 100_000  # unacknowledged users a group member may hold, at most
MAX_BATCH = 1000  # users per ``users`` frame a client may ask for, at most

# -- close codes (docs/protocol.md has the table) ------------------------------------------

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_LOST = 1006
CLOSE_NOT_UTF8 = 1007
CLOSE_RATE = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TLS_FAILED = 1015
CLOSE_SLOW = 3008
CLOSE_ACK_TIMEOUT = 4000
CLOSE_GROUP_LAGGING = 4001

# What each code means, said from the client's side.
CLOSE_MEANINGS: dict[int, str] = {
    CLOSE_NORMAL: "closed by the server",
    CLOSE_GOING_AWAY: "the server is stopping",
    CLOSE_PROTOCOL_ERROR: "a frame from us broke the WebSocket protocol",
    CLOSE_LOST: "connection lost",
    CLOSE_NOT_UTF8: "a text frame from us was not UTF-8",
    CLOSE_RATE: "too many messages from us",
    CLOSE_TOO_BIG: "a message from us was too big",
    CLOSE_INTERNAL_ERROR: "server error",
    CLOSE_TRY_AGAIN_LATER: "the server is busy: try again later",
    CLOSE_SLOW: "too far behind (slow)",
    CLOSE_ACK_TIMEOUT: "acked nothing within the server's ack_timeout_s",
    CLOSE_GROUP_LAGGING: "the group fell too far behind and was cut off",
}
# Codes that only report locally what happened; never sent in a close frame.
CLOSE_NOT_SENDABLE = frozenset({CLOSE_NO_STATUS, CLOSE_LOST, CLOSE_TLS_FAILED})


def close_meaning(code: int) -> str:
    """What a close code means ("closed" for one this protocol does not define)."""
    return CLOSE_MEANINGS.get(code, "closed")


# -- frames ------------------------------------------------------------------------------


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
    write_timeouts: Annotated[int, msgspec.Meta(ge=0)] = 0
    token_lockouts: Annotated[int, msgspec.Meta(ge=0)] = 0  # its own `auth.Lockouts`'
    peer_faults: Annotated[int, msgspec.Meta(ge=0)] = 0  # every kind together


ServerMessage = Welcome | UserMessage | Users | Gap | Checkpoint

# -- partial decoders (the hot paths: decode only what they use) -------------------------


class RawUser(msgspec.Struct, tag="user", frozen=True, kw_only=True, gc=False):
    """`UserMessage` as a consumer decodes it: the record left as JSON text, to be
    validated on its own (one bad record is one rejection, not a bad frame)."""

    epoch: str
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a bigint column
    position: int
    produced_at: datetime
    source: str
    user: msgspec.Raw


class RawUsers(msgspec.Struct, tag="users", frozen=True, kw_only=True):
    items: list[RawUser]


class UserHead(msgspec.Struct):
    """What routing reads of a ``user`` frame (mirrors, outlets): the rest is kept as it
    came."""

    epoch: str
    seq: int
    position: int
    source: str


class FrameKind(msgspec.Struct):
    """A server frame's type, and for ``users`` its items undecoded (a mirror passes
    each on as it came); for a ``gap`` its seqs."""

    type: str
    items: list[msgspec.Raw] = []
    from_seq: int | None = None
    to_seq: int = 0


class TimedItem(msgspec.Struct):
    seq: int = 0
    produced_at: datetime | None = None


class TimedFrame(msgspec.Struct):
    """What a latency probe (the bench's client harness) reads of any server frame:
    its type, seq and ``produced_at``, and a ``users`` frame's items; the rest is
    skipped."""

    type: str = ""
    seq: int = 0
    produced_at: datetime | None = None
    items: list[TimedItem] = []


RawServerMessage = Welcome | RawUser | RawUsers | Gap | Checkpoint

_encoder = msgspec.json.Encoder()
_server_decoder = msgspec.json.Decoder(ServerMessage)
_client_decoder = msgspec.json.Decoder(Ack | FanoutReport)
_raw_decoder = msgspec.json.Decoder(RawServerMessage)
_raw_user_decoder = msgspec.json.Decoder(RawUser)
_head_decoder = msgspec.json.Decoder(UserHead)
decode_timed = msgspec.json.Decoder(TimedFrame).decode
_kind_decoder = msgspec.json.Decoder(FrameKind)


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


def decode_server_raw(frame: str | bytes) -> RawServerMessage:
    """`decode_server` with each record left as JSON text (`RawUser`); ProtocolError if
    the frame is not ours."""
    try:
        return _raw_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad server frame: {exc}") from None


def decode_raw_user(data: bytes) -> RawUser:
    """One ``user`` frame, its record left as JSON text; ProtocolError if it is not one."""
    try:
        return _raw_user_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not a user frame: {exc}") from None


def decode_head(data: bytes) -> UserHead:
    """What routing needs of a ``user`` frame; ProtocolError if it is not one."""
    try:
        return _head_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not a user frame: {exc}") from None


def decode_kind(frame: bytes) -> FrameKind:
    """A server frame's type (and items, undecoded); ProtocolError if it is not JSON."""
    try:
        return _kind_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad server frame: {exc}") from None
