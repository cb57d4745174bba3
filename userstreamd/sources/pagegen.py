"""Prepared pages: synthetic users generated, validated and encoded in a child process.

Generating a 5,000-user page takes a core for about 150 ms; in the daemon's process that is
150 ms of a loop that also serves every client. A `PageGenerator` hands the work to one
child process (the second core) and gets back a `PreparedPage`: each user's JSON, already
validated (`records.parse_user`) and already without the API's fake credentials unless they
are kept, which the hub embeds in its frames as is (``msgspec.Raw``): the daemon neither
builds, validates, nor re-encodes a synthetic user.

The child is ``python -m userstreamd.sources.pagechild``, stateless: each request names the
seed, the positions and the options, and users are deterministic by (seed, position), so
any child can serve any page. Protocol: one JSON `PageRequest` per line on its standard
input; per request, an 8-byte big-endian length and a JSON `PreparedPage` on its standard
output.

The child's standard input is also its lifeline (`userstreamd.runtime.lifeline`): the end of file
says "stop", and the kernel says it when the daemon dies, even by SIGKILL. The child runs
in a session of its own (a terminal's ^C reaches only the daemon). It is started by the
first page that needs it; a child that dies (or hangs for `PAGE_TIMEOUT_S`) fails that page
with `SourceUnavailable` (kind ``generator_died`` or ``timeout``), and the next page starts
a new one: the producer retries the same positions, so nothing is lost or repeated.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
from datetime import datetime
from typing import NoReturn

import msgspec
import trio

from ..errors import SourceUnavailable
from ..logs import get_logger
from ..runtime.lifeline import how

__all__ = ["PAGE_TIMEOUT_S", "PageGenerator", "PageRequest", "PreparedPage"]

PAGE_TIMEOUT_S = 30.0  # a child that has not answered by then is killed (a page: ~0.2 s)
STOP_TIMEOUT_S = 5.0  # after the lifeline's end, then SIGKILL
PIPE_BYTES = 2**20  # the pipe the child writes pages into
LENGTH_BYTES = 8


class PageRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The users at positions ``start .. start+count-1`` of the synthetic stream `seed`."""

    seed: str
    nats: tuple[str, ...]  # the nationalities to draw from (never empty)
    fields: frozenset[str]  # the top-level fields kept (`fields.selected`)
    start: int
    count: int
    now: datetime  # for the two ``age`` fields
    keep_credentials: bool


class PreparedPage(msgspec.Struct, frozen=True):
    """One JSON document per user, in position order, ready for `Hub.publish`.

    A user whose index is in `rejected` failed validation (the value says why): its JSON
    is the record as generated, credentials included, for the dead letters; it must not be
    published. Every other user is valid and already scrubbed as requested."""

    users: list[msgspec.Raw]
    rejected: dict[int, str] = {}


encode_page = msgspec.json.Encoder().encode
CHILD_MODULE = "userstreamd.sources.pagechild"  # (run by name: it imports the generator)
_decode_page = msgspec.json.Decoder(PreparedPage).decode


