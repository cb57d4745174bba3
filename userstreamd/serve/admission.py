"""The handshake decision: who is asking, for what, and whether they may have it.

No sockets here: `admit` takes the request target and headers of a WebSocket upgrade
and returns an `Admission` or raises `Refused` with the HTTP status to answer with.
Checks, in order: path (404), query (400), Origin (403), token (401), permission (403).

The query accepts exactly these keys, each at most once: ``epoch`` and ``since``
(resume after that seq; both or neither), ``group`` and ``window`` (join a consumer
group, holding at most ``window`` unacknowledged users), ``batch`` (at most that many
users per frame, in ``users`` frames; 1, the default, is one ``user`` per frame) and
``token`` (for browsers).
The daemon's own group (``consumers.group``) is joined only through the private
socket; on the public port it is refused whatever the token says.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from ..stream.protocol import MAX_BATCH, MAX_WINDOW, NAME
from .auth import Tokens

MAX_TARGET_CHARS = 2048
_QUERY_KEYS = frozenset({"epoch", "since", "group", "window", "batch", "token"})


class Refused(Exception):
    """The handshake is answered with `status` and `reason` (sent as the body)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class WrongToken(Refused):
    """A token was presented and matches none (401): counted against the address."""


@dataclass(frozen=True)
class Admission:
    group: str | None
    window: int
    since: tuple[str, int] | None
    who: str  # the token's name; "anonymous" without one; "private" on the private socket
    batch: int = 1  # users per frame at most (above 1: ``users`` frames)


@dataclass(frozen=True)
class Policy:
    tokens: Tokens
    own_group: str
    groups: frozenset[str]
    allow_ad_hoc_groups: bool = False
    allowed_origins: frozenset[str] = frozenset()
    default_window: int = 1000


def _query(target: str) -> dict[str, str]:
    if len(target) > MAX_TARGET_CHARS:
        raise Refused(414, f"request target longer than {MAX_TARGET_CHARS} characters")
    try:
        parts = urlsplit(target)
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise Refused(400, f"unparseable request target: {exc}") from None
    if parts.path != "/" or parts.scheme or parts.netloc or parts.fragment:
        raise Refused(404, "not found: the stream is at /")
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise Refused(400, f"unknown query parameter {key[:32]!r}")
        if key in query:
            raise Refused(400, f"query parameter {key!r} given twice")
        query[key] = value
    return query


def _int(query: dict[str, str], key: str, low: int, high: int) -> int | None:
    if key not in query:
        return None
    value = query[key]
    if (
        not value.isascii()
        or not value.isdigit()
        or len(value) > 19
        or not low <= int(value) <= high
    ):
        raise Refused(400, f"{key} must be an integer from {low} to {high}")
    return int(value)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v for k, v in headers if k.lower() == name]
    if len(values) > 1:
        raise Refused(400, f"{name.decode()} header given twice")
    return values[0].decode("latin-1") if values else None


def admit(
    target: str, headers: list[tuple[bytes, bytes]], policy: Policy, *, private: bool
) -> Admission:
    """Decide on one upgrade request (raises Refused)."""
    query = _query(target)
    since_seq = _int(query, "since", 0, 2**63 - 1)
    epoch = query.get("epoch")
    if (since_seq is None) != (epoch is None):
        raise Refused(400, "epoch and since go together")
    if epoch is not None and not NAME.match(epoch):
        raise Refused(400, "epoch must be 1-64 letters, digits, '_', '.' or '-'")
    group = query.get("group")
    if group is not None and not NAME.match(group):
        raise Refused(400, "group must be 1-64 letters, digits, '_', '.' or '-'")
    window = _int(query, "window", 1, MAX_WINDOW)
    if window is not None and group is None:
        raise Refused(400, "window is for group members (?group=NAME)")
    if group is not None and since_seq is not None:
        raise Refused(400, "group members do not resume by seq: the group keeps their place")
    since = (epoch, since_seq) if epoch is not None and since_seq is not None else None
    batch = _int(query, "batch", 1, MAX_BATCH) or 1
    admission = Admission(group, window or policy.default_window, since, "private", batch)
    if private:
        return admission
    origin = _header(headers, b"origin")
    allowed = policy.allowed_origins
    if origin is not None and "*" not in allowed and origin.lower() not in allowed:
        raise Refused(403, "origin not allowed (broadcaster.allowed_origins)")
    who = "anonymous"
    token = None
    if policy.tokens.required:
        presented = _bearer(headers) or query.get("token")
        token = policy.tokens.find(presented) if presented else None
        if token is None:
            if presented:
                raise WrongToken(401, "a valid token is required")
            raise Refused(401, "token required")
        who = token.name
    if group is None:
        if token is not None and not token.may_read():
            raise Refused(403, f"token {who!r} may not read the stream")
    else:
        if group == policy.own_group:
            raise Refused(403, f"group {group!r} is the daemon's own; it is not served here")
        if group not in policy.groups and not policy.allow_ad_hoc_groups:
            raise Refused(403, f"unknown group {group!r} (broadcaster.groups)")
        if token is not None and not token.may_join(group):
            raise Refused(403, f"token {who!r} may not join group {group!r}")
    return Admission(group, admission.window, since, who, batch)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    value = _header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Refused(401, "Authorization must be 'Bearer TOKEN'")
    return credentials.strip()
