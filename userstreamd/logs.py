"""The only place that configures structlog.

JSON lines on stdout (msgspec does the encoding), ISO UTC timestamps, tracebacks as
dicts; a console renderer when stdout is a terminal and the format is "auto".
Components bind ``component`` (and ``worker``) once when their task starts; trio gives
every task its own copy of the context, so the binding stays with that task.
"""

from __future__ import annotations

import logging
import sys
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


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """(Re)configure structlog; safe to call again on SIGHUP to change the level."""
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer())
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def bind(**fields: Any) -> None:
    """Bind fields (``component``, ``worker``) to every log line of the current task."""
    structlog.contextvars.bind_contextvars(**fields)


def get_logger() -> Any:
    return structlog.get_logger()
