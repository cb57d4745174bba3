"""What tail writes: the readable line per user, the JSON line, and text made safe for a
terminal (records and server messages are untrusted: escaped and truncated)."""

from __future__ import annotations

import contextlib
import re
from typing import TextIO

import msgspec

from ...stream.protocol import Gap, UserMessage

PROG = "userstreamd tail"

# C0 and C1 controls (ESC, CSI, newline...), line/paragraph separators, bidi controls,
# lone surrogates (unencodable).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
# In valid JSON, C0 controls only appear as whitespace outside strings.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def clean(value: object, limit: int = 80) -> str:
    """`value` as text safe for one terminal line: escapes instead of control characters,
    at most `limit` characters."""
    text = _UNSAFE.sub(_escape, value if isinstance(value, str) else str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escape(match: re.Match[str]) -> str:
    return match[0].encode("unicode_escape").decode("ascii")


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _field(user: dict[str, object], table: str, key: str) -> str | None:
    inner = user.get(table)
    return _text(inner.get(key)) if isinstance(inner, dict) else None


def _name(user: dict[str, object]) -> str | None:
    name = user.get("name")
    if isinstance(name, dict):
        parts = [_text(name.get(key)) for key in ("title", "first", "last")]
        return " ".join(p for p in parts if p) or None
    return _text(name)


def format_user(message: UserMessage) -> str:
    """One readable line: seq, name, country, age, source; "-" for what the record lacks
    (the API leaves out excluded fields)."""
    user = message.user
    name = clean(_name(user) or "-", 40)
    country = clean(_field(user, "location", "country") or "-", 24)
    age = clean(_field(user, "dob", "age") or "-", 5)
    return f"{message.seq:>7}  {name:<30}  {country:<16}  {age:>3}  {clean(message.source, 24)}"


def gap_notice(gap: Gap) -> str:
    """What a gap means for this client: the seqs it will not be sent, and why. A gap is
    this connection's, not the stream's: seqs that left the replay buffer (or that a
    cut-off group missed) were still published, and the daemon's consumers store them."""
    epoch = clean(gap.epoch, 64)
    reason = clean(gap.reason, 200)
    if gap.from_seq is None:
        return f"gap: continuing live in epoch {epoch} from seq {gap.to_seq + 1}: {reason}"
    seqs = (
        f"seq {gap.from_seq}" if gap.from_seq == gap.to_seq else f"seqs {gap.from_seq}-{gap.to_seq}"
    )
    return (
        f"gap: skipped {seqs} of epoch {epoch}, which this client will not be sent: "
        f"{reason} (skipped for this client only: the daemon's consumers still store them "
        "in PostgreSQL)"
    )


def json_line(frame: str | bytes) -> str:
    """The (valid JSON) frame as received, on one line and safe for a terminal: a frame
    with raw line breaks is re-encoded compactly, and the characters a terminal would act
    on that JSON allows raw in strings (C1 controls, DEL, separators, bidi controls) are
    written as ``\\uXXXX`` escapes. Either way it decodes to the same value."""
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    if "\n" in text or "\r" in text:
        text = msgspec.json.encode(msgspec.json.decode(text)).decode()
    return _UNSAFE_IN_JSON.sub(_json_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


def notice(err: TextIO, text: str) -> None:
    """One line on `err`; an `err` that cannot be written is no reason to stop."""
    with contextlib.suppress(OSError, ValueError):
        err.write(f"{PROG}: {text}\n")
        err.flush()
