"""The only place that configures structlog.

JSON lines on stdout (msgspec does the encoding), ISO UTC timestamps, tracebacks as
dicts; a console renderer when stdout is a terminal and the format is "auto", in colour
only on a terminal and never when ``NO_COLOR`` is set.

Lines never tear: each one, however long, is written with one ``write()`` (looping only
on a partial write), under a lock for the threads. Child processes do not share our
stdout: they log JSON into a pipe and `forward` writes their lines whole, so lines of
several processes never interleave, on a terminal, a pipe or the journal.
Components bind ``component`` (and ``worker``) once when their task starts; trio gives
every task its own copy of the context, so the binding stays with that task.

Secrets stay out: tracebacks carry no frame locals; every rendered line passes through
`redact`, which masks the secrets registered with `add_secrets` (the database password,
the tokens), the password in any DSN (``user:PASSWORD@``, ``password=PASSWORD``) and any
``token=`` query parameter. Other libraries' stdlib log records (warnings and above)
come out as the same JSON lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

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


def dsn_secrets(dsn: str) -> list[str]:
    """The password written into a DSN, if any (to pass to `add_secrets`)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return [str(conninfo_to_dict(dsn).get("password") or "")]
    except Exception:  # a DSN psycopg cannot parse: the patterns in `redact` still apply
        return []


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


class _LineWriter:
    """Writes each line with one ``write()`` call: lines of several writers never mix."""

    def __init__(self, stream: IO[str]) -> None:
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError):  # not a file (a test's capture): its own write()
            self._fd = None
        self._stream = stream
        self._lock = threading.Lock()
        self.through: Callable[[str], None] | None = None  # (see `logs_through`)

    def write(self, line: bytes) -> None:
        with self._lock:
            try:
                if self.through is not None:
                    self.through(line.decode("utf-8", "replace").rstrip("\n"))
                    return
                if self._fd is None:
                    self._stream.write(line.decode("utf-8", "replace"))
                    self._stream.flush()
                    return
                view = memoryview(line)
                while view:
                    try:
                        view = view[os.write(self._fd, view) :]
                    except BlockingIOError:  # someone made our stdout non-blocking
                        select.select([], [self._fd], [])
            except (OSError, ValueError):
                pass  # nobody reads our logs any more (a closed pipe, a hung-up terminal,
                # a full disk): the daemon lives on


class _OneWriteLogger:
    """A structlog logger: the rendered line plus its newline, in one write."""

    def __init__(self, writer: _LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str | bytes) -> None:
        data = message if isinstance(message, bytes) else message.encode("utf-8", "replace")
        self._writer.write(data + b"\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _timestamp(logger: Any, method: str, event: Any) -> Any:
    """ISO UTC timestamp, unless the line already has one (a child's, forwarded)."""
    return event if "timestamp" in event else _stamp(logger, method, event)


_writer: _LineWriter | None = None
_console = False
_sentences: dict[str, Callable[[Mapping[str, Any]], str]] = {}
_CONSOLE_KEEPS = ("timestamp", "level", "event", "component", "worker")


def say_on_console(event: str, sentence: Callable[[Mapping[str, Any]], str]) -> None:
    """On the console, `event` reads as ``event: <sentence made from its fields>`` instead
    of its fields as key=value pairs (for an event with many, such as ``daemon.stats``).
    JSON lines keep every field."""
    _sentences[event] = sentence


def _in_words(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    sentence = _sentences.get(event.get("event", ""))
    if sentence is None:
        return event
    try:
        said = sentence(event)
    except Exception:  # a log line is never a reason to stop: then the fields as they are
        return event
    kept = {key: event[key] for key in _CONSOLE_KEEPS if key in event}
    kept["event"] = f"{event['event']}: {said}"
    return kept


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: IO[str] | None = None
) -> None:
    """(Re)configure structlog to write to `stream` (stdout by default: the commands that
    print results log to stderr); safe to call again on SIGHUP to change the level."""
    global _writer, _console
    stream = sys.stdout if stream is None else stream
    tty = stream.isatty()
    _console = console = fmt == "console" or (fmt == "auto" and tty)
    _writer = writer = _LineWriter(stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    if console:
        colors = tty and not os.environ.get("NO_COLOR")
        processors.append(_in_words)
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=colors, exception_formatter=structlog.dev.plain_traceback
            )
        )
    else:
        processors += [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
    processors.append(_redact_rendered)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _OneWriteLogger(writer),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(logging.WARNING)


@contextlib.contextmanager
def logs_through(write: Callable[[str], None]) -> Iterator[None]:
    """While inside, every log line (without its newline) goes to `write` instead of the
    output stream: a live display on the same terminal (bench's progress rows) draws each
    line above itself, where a line written behind its back would break its redrawing."""
    writer = _writer
    if writer is None:  # (logging not configured: nothing would be written anyway)
        yield
        return
    before, writer.through = writer.through, write
    try:
        yield
    finally:
        writer.through = before


_decode_line = msgspec.json.Decoder(dict[str, Any])


def forward(line: bytes, **context: Any) -> None:
    """One line a child process wrote (without its newline). Its JSON log lines pass
    through whole (rendered for the console when we log to one); any other output (a
    crash before its logging started) becomes a ``child.output`` line with `context`."""
    try:
        event = _decode_line.decode(line)
    except msgspec.DecodeError:
        get_logger().warning(
            "child.output", line=line.decode("utf-8", "replace").rstrip(), **context
        )
        return
    if _writer is not None and not _console:
        _writer.write(redact(line.decode("utf-8", "replace")).encode() + b"\n")
        return
    level = _LEVELS.get(str(event.pop("level", "info")), logging.INFO)
    name = str(event.pop("event", "child.log"))
    get_logger().log(level, name, **event)


def bind(**fields: Any) -> None:
    """Bind fields (``component``, ``worker``) to every log line of the current task."""
    structlog.contextvars.bind_contextvars(**fields)


def get_logger() -> Any:
    return structlog.get_logger()
