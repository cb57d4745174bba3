"""The stored stream on the NATS bus: a resume from before the replay buffer, read from
the JetStream stream (`stream.history` is the contract).

`open_history(bus, epoch, since)` reads the stream's messages after `since` with
JetStream's *batched direct get* (``$JS.API.DIRECT.GET.<stream>`` with ``{"seq": s,
"batch": n}``, nats-server 2.11 and later; the stream has ``allow_direct``): one request
per page, answered by any replica with the messages stored from seq *s* on, up to *n*,
then an end-of-batch status (*204 EOB*), or *404* when nothing is stored from *s* on.

**Why not a consumer.** An ephemeral consumer (ordered, or pull with
``DeliverPolicy.BY_START_SEQUENCE``) is server state made for every replay: creating it
asks the meta leader (which, while a node is lost, may not answer for seconds), it lives
on one node (lost with it: the ordered consumer makes a new one, a pull consumer must be
made anew by hand), and it must be deleted (or left to its ``InactiveThreshold``). A
direct get keeps nothing at the server: a page is one request for exactly what the page
holds (so memory is one page, without flow control), any replica answers it, and a
request that got no answer is simply sent again. nats-py has no call for a batched get
(`JetStreamContext.get_msg` reads one message), so this module sends the request itself,
as `pull` does for pulls.

**Every seq is accounted for.** The messages of a batch come in stream order; seqs
skipped between two of them (or between `since` and the first) were removed (purged,
expired by ``max_age_s``/``max_messages``, or deleted one by one): one ``gap`` each run,
with its exact seqs. A replica never skips a seq it has not stored yet (it applies the
stream in order), so a skip is never a seq still to come. When nothing is stored after
the last seq read, the stream's first seq (from its leader) says whether the seqs up to
it were removed (a gap) or not written yet (an empty page). A message that is not a user
of this stream (not decodable, or of another seq or epoch) is a gap over its one seq
(`protocol.hole_frame`), as the mirror keeps it.

**Failures.** A page whose answer stops for ATTEMPT_S (the node serving it lost, the
connection being re-established) is asked again, with the one backoff, for up to
UNAVAILABLE_AFTER_S; then `HistoryUnavailable`. A stream deleted, or deleted and made
again (a new epoch), is `UnknownEpoch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
import trio

from ...backoff import Backoff
from ...errors import ProtocolError
from ...logs import get_logger
from ...stream.history import HistoryUnavailable, Page, UnknownEpoch
from ...stream.protocol import Gap, decode_head, encode, hole_frame
from .bus import Bus, epoch_of

ATTEMPT_S = 2.0  # the longest silence waited on in an answer
UNAVAILABLE_AFTER_S = 6.0  # retries past this: HistoryUnavailable (a leader election: 4-9 s)
REMOVED = "no longer in the stream: purged or expired"
NOT_A_USER = "not a user"


class _Refused(Exception):
    """The server answered a page with a status other than 204 or 404 (503: no replica
    serves direct gets just now, say)."""


class _Batch:
    """(On the client's loop.) Batched direct gets of the stream, one at a time, on an
    inbox of our own: ``<inbox>.<n>`` for the n-th request, so a late answer to one
    given up on is told apart and dropped."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.subject = f"$JS.API.DIRECT.GET.{bus.stream}"
        self.inbox = bus.nc.new_inbox()
        self._requests = 0
        self._reply = ""
        self._items: list[tuple[int, bytes]] = []  # (stream seq, data)
        self._status = ""
        self._done = asyncio.Event()
        self._subscription: Any = None

    async def start(self) -> None:
        self._subscription = await self.bus.nc.subscribe(f"{self.inbox}.*", cb=self._deliver)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _deliver(self, msg: Any) -> None:
        if msg.subject != self._reply or self._done.is_set():
            return  # (an answer to a request given up on)
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            description = headers.get("Description", "").split("\n")[0]
            self._status = f"{status} {description}".strip()
            self._done.set()
        else:
            self._items.append((int(headers["Nats-Sequence"]), msg.data))

    async def get(self, first_seq: int, count: int) -> list[tuple[int, bytes]]:
        """The messages stored from `first_seq` on, at most `count` ([]: none yet);
        TimeoutError if nothing more of the answer came for ATTEMPT_S, `_Refused`."""
        self._requests += 1
        self._reply = f"{self.inbox}.{self._requests}"
        self._items, self._status = [], ""
        self._done.clear()
        request = json.dumps({"seq": first_seq, "batch": count}).encode()
        await self.bus.nc.publish(self.subject, request, reply=self._reply)
        heard = 0
        while True:
            try:
                await asyncio.wait_for(self._done.wait(), ATTEMPT_S)
                break
            except TimeoutError:
                if len(self._items) == heard:
                    raise
                heard = len(self._items)  # (a long page, still coming: wait on)
        if self._status.startswith(("204", "404")):
            return self._items
        raise _Refused(self._status)

    async def info(self) -> Any:
        """The stream's info, from its leader; TimeoutError after ATTEMPT_S."""
        return await asyncio.wait_for(self.bus.js.stream_info(self.bus.stream), ATTEMPT_S)


class StreamPages:
    """`stream.history.Pages` over the JetStream stream, from `since` + 1."""

    def __init__(self, bus: Bus, batch: _Batch, epoch: str, since: int) -> None:
        self.bus = bus
        self.batch = batch
        self.epoch = epoch
        self.through = since
        self.foreign = 0  # messages given as gaps: not users of this stream

    async def next(self, limit: int) -> Page:
        """At most `limit` frames (a gap is one, however many seqs it covers)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        items = await self._retried(self.batch.get, self.through + 1, limit)
        frames: list[bytes] = []
        users, through = 0, self.through
        for seq, data in items:
            if seq > through + 1:
                frames.append(self._gap(through + 1, seq - 1))
                through = seq - 1
                if len(frames) == limit:
                    break
            frame = self._user(seq, data)
            if frame is data:
                users += 1
            frames.append(frame)
            through = seq
            if len(frames) == limit:
                break
        if not items:  # (nothing stored after `through`: removed, or not written yet?)
            first_seq = await self._first_seq()
            if first_seq > through + 1:
                frames.append(self._gap(through + 1, first_seq - 1))
                through = first_seq - 1
        self.through = through
        return Page(self.epoch, frames, through, users)

    def _gap(self, from_seq: int, to_seq: int) -> bytes:
        gap = Gap(epoch=self.epoch, from_seq=from_seq, to_seq=to_seq, reason=REMOVED)
        return encode(gap).encode()

    def _user(self, seq: int, data: bytes) -> bytes:
        """The message as stored if it is a user of this stream at `seq`, else a hole."""
        try:
            head = decode_head(data)
            if head.seq != seq or head.epoch != self.epoch:
                raise ProtocolError(f"seq {head.seq} in epoch {head.epoch}")
        except ProtocolError as exc:
            self.foreign += 1
            get_logger().warning("history.foreign_message", seq=seq, error=str(exc))
            return hole_frame(self.epoch, seq, NOT_A_USER)
        return data

    async def _first_seq(self) -> int:
        """The stream's first seq, from its leader (`UnknownEpoch` if the stream is
        gone, or is another one by the same name)."""
        try:
            info = await self._retried(self.batch.info)
        except nats.js.errors.NotFoundError as exc:
            raise UnknownEpoch(f"stream {self.bus.stream!r} not found: deleted?") from exc
        if epoch_of(info) != self.epoch:
            raise UnknownEpoch(f"stream {self.bus.stream!r} was made again: a new epoch")
        return int(info.state.first_seq)

    async def _retried(self, fn: Any, *args: Any) -> Any:
        """``bus.call(fn, *args)``, asked again while the cluster does not answer, for
        up to UNAVAILABLE_AFTER_S; then `HistoryUnavailable`."""
        delays = Backoff(0.1, 1.0).delays()
        deadline = trio.current_time() + UNAVAILABLE_AFTER_S
        while True:
            try:
                return await self.bus.call(fn, *args)  # (each bounded by its own timeout)
            except nats.js.errors.NotFoundError:
                raise
            except (
                _Refused,
                TimeoutError,
                nats.errors.Error,
                nats.js.errors.ServiceUnavailableError,
            ) as exc:
                error = f"{type(exc).__name__}: {exc}"
            if trio.current_time() + delays.ceiling_s > deadline:
                raise HistoryUnavailable(f"stream {self.bus.stream!r}: {error}")
            get_logger().warning(
                "history.nats_unavailable", error=error, retry_in_s=round(delays.ceiling_s, 2)
            )
            await delays.sleep()


@contextlib.asynccontextmanager
async def open_history(bus: Bus, epoch: str, since: int) -> AsyncIterator[StreamPages]:
    """The stream's users of `epoch` after seq `since`, in pages (`UnknownEpoch` if
    `epoch` is not the stream's: on NATS, one epoch per stream)."""
    if epoch != bus.epoch:
        raise UnknownEpoch(f"epoch {epoch!r} is not the stream's ({bus.epoch})")
    batch = _Batch(bus)
    await bus.call(batch.start)
    try:
        yield StreamPages(bus, batch, epoch, max(since, 0))
    finally:
        await bus.quietly(batch.stop)
