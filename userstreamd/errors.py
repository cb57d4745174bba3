"""The errors userstreamd raises, as one tree.

    UserstreamdError
     +-- ConfigError            the config file is missing, unreadable or invalid
     +-- SourceError            a source could not deliver users
     |    +-- SourceUnavailable     transport failure, timeout, HTTP 5xx/429
     |    +-- BadResponse           HTTP 200 that carries no usable users
     +-- InvalidRecord          one record failed validation (the rest of its batch lives on)
     +-- StoreError             PostgreSQL failed (`fault`: transient, the row, unknown)
     +-- EmbeddedPostgresError  the embedded PostgreSQL server could not be set up or started
 +-- InUseError             a port or the state directory is held by another process at
                            start: a configuration fault, never restarted
     +-- ProtocolError          a WebSocket frame that does not follow the wire format

Library exceptions (httpx, psycopg, wsproto) are mapped to these at the component
boundary with ``raise ... from exc`` so callers handle one vocabulary.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Literal


class UserstreamdError(Exception):
    """Base of every error userstreamd raises on purpose."""


class ConfigError(UserstreamdError):
    """The config file is missing, unreadable or invalid; the message names file and key."""


class SourceError(UserstreamdError):
    """A source could not deliver users. `kind` names the failure class for logs and
    counters (``timeout``, ``connect``, ``http_429``, ``http_5xx``, ``empty_results``, ...);
    `retry_after_s` is the server's ``Retry-After`` when it sent one."""

    def __init__(
        self, message: str, *, kind: str = "other", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


class SourceUnavailable(SourceError):
    """The source could not be reached or refused to answer (timeout, 5xx, 429)."""


class BadResponse(SourceError):
    """The source answered, but not with users (empty results, HTML, truncated JSON, error)."""


class InvalidRecord(UserstreamdError):
    """A record does not have the shape a row needs."""


Fault = Literal["transient", "row", "unknown"]


class StoreError(UserstreamdError):
    """PostgreSQL failed. `fault` (by SQLSTATE, `store.faults.classify`) says what retrying
    can do: ``transient`` (the server or the moment: the connection lost, the server
    read-only, down or starting, a deadlock): the batch in hand is kept and retried;
    ``row``: the row itself was refused and retrying the same row cannot succeed;
    ``unknown``: neither is known, so it is retried and logged as an error."""

    def __init__(
        self, message: str, *, fault: Fault = "transient", sqlstate: str | None = None
    ) -> None:
        super().__init__(message)
        self.fault: Fault = fault
        self.sqlstate = sqlstate

    @property
    def transient(self) -> bool:
        return self.fault == "transient"


class EmbeddedPostgresError(UserstreamdError):
    """The embedded PostgreSQL server could not be initialised or started."""


class InUseError(UserstreamdError):
    """A port or the state directory is held by another process (another userstreamd,
    most likely) at start. A restart cannot cure it: the supervisor gives up at once and
    the daemon exits 1, with this message (which names the address or the holder)."""


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """`exc` itself, or every exception inside it when it is a group (nested too)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def address_in_use(exc: BaseException) -> bool:
    """Whether `exc` (or one in it) is a bind refused because the address is taken."""
    return any(isinstance(e, OSError) and e.errno == errno.EADDRINUSE for e in leaves(exc))


def in_use_text(address: str, key: str) -> str:
    """What InUseError says about a taken port: the address, and the key that names it."""
    return (
        f"cannot listen on {address} ({key}): the address is in use by another process "
        "(another userstreamd?)"
    )


class ProtocolError(UserstreamdError):
    """A WebSocket frame that does not follow the wire format."""


def describe(exc: BaseException, *, with_type: bool = True) -> str:
    """One line for a log or a status: ``Type: message`` (the message alone without
    `with_type`, when it already says what failed), its cause in parentheses, and for an
    exception group each leaf in turn. The one way to describe an exception; a part with
    more to say (a close code's meaning) adds it around this."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e, with_type=with_type) for e in exc.exceptions)
    lines = str(exc).strip().splitlines()
    if not lines:
        text = type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]
    if exc.__cause__ is not None and not isinstance(exc.__cause__, BaseExceptionGroup):
        cause = str(exc.__cause__).strip().splitlines()
        if cause and cause[0] not in text:
            text += f" ({cause[0]})"
    return text[:500]
