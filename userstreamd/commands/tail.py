"""``userstreamd tail``: the stream in a terminal, one line per user.

::

    $ userstreamd tail
    userstreamd tail: connected to ws://127.0.0.1:8765/: epoch 9c2f..., stream at seq 41
         42  Ms Jane Doe                   Norway            31  synthetic

Users go to ``out`` (stdout), one line each, flushed, so ``| grep`` and ``| head -3``
work; with ``json_lines`` each ``user`` frame is printed as received (`json_line`), one
JSON object per line, for ``jq``. Notices (connected, gap, disconnected, bad frames) go
to ``err`` (stderr), one line each, never to ``out``.

**No gap, no duplicate.** tail remembers the last (epoch, seq) it printed and, after any
disconnect (the server stopping, a refused connection, a daemon restart), reconnects with
``?epoch=E&since=S`` (capped exponential backoff with jitter), so the output goes on right
after the last line printed. A user at or below that seq of the same epoch is dropped.
What the server can no longer replay it announces with a ``gap``, which is reported.
``since`` without ``epoch`` means "after that seq of the current epoch": the first
welcome says which epoch that is, and tail reconnects from there.

**Group members** (``group``) get their share of the users and ack each one once it is
written and flushed. The group keeps a member's place (it redelivers what was not acked),
so they do not resume by seq.

**Untrusted input.** In the readable mode every field is escaped (control characters,
line separators, bidi overrides) and truncated, so a record cannot forge lines or repaint
the terminal. A frame that is not ours is reported (throttled) and skipped.

Output is written synchronously: a reader that stops reading (a paused pager) stops tail
too, until the server drops it as dead or too slow; tail then resumes where it stopped.

Exit codes: 0 on SIGINT or SIGTERM, and when ``out`` is a closed pipe; 1 when the server
refuses the handshake for a reason retrying cannot fix (HTTP 400, 401, 403, 404, 414), the
TLS certificate is not trusted, or ``out`` fails otherwise; 2 for invalid arguments.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import ssl
import sys
import threading
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ..errors import ProtocolError
from ..logs import Throttle, redact
from ..serve.admission import MAX_WINDOW, NAME
from ..serve.broadcaster import (
    CLOSE_ACK_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_GROUP_LAGGING,
    CLOSE_RATE,
    CLOSE_SLOW,
    CLOSE_TOO_BIG,
)
from ..stream.client import open_ws
from ..stream.protocol import Ack, Gap, UserMessage, Welcome, decode_server, encode

PROG = "userstreamd tail"
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
RETRY_NOTICE_S = 30.0  # while the server stays unreachable, one notice this often
ANNOUNCE_AFTER_S = 0.5  # a connection that lasts this long (or carries a frame) is "up"
PING_INTERVAL_S = 15.0
PONG_TIMEOUT_S = 15.0
ACK_INTERVAL_S = 0.2  # acks go out in batches, well under the server's message rate
ACK_CHUNK = 4096
FINAL_ACK_S = 1.0
RECENT_SEQS = MAX_WINDOW  # what a group member remembers printing (its largest window)
FINAL_STATUSES = frozenset({400, 401, 403, 404, 414})  # retrying will not change them
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_TOKEN = re.compile(r"^[!-~]+$")  # what a token file may hold (auth._TOKEN)
# C0 and C1 controls (ESC, CSI, newline...), line/paragraph separators, bidi controls,
# lone surrogates (unencodable).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
# In valid JSON, C0 controls only appear as whitespace outside strings.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_CLOSE_CODES = {
    1000: "closed by the server",
    CLOSE_GOING_AWAY: "the server is stopping",
    1006: "connection lost",
    CLOSE_RATE: "too many messages from us",
    CLOSE_TOO_BIG: "a message from us was too big",
    1011: "server error",
    CLOSE_SLOW: "too far behind (slow)",
    CLOSE_ACK_TIMEOUT: "acked nothing within the server's ack_timeout_s",
    CLOSE_GROUP_LAGGING: "the group fell too far behind and was cut off",
}


class _Fatal(Exception):
    """Retrying will not help: say why (one line) and exit with EXIT_FAILED."""


class _OutputClosed(Exception):
    """``out`` cannot be written to; `quiet` when it is a closed pipe (``| head``)."""

    def __init__(self, message: str, *, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


class _DeadServer(Exception):
    """The server did not answer a ping in time."""


class _Restart(Exception):
    """Reconnect at once, with the cursor just set (``since`` without ``epoch``)."""


# -- the readable line ------------------------------------------------------------------


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


# -- describing what went wrong -----------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return "connection lost"
        gloss = _CLOSE_CODES.get(reason.code, "closed")
        detail = f": {clean(reason.reason, 120)}" if reason.reason else ""
        return f"{gloss} ({reason.code}{detail})"
    if isinstance(exc, ConnectionRejected):
        return f"refused with HTTP {exc.status_code}{_body(exc)}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return clean(exc.strerror, 200)
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:  # trio's connect
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.errno:
        return clean(f"{exc} ({os.strerror(cause.errno)})", 200)
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text = f"{text} ({cause})"
    return clean(text, 200)


def _body(exc: ConnectionRejected) -> str:
    body = exc.body.decode("utf-8", "replace").strip() if exc.body else ""
    return f": {clean(body, 200)}" if body else ""


def _untrusted_certificate(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A nursery's group holding one plain exception: that exception (else the group)."""
    if len(group.exceptions) == 1:
        only = group.exceptions[0]
        if not isinstance(only, BaseExceptionGroup | trio.Cancelled):
            return only
    return group