class PageGenerator:
    """The parent's side: one child process at a time, started on demand.

    Read-ahead: once a page is in, the child is asked for the page that follows it, which
    it generates while this one is published; the next `prepare` usually only reads it (a
    request for other positions drops it first). Its users' ages are those of when it was
    asked for, a page earlier."""

    def __init__(self, *, page_timeout_s: float = PAGE_TIMEOUT_S) -> None:
        self.page_timeout_s = page_timeout_s
        self._proc: trio.Process | None = None
        self._ahead: PageRequest | None = None  # asked of the child, not read yet
        self._lock = trio.Lock()  # one exchange at a time on the pipes

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first page, or after `release`)."""
        return None if self._proc is None else self._proc.pid

    async def prepare(self, request: PageRequest) -> PreparedPage:
        """The page `request` names, from the child (started first if need be)."""
        async with self._lock:
            try:
                with trio.fail_after(self.page_timeout_s):
                    payload = await self._exchange(request)
            except trio.TooSlowError:
                await self._discard()
                raise SourceUnavailable(
                    f"the page generator sent no page within {self.page_timeout_s:g} s",
                    kind="timeout",
                ) from None
            except BaseException:  # cancelled, or died: its pipes are out of step
                await self._discard()
                raise
        try:
            page = _decode_page(payload)
        except msgspec.DecodeError as exc:  # (a bug in the child, not a user problem)
            raise SourceUnavailable(
                f"the page generator sent a bad page: {exc}", kind="generator_died"
            ) from None
        if len(page.users) != request.count:
            raise SourceUnavailable(
                f"the page generator sent {len(page.users)} users for {request.count}",
                kind="generator_died",
            )
        return page

    async def release(self) -> None:
        """Stop the child, if any: the end of its lifeline, then SIGKILL after
        `STOP_TIMEOUT_S`. A later `prepare` starts a new one."""
        proc, self._proc, self._ahead = self._proc, None, None
        if proc is not None:
            code = await _stop(proc, timeout_s=STOP_TIMEOUT_S)
            get_logger().info("synthetic.generator_stopped", pid=proc.pid, how=how(code))

    async def _start(self) -> trio.Process:
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", CHILD_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:  # (out of processes, memory or file descriptors)
            raise SourceUnavailable(
                f"the page generator could not start: {exc}", kind="generator_died"
            ) from exc
        # (Linux: a pipe bigger than the default 64 KiB, so that a page of megabytes
        # takes fewer round trips; fs.pipe-max-size allows 1 MiB unprivileged.)
        if isinstance(proc.stdout, trio.lowlevel.FdStream) and hasattr(fcntl, "F_SETPIPE_SZ"):
            with contextlib.suppress(OSError):
                fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        get_logger().info("synthetic.generator_started", pid=proc.pid)
        self._proc = proc
        return proc

    async def _exchange(self, request: PageRequest) -> bytes:
        proc = self._proc or await self._start()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and msgspec.structs.replace(request, now=ahead.now) != ahead:
            await self._receive(proc)  # not the page asked for: dropped
            ahead = None
        if ahead is None:
            await self._send(proc, request)
        payload = await self._receive(proc)
        following = msgspec.structs.replace(request, start=request.start + request.count)
        await self._send(proc, following)
        self._ahead = following
        return payload

    async def _send(self, proc: trio.Process, request: PageRequest) -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(encode_page(request) + b"\n")
        except trio.BrokenResourceError:
            await self._died(proc)

    async def _receive(self, proc: trio.Process) -> bytes:
        assert proc.stdout is not None
        header = await _receive_exactly(proc.stdout, LENGTH_BYTES)
        size = int.from_bytes(header, "big")
        payload = await _receive_exactly(proc.stdout, size) if header else b""
        if not payload:
            await self._died(proc)
        return payload

    async def _died(self, proc: trio.Process) -> NoReturn:
        self._proc = self._ahead = None
        code = await _stop(proc, timeout_s=1.0)  # its pipes closed: it is on its way out
        get_logger().warning("synthetic.generator_died", pid=proc.pid, how=how(code))
        raise SourceUnavailable(
            f"the page generator (pid {proc.pid}) {how(code)}", kind="generator_died"
        )

    async def _discard(self) -> None:
        """Kill the child (it is stateless: nothing is lost) and reap it."""
        proc, self._proc, self._ahead = self._proc, None, None
        if proc is not None:
            await _stop(proc, timeout_s=0.0)


async def _stop(proc: trio.Process, *, timeout_s: float) -> int:
    """Close the child's pipes (its stdin: the lifeline's end), give it `timeout_s` to
    exit, then SIGKILL; its exit status. Shielded: this is cleanup."""
    with trio.CancelScope(shield=True):
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                await pipe.aclose()
        with trio.move_on_after(timeout_s):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """`size` bytes from `stream`, or b"" if it ends first."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return bytes(data)
