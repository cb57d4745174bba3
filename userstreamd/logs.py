"""The only place that configures structlog.

JSON lines on stdout (msgspec does the encoding), ISO UTC timestamps, tracebacks as
dicts; a console renderer when stdout is a terminal and the format is "auto".
Components bind ``component`` (and ``worker``) once when their task starts; trio gives
every task its own copy of the context, so the binding stays with that task.

Secrets stay out: tracebacks carry no frame locals; every rendered line passes through
`redact`, which masks the secrets registered with `add_secrets` (the database password,
the tokens), the password in any DSN (``user:PASSWORD@``, ``password=PASSWORD``) and any
``token=`` query parameter. Other libraries' stdlib log records (warnings and above)
come out as the same JSON lines.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import msgspec
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_encoder = msgspec.json.Encoder(enc_hook=str)


def _serialize(event: dict[str, Any], **_: Any) -> bytes:
    return _encoder.encode(event)


_secrets: set[str] = set()
_PATTERNS = (
    re.compile(r"(?P<keep>://[^:/@\s\"]+:)[^@\s\"]+(?=@)"),  # scheme://user:PASSWORD@
    re.compile(r"(?P<keep>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s\"']+)", re.I),
    re.compile(r"(?P<keep>[?&]token=)[^&\s\"]+"),
)


def add_secrets(*secrets: str | None) -> None:
    """Mask these strings wherever they would appear in a log line."""
    for secret in filter(None, secrets):
        _secrets.update({secret, _encoder.encode(secret).decode()[1:-1]})  # as JSON escapes it


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern in _PATTERNS:
        text = pattern.sub(r"\g<keep>***", text)
    return text


def _redact_rendered(_: Any, __: str, line: str | bytes) -> str | bytes:
    if isinstance(line, bytes):
        return redact(line.decode("utf-8", "replace")).encode()
    return redact(line)


class _ToStructlog(logging.Handler):
    """Other libraries' stdlib log records, as our JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger().log(
            record.levelno, "library.log", logger=record.name, message=record.getMessage()
        )


class Throttle:
    """At most `per_interval` lines per key every `interval_s`; the next line allowed
    reports how many were suppressed meanwhile (for events strangers can cause)."""

    def __init__(self, per_interval: int = 5, interval_s: float = 10.0) -> None:
        self.per_interval, self.interval_s = per_interval, interval_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # start, logged, suppressed

    def allow(self, key: str) -> int | None:
        """None: drop this line; else log it with this many suppressed before it."""
        now = time.monotonic()
        start, logged, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.interval_s:
            start, logged = now, 0
        if logged >= self.per_interval:
            self._windows[key] = (start, logged, suppressed + 1)
            return None
        self._windows[key] = (start, logged + 1, 0)
        return suppressed

    def log(self, key: str, level: str, event: str, **fields: Any) -> None:
        """Log `event` at `level` unless `key` is over its budget (with ``suppressed``)."""
        if (suppressed := self.allow(key)) is not None:
            getattr(structlog.get_logger(), level)(event, suppressed=suppressed, **fields)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """(Re)configure structlog; safe to call again on SIGHUP to change the level."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        )
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    processors.append(_redact_rendered)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(logging.WARNING)


def bind(**fields: Any) -> None:
    """Bind fields (``component``, ``worker``) to every log line of the current task."""
    structlog.contextvars.bind_contextvars(**fields)


def get_logger() -> Any:
    return structlog.get_logger()