_RETRY = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    trio.TooSlowError,
    trio.BrokenResourceError,
    _DeadServer,
)


def _notice(err: TextIO, text: str) -> None:
    """One line on `err`; an `err` that cannot be written is no reason to stop."""
    with contextlib.suppress(OSError, ValueError):
        err.write(f"{PROG}: {text}\n")
        err.flush()


class _RecentSeqs:
    """The last `limit` seqs printed (a group member's are not consecutive)."""

    def __init__(self, limit: int = RECENT_SEQS) -> None:
        self.limit = limit
        self._order: deque[int] = deque()
        self._seqs: set[int] = set()

    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def add(self, seq: int) -> None:
        self._order.append(seq)
        self._seqs.add(seq)
        if len(self._order) > self.limit:
            self._seqs.discard(self._order.popleft())

    def clear(self) -> None:
        self._order.clear()
        self._seqs.clear()


# -- the client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TailStatistics:
    printed: int  # users written to out
    dropped: int  # duplicates not printed again
    bad_frames: int  # frames that were not ours, skipped
    connections: int  # welcomes received
    failed_attempts: int  # connections that failed or ended, in total


class Tail:
    """One `run` of the command: the cursor, the connection loop, the output."""

    def __init__(
        self,
        url: str,
        out: TextIO,
        err: TextIO,
        *,
        json_lines: bool = False,
        since: int | None = None,
        epoch: str | None = None,
        group: str | None = None,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url, self.out, self.err = url, out, err
        self.json_lines, self.group = json_lines, group
        self.token, self.ca_file = token, ca_file
        # The place in the stream: the last seq printed (or known lost) of `epoch`.
        self.epoch = epoch
        self.cursor = since if epoch is not None else None
        self.start_after = since if epoch is None else None
        self.printed = self.dropped = self.bad_frames = 0
        self.connections = self.failed_attempts = 0
        self._recent = _RecentSeqs()
        self._acks: list[int] = []
        self._acks_due = trio.Event()
        self._throttle = Throttle(per_interval=5, interval_s=10.0)
        self._failures = 0  # attempts since the last announced connection
        self._up = False  # the current connection was announced
        self._pending: str | None = None  # its announcement, until it proves itself
        self._reported_at = -RETRY_NOTICE_S
        self._stopping = self._in_session = False
        self._attempt_scope = trio.CancelScope()  # connecting, and the pause between attempts
        self._session_scope = trio.CancelScope()  # a connection's work (not its close)
        self._shown_url = clean(redact(url), 200)

    def statistics(self) -> TailStatistics:
        return TailStatistics(
            self.printed, self.dropped, self.bad_frames, self.connections, self.failed_attempts
        )

    # -- output --------------------------------------------------------------------------

    def notice(self, text: str) -> None:
        self._announce()
        _notice(self.err, text)

    def _announce(self) -> None:
        """Say "connected" once the connection proves itself (a frame after the welcome,
        or ANNOUNCE_AFTER_S): one that a stopping server closes at once is a failed
        attempt, not a connection and a disconnect."""
        if self._pending is not None:
            text, self._pending = self._pending, None
            self._up, self._failures = True, 0
            _notice(self.err, text)

    def _write(self, line: str) -> None:
        try:
            try:
                self.out.write(line + "\n")
            except UnicodeEncodeError:  # a terminal that is not UTF-8
                encoding = getattr(self.out, "encoding", None) or "ascii"
                self.out.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise _OutputClosed("output closed", quiet=True) from None
        except (OSError, ValueError) as exc:
            raise _OutputClosed(f"cannot write the output: {exc}", quiet=False) from None

    # -- the connection loop -------------------------------------------------------------

    def target(self) -> str:
        """The URL to connect to now: resuming after the cursor, or joining the group."""
        parts = urlsplit(self.url)
        query = [
            (key, value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in ("epoch", "since", "group")
        ]
        if self.group is not None:
            query.append(("group", self.group))
        elif self.epoch is not None and self.cursor is not None:
            query += [("epoch", self.epoch), ("since", str(self.cursor))]
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Leave: `run` closes the connection properly (sending the last acks) and returns.
        (Cancelling `run` also stops it, but the close then waits out its timeout: the
        connection's reader is cancelled too, so the server's reply goes unread.)"""
        self._stopping = True
        if self._in_session:
            self._session_scope.cancel()
        else:
            self._attempt_scope.cancel()

    async def run(self) -> None:
        """Follow the stream until `stop` or cancellation; _Fatal or _OutputClosed end it."""
        delay = RECONNECT_MIN_S
        while not self._stopping:
            printed = self.printed
            self._attempt_scope = trio.CancelScope()
            with self._attempt_scope:
                if not await self._attempt():
                    continue  # (the restart of `since` without `epoch`: at once)
                if self._stopping:
                    return
                if self.printed > printed:  # it carried users: the backoff starts over
                    delay = RECONNECT_MIN_S
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(RECONNECT_MAX_S, delay * 2)

    async def _attempt(self) -> bool:
        """One connection, from connecting to its end (reported); False: reconnect at once."""
        self._up, self._pending = False, None
        try:
            async with open_ws(self.target(), token=self.token, ca_file=self.ca_file) as ws:
                self._session_scope = trio.CancelScope()
                self._in_session = True
                try:
                    with self._session_scope:
                        await self._session(ws)
                finally:
                    self._in_session = False
        except _Restart:
            return False
        except ConnectionRejected as exc:
            if exc.status_code in FINAL_STATUSES:
                raise _Fatal(
                    f"the server refused the connection: HTTP {exc.status_code}{_body(exc)}"
                ) from None
            self._failed(_describe(exc))
        except _RETRY as exc:
            if (bad := _untrusted_certificate(exc)) is not None:
                raise _Fatal(
                    f"TLS: the server's certificate is not trusted ({clean(bad.verify_message)}); "
                    "pass its CA with --ca-file"
                ) from None
            self._failed(_describe(exc))
        return True

    def _failed(self, why: str) -> None:
        """Say so once per disconnect, and at most every RETRY_NOTICE_S while it lasts."""
        self.failed_attempts += 1
        self._pending = None
        if self._up:
            self.notice(f"disconnected: {why}; reconnecting")
            return
        self._failures += 1
        now = trio.current_time()
        if self._failures == 1:
            self.notice(f"cannot reach the stream at {self._shown_url}: {why}; retrying")
        elif now - self._reported_at >= RETRY_NOTICE_S:
            self.notice(f"still no stream after {self._failures} attempts: {why}; retrying")
        else:
            return
        self._reported_at = now

    async def _session(self, ws: WebSocketConnection) -> None:
        self._acks = []  # acks for a former connection: the group redelivers those users
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_alive, ws)
                nursery.start_soon(self._announce_later)
                if self.group is not None:
                    nursery.start_soon(self._send_acks, ws)
                await self._receive(ws)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    async def _announce_later(self) -> None:
        await trio.sleep(ANNOUNCE_AFTER_S)
        self._announce()

    async def _keep_alive(self, ws: WebSocketConnection) -> None:
        """A server that vanished (no FIN: a network change, a suspended laptop) is
        noticed by its missing pong, not by waiting forever."""
        while True:
            await trio.sleep(PING_INTERVAL_S)
            with trio.move_on_after(PONG_TIMEOUT_S):
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the receiver learns it too
                continue
            raise _DeadServer(f"no pong within {PONG_TIMEOUT_S:g} s")

    async def _send_acks(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                await self._acks_due.wait()
                self._acks_due = trio.Event()
                await self._flush_acks(ws)
                await trio.sleep(ACK_INTERVAL_S)
        finally:
            with trio.move_on_after(FINAL_ACK_S, shield=True):
                await self._flush_acks(ws)

    async def _flush_acks(self, ws: WebSocketConnection) -> None:
        seqs, self._acks = self._acks, []
        with contextlib.suppress(ConnectionClosed):  # unacked: the group redelivers them
            for start in range(0, len(seqs), ACK_CHUNK):
                await ws.send_message(encode(Ack(seqs=seqs[start : start + ACK_CHUNK])))

    async def _receive(self, ws: WebSocketConnection) -> None:
        while True:
            frame = await ws.get_message()
            try:
                message = decode_server(frame)
            except ProtocolError as exc:
                self._bad_frame(str(exc), len(frame))
                continue
            if isinstance(message, Welcome):
                self._on_welcome(message)
            elif isinstance(message, Gap):
                self._on_gap(message)
            elif isinstance(message, UserMessage):
                self._on_user(message, frame)
            # A Checkpoint (the group's watermark) is for members that store users.

    def _bad_frame(self, error: str, size: int) -> None:
        self.bad_frames += 1
        if (suppressed := self._throttle.allow("bad_frame")) is not None:
            more = f" ({suppressed} more not shown)" if suppressed else ""
            self.notice(f"skipped a bad frame ({size} bytes): {clean(error, 200)}{more}")

    def _on_welcome(self, welcome: Welcome) -> None:
        self.connections += 1
        epoch = clean(welcome.epoch, 64)
        attempts = "attempt" if self._failures == 1 else "attempts"
        again = f" after {self._failures} failed {attempts}" if self._failures else ""
        if self.start_after is not None:  # since without epoch: now we know the epoch
            self.epoch, self.cursor, self.start_after = welcome.epoch, self.start_after, None
            if welcome.seq != self.cursor:
                self.notice(
                    f"starting after seq {self.cursor} of epoch {epoch} "
                    f"(the stream is at seq {welcome.seq})"
                )
                raise _Restart
        if self.group is not None:
            if welcome.epoch != self.epoch:
                self._recent.clear()
            self.epoch = welcome.epoch
            self._pending = (
                f"joined group {clean(self.group)} at {self._shown_url}{again}: "
                f"epoch {epoch}, stream at seq {welcome.seq}"
            )
        elif self.cursor is None or self.epoch is None:
            self.epoch, self.cursor = welcome.epoch, welcome.seq
            self._pending = (
                f"connected to {self._shown_url}{again}: epoch {epoch}, stream at seq {welcome.seq}"
            )
        else:
            self._pending = (
                f"connected to {self._shown_url}{again}: resuming after seq {self.cursor} "
                f"of epoch {clean(self.epoch, 64)} (the stream is at seq {welcome.seq})"
            )

    def _on_gap(self, gap: Gap) -> None:
        epoch = clean(gap.epoch, 64)
        reason = clean(gap.reason, 200)
        if gap.from_seq is None:
            self.notice(
                f"gap: continuing live in epoch {epoch} from seq {gap.to_seq + 1}: {reason}"
            )
        elif gap.from_seq == gap.to_seq:
            self.notice(f"gap: seq {gap.from_seq} of epoch {epoch} is lost: {reason}")
        else:
            self.notice(
                f"gap: seqs {gap.from_seq}-{gap.to_seq} of epoch {epoch} are lost: {reason}"
            )
        if gap.epoch != self.epoch:
            self._recent.clear()
        if self.group is None:  # the lost seqs count as passed: a resume starts after them
            self.epoch, self.cursor = gap.epoch, gap.to_seq
        else:
            self.epoch = gap.epoch

    def _on_user(self, message: UserMessage, frame: str | bytes) -> None:
        if message.epoch != self.epoch:  # unannounced (a gap would have said so)
            if self.epoch is not None:
                self.notice(f"the stream is now epoch {clean(message.epoch, 64)}")
            self.epoch, self.cursor = message.epoch, None
            self._recent.clear()
        seq = message.seq
        if self.group is not None:
            if seq in self._recent:  # a redelivery of what was printed: ack it again
                self.dropped += 1
                self._ack(seq)
                return
        elif self.cursor is not None:
            if seq <= self.cursor:
                self.dropped += 1
                return
            if seq > self.cursor + 1:
                self.notice(
                    f"gap: seqs {self.cursor + 1}-{seq - 1} of epoch {clean(message.epoch, 64)} "
                    "were skipped without notice from the server"
                )
        self._announce()
        self._write(json_line(frame) if self.json_lines else format_user(message))
        self.printed += 1
        if self.group is not None:
            self._recent.add(seq)
            self._ack(seq)
        else:
            self.cursor = seq

    def _ack(self, seq: int) -> None:
        self._acks.append(seq)
        self._acks_due.set()


# -- the command --------------------------------------------------------------------------


def check_arguments(
    url: str,
    *,
    since: int | None,
    epoch: str | None,
    group: str | None,
    ca_file: str | None,
    token: str | None = None,
) -> str | None:
    """What is wrong with the arguments, in one line; None when nothing is."""
    try:
        parts = urlsplit(url)
        valid = bool(parts.path) if parts.scheme == "ws+unix" else bool(parts.hostname)
        valid = valid and parts.scheme in ("ws", "wss", "ws+unix") and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        return f"expected a ws://, wss:// or ws+unix:// URL, got {clean(redact(url))!r}"
    in_url = sorted({key for key, _ in parse_qsl(parts.query)} & {"epoch", "since", "group"})
    if in_url:
        return f"give {', '.join('--' + key for key in in_url)} as options, not in the URL"
    if since is not None and since < 0:
        return "--since must be a seq, 0 or more"
    if epoch is not None and since is None:
        return "--epoch goes with --since (the seq to start after)"
    if epoch is not None and not NAME.match(epoch):
        return "--epoch must be 1-64 letters, digits, '_', '.' or '-'"
    if group is not None:
        if since is not None:
            return "--since is not for group members: the group keeps their place"
        if not NAME.match(group):
            return "--group must be 1-64 letters, digits, '_', '.' or '-'"
    if token is not None and not _TOKEN.match(token):  # (never show it)
        return "the token must be printable ASCII without spaces: is the token file one line?"
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            return f"--ca-file {clean(ca_file)}: {clean(getattr(exc, 'strerror', None) or exc)}"
    return None


async def follow(
    tail: Tail,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Tail] = trio.TASK_STATUS_IGNORED,
) -> int:
    """`run` inside trio: follow the stream until SIGINT/SIGTERM (when `handle_signals`),
    `Tail.stop` or cancellation; the exit code."""
    task_status.started(tail)
    code = EXIT_OK

    async def follow_until_stopped(nursery: trio.Nursery) -> None:
        nonlocal code
        try:
            await tail.run()
        except _Fatal as exc:
            tail.notice(str(exc))
            code = EXIT_FAILED
        except _OutputClosed as exc:
            if not exc.quiet:
                tail.notice(str(exc))
                code = EXIT_FAILED
            _discard_further_output(tail.out)
        finally:
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        if handle_signals:
            await nursery.start(_stop_on_signals, tail, nursery.cancel_scope)
        nursery.start_soon(follow_until_stopped, nursery)
    return code


async def _stop_on_signals(
    tail: Tail,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGINT or SIGTERM stops tail quietly (the connection closed properly,
    the last acks sent: bounded); a second one cancels everything at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            if not tail.stopping:
                tail.stop()
            else:
                scope.cancel()


def _discard_further_output(out: TextIO) -> None:
    """After a broken pipe: point the descriptor at /dev/null, so that the interpreter's
    final flush does not print 'Exception ignored ... BrokenPipeError' (see the Python
    docs, 'Note on SIGPIPE')."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        finally:
            os.close(devnull)


def run(
    url: str,
    *,
    json_lines: bool = False,
    since: int | None = None,
    epoch: str | None = None,
    group: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``userstreamd tail``: print the stream at `url` until SIGINT/SIGTERM; the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    problem = check_arguments(
        url, since=since, epoch=epoch, group=group, ca_file=ca_file, token=token
    )
    if problem is not None:
        _notice(err, problem)
        return EXIT_USAGE
    client = Tail(
        url,
        out,
        err,
        json_lines=json_lines,
        since=since,
        epoch=epoch,
        group=group,
        token=token,
        ca_file=ca_file,
    )
    main = partial(
        follow, client, handle_signals=threading.current_thread() is threading.main_thread()
    )
    try:
        return trio.run(main)
    except KeyboardInterrupt:  # before the signal receiver is up, or a second Ctrl-C
        return EXIT_OK
