"""`Tail`: one run of the command, a reader of the stream on the one `StreamClient`.

The client keeps the connection, the resume cursor and the backoff; tail decides what is
printed (no gap, no duplicate), what it says on ``err`` and when retrying cannot help.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections import deque
from dataclasses import dataclass
from typing import TextIO

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from ...errors import ProtocolError
from ...logs import Throttle, redact
from ...stream.client import Reconnect, StreamClient
from ...stream.protocol import (
    MAX_WINDOW,
    Ack,
    Gap,
    UserMessage,
    Welcome,
    close_meaning,
    decode_server,
    encode,
)
from .render import clean, format_user, gap_notice, json_line, notice

RETRY_NOTICE_S = 30.0  # while the server stays unreachable, one notice this often
ANNOUNCE_AFTER_S = 0.5  # a connection that lasts this long (or carries a frame) is "up"
PING_INTERVAL_S = 15.0
PONG_TIMEOUT_S = 15.0
ACK_INTERVAL_S = 0.2  # acks go out in batches, well under the server's message rate
ACK_CHUNK = 4096
FINAL_ACK_S = 1.0
RECENT_SEQS = MAX_WINDOW  # what a group member remembers printing (its largest window)
FINAL_STATUSES = frozenset({400, 401, 403, 404, 414})  # retrying will not change them


class Fatal(Exception):
    """Retrying will not help: say why (one line) and exit with EXIT_FAILED."""


class OutputClosed(Exception):
    """``out`` cannot be written to; `quiet` when it is a closed pipe (``| head``)."""

    def __init__(self, message: str, *, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


# -- describing what went wrong -----------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """For people at a terminal: the close code's meaning (from the protocol's table),
    the HTTP refusal, or the system's words; server text escaped."""
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return "connection lost"
        detail = f": {clean(reason.reason, 120)}" if reason.reason else ""
        return f"{close_meaning(reason.code)} ({reason.code}{detail})"
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


# -- the follower -------------------------------------------------------------------------


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
        self.client = StreamClient(
            url,
            token=token,
            ca_file=ca_file,
            group=group,
            ping_interval_s=PING_INTERVAL_S,
            pong_timeout_s=PONG_TIMEOUT_S,
        )
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

    # The cursor is the client's: it resumes from there.
    @property
    def epoch(self) -> str | None:
        return self.client.epoch

    @epoch.setter
    def epoch(self, value: str | None) -> None:
        self.client.epoch = value

    @property
    def cursor(self) -> int | None:
        return self.client.seq

    @cursor.setter
    def cursor(self, value: int | None) -> None:
        self.client.seq = value

    def statistics(self) -> TailStatistics:
        return TailStatistics(
            self.printed, self.dropped, self.bad_frames, self.connections, self.failed_attempts
        )

    # -- output --------------------------------------------------------------------------

    def notice(self, text: str) -> None:
        self._announce()
        notice(self.err, text)

    def _announce(self) -> None:
        """Say "connected" once the connection proves itself (a frame after the welcome,
        or ANNOUNCE_AFTER_S): one that a stopping server closes at once is a failed
        attempt, not a connection and a disconnect."""
        if self._pending is not None:
            text, self._pending = self._pending, None
            self._up, self._failures = True, 0
            notice(self.err, text)

    def _write(self, line: str) -> None:
        try:
            try:
                self.out.write(line + "\n")
            except UnicodeEncodeError:  # a terminal that is not UTF-8
                encoding = getattr(self.out, "encoding", None) or "ascii"
                self.out.write(line.encode(encoding, "backslashreplace").decode(encoding) + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise OutputClosed("output closed", quiet=True) from None
        except (OSError, ValueError) as exc:
            raise OutputClosed(f"cannot write the output: {exc}", quiet=False) from None

    # -- the connection loop -------------------------------------------------------------

    def target(self) -> str:
        """The URL to connect to now: resuming after the cursor, or joining the group."""
        return self.client.target()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Leave: `run` closes the connection properly (sending the last acks) and returns.
        (Cancelling `run` also stops it, without the last acks: the close is sent, and
        not waited on, since the connection's reader is cancelled too.)"""
        self._stopping = True
        if self._in_session:
            self._session_scope.cancel()
        else:
            self._attempt_scope.cancel()

    async def run(self) -> None:
        """Follow the stream until `stop` or cancellation; Fatal or OutputClosed end it."""
        self._attempt_scope = trio.CancelScope()
        with self._attempt_scope:
            await self.client.run(self._session, self._lost)

    def _lost(self, exc: BaseException) -> None:
        """A connection failed or ended: say so, or give up when retrying cannot help."""
        if isinstance(exc, ConnectionRejected) and exc.status_code in FINAL_STATUSES:
            raise Fatal(
                f"the server refused the connection: HTTP {exc.status_code}{_body(exc)}"
            ) from None
        if (bad := _untrusted_certificate(exc)) is not None:
            raise Fatal(
                f"TLS: the server's certificate is not trusted ({clean(bad.verify_message)}); "
                "pass its CA with --ca-file"
            ) from None
        self._failed(_describe(exc))

    def _failed(self, why: str) -> None:
        """Say so once per disconnect, and at most every RETRY_NOTICE_S while it lasts."""
        self.failed_attempts += 1
        self._pending = None
        if self._up:
            self._up = False
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

    async def _session(self, ws: WebSocketConnection, welcome: Welcome) -> None:
        """One connection's work, until `stop` (then the connection closes properly)."""
        self._up, self._pending = False, None
        self._acks = []  # acks for a former connection: the group redelivers those users
        self._session_scope = trio.CancelScope()
        self._in_session = True
        printed = self.printed
        try:
            with self._session_scope:
                self._on_welcome(welcome)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._announce_later)
                    if self.group is not None:
                        nursery.start_soon(self._send_acks, ws)
                    await self._receive(ws)
        finally:
            self._in_session = False
            if self.printed > printed:  # it carried users: the backoff starts over
                self.client.progressed()

    async def _announce_later(self) -> None:
        await trio.sleep(ANNOUNCE_AFTER_S)
        self._announce()

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
            if isinstance(message, Gap):
                self._on_gap(message)
            elif isinstance(message, UserMessage):
                self._on_user(message, frame)
            # A Checkpoint (the group's watermark) is for members that store users; there
            # is one welcome per connection (the client read it).

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
                raise Reconnect
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
        self.notice(gap_notice(gap))
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
