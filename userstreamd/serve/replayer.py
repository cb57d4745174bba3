"""Clients that resume from before the replay buffer: served from storage, then joined live.

A plain client that asks for ``?epoch=E&since=S`` where the buffer no longer reaches (or
another epoch) is replayed here, by its own session, before the pump writes to it:

1. **From storage**, through the topology's ``history(epoch, since)`` (`stream.history`),
   a page of ``history.page_users`` at a time. A ``gap`` in a page is a seq that no
   longer exists anywhere (dead-lettered, purged, never stored), with its exact bounds.
2. **From the buffer**, once the client's next seq is buffered (on the embedded bus the
   buffer holds everything the consumers have not committed yet): frames copied a page at
   a time, the client holding no cursor into the buffer while it replays.
3. **Live**, once it is within half ``client_lag_max`` of the live end: its cursor is
   placed right after the last seq it was sent (`Hub.subscribe`), with no gap and no
   repeat, and from then on it is a plain client like any other.

An older epoch's stored tail is sent first, then a ``gap`` of the next epoch with
``from_seq`` null and ``to_seq`` 0 says where that epoch starts (its seq 1), and the
replay goes on there.

**It cannot hurt the live stream.** Every write waits for the client's socket: a client
is paced by its own reads, not cut off for being behind (only once ``CATCH_UP_S`` went
by without its getting closer to the live end: it reads slower than the stream grows;
and one that reads nothing for ``write_timeout_s`` is dropped, as anywhere). At most
``history.rate_per_s`` users a second per client and ``history.total_rate_per_s``
for all of them together, at most ``history.max_replays``
clients replaying at once (the next ones wait, connected, their turn; beyond
``WAITING_PER_SLOT`` per slot they are closed 1013), and the store is read on
connections that are not the consumers'. The daemon's own processes on the private
socket (fan-out workers' feeds and relays) take no slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio
from trio_websocket import WebSocketConnection

from ..config import HistoryConfig
from ..stream.history import History, HistoryUnavailable, Page, UnknownEpoch
from ..stream.hub import Hub, Slow
from ..stream.protocol import Gap, encode
from .wsframes import send_frames

IDLE_S = 0.1  # the wait before asking the store again when it has nothing new yet
WAITING_PER_SLOT = 64  # clients that may wait for a replay slot, per slot (then 1013)
CATCH_UP_S = 60.0  # a replay no closer to the live end after this long is ended as slow


class ReplaysBusy(Exception):
    """Too many clients wait for a replay slot: this one should come back later."""


@dataclass(frozen=True)
class ReplayStatistics:
    replaying: int = 0  # clients being replayed now
    waiting: int = 0  # clients waiting for a replay slot
    replays: int = 0  # replays begun, since the start
    stored: int = 0  # users sent from storage by replays
    buffered: int = 0  # users sent from the buffer by replays
    gaps: int = 0  # gap frames sent by replays
    unavailable: int = 0  # replays ended because the store could not be read


class Replayer:
    def __init__(
        self,
        hub: Hub,
        history: History | None,
        settings: HistoryConfig,
        write_timeout_s: float,
        in_frames: Callable[[list[bytes], int], list[bytes]],
    ) -> None:
        """`history` None: resumes are served from the buffer only (a gap beyond it)."""
        self.hub, self.history, self.settings = hub, history, settings
        self.write_timeout_s = write_timeout_s
        self.in_frames = in_frames
        self._slots = trio.Semaphore(settings.max_replays)
        self._due = 0.0  # when all replays together have spent their rate (total_rate_per_s)
        self.replaying = self.waiting = self.replays = self.gaps = self.unavailable = 0
        self.sent: Counter[str] = Counter()  # users: "stored", "buffered"

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(
            self.replaying,
            self.waiting,
            self.replays,
            self.sent["stored"],
            self.sent["buffered"],
            self.gaps,
            self.unavailable,
        )

    def needed(self, since: tuple[str, int] | None) -> bool:
        """Whether a client resuming after `since` must be replayed (the buffer cannot
        serve it as it is)."""
        if since is None or self.history is None:
            return False
        epoch, seq = since
        return epoch != self.hub.epoch or not (seq >= self.hub.last_seq or self._near(seq))

    def _near(self, seq: int) -> bool:
        """The buffer holds seq + 1 on, and the client may join live from there: at most
        half ``client_lag_max`` behind (`Hub.subscribe` accepts up to all of it)."""
        hub = self.hub
        return seq + 1 >= hub.oldest and hub.last_seq - seq <= hub.client_lag_max // 2

    async def replay(
        self, ws: WebSocketConnection, since: tuple[str, int], batch: int, *, bounded: bool = True
    ) -> tuple[str, int]:
        """Send the client what it missed after `since` = (epoch, seq), until the buffer
        can serve it live; where it stands then (for `Hub.subscribe`). UnknownEpoch if
        `since`'s epoch is stored nowhere; HistoryUnavailable if the store failed;
        ReplaysBusy if too many wait for a slot; Slow if it does not catch up. Only
        `bounded` replays take a slot and keep to the rate (not the daemon's own
        processes: fan-out workers' feeds and relays)."""
        if bounded:
            if self.waiting >= WAITING_PER_SLOT * self.settings.max_replays:
                raise ReplaysBusy(f"{self.waiting} clients wait for a replay")
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        self.replaying += 1
        self.replays += 1
        now = trio.current_time()
        pace = _Pace(ws, batch, bounded, now, *since, now, self.hub.last_seq - since[1])
        try:
            await self._replay(pace)
        except UnknownEpoch:
            if not pace.sent:
                raise
            # (the stream it was reading is gone, the stream was made anew: from where
            # it stands, the subscription tells it)
        except HistoryUnavailable:
            self.unavailable += 1
            raise
        finally:
            self.replaying -= 1
            if bounded:
                self._slots.release()
        return pace.epoch, pace.seq

    async def _replay(self, pace: _Pace) -> None:
        hub, page_users = self.hub, self.settings.page_users
        assert self.history is not None
        while True:
            epoch, seq = pace.epoch, pace.seq
            if epoch == hub.epoch and (seq >= hub.last_seq or self._near(seq)):
                return
            if epoch == hub.epoch and seq + 1 >= hub.oldest:  # (buffered: copy a page)
                last = min(hub.last_seq, seq + page_users)
                frames = hub.frames(seq + 1, last)
                await self._send(pace, Page(epoch, frames, last, len(frames)), "buffered")
                continue
            async with self.history(epoch, seq) as pages:
                while not (pace.epoch == hub.epoch and pace.seq + 1 >= hub.oldest):
                    seq = pace.seq
                    live = epoch == hub.epoch
                    # (a page ends where the buffer begins: what it holds is not a gap)
                    oldest = hub.oldest
                    limit = min(page_users, oldest - 1 - seq) if live else page_users
                    page = await pages.next(limit)
                    if page.through == seq and not page.frames and page.next_epoch is None:
                        # Gone from the buffer before the page was read, yet not stored:
                        # never will be (nothing holds the buffer back for the store, or
                        # the store lost them). (One evicted while the page was read may
                        # have been committed after its rows were: read again.)
                        if live and seq + 1 < oldest:
                            gone = Gap(
                                epoch=epoch,
                                from_seq=seq + 1,
                                to_seq=oldest - 1,
                                reason="not stored, and no longer in the replay buffer",
                            )
                            await self._send(pace, Page(epoch, [encode(gone).encode()], oldest - 1))
                            break
                        await trio.sleep(IDLE_S)  # (not stored yet: soon)
                        continue
                    await self._send(pace, page)
                    if page.next_epoch is not None:
                        start = Gap(
                            epoch=page.next_epoch,
                            from_seq=None,
                            to_seq=0,
                            reason=f"epoch {epoch} ended at seq {page.through}; "
                            f"epoch {page.next_epoch} starts at seq 1",
                        )
                        await self._send(pace, Page(page.next_epoch, [encode(start).encode()], 0))
                        break

    async def _send(self, pace: _Pace, page: Page, source: str = "stored") -> None:
        """The page's frames (waiting for the client's socket), then the rate's pause;
        Slow if the client is no closer to the live end than ``CATCH_UP_S`` ago."""
        if page.frames:
            frames = self.in_frames(page.frames, pace.batch)
            await send_frames(pace.ws, frames, self.write_timeout_s)
            pace.sent = True
        pace.epoch, pace.seq = page.epoch, page.through
        self.sent[source] += page.users
        self.gaps += len(page.frames) - page.users
        if not pace.bounded:
            return
        now = trio.current_time()
        if now - pace.since >= CATCH_UP_S:
            behind = self.hub.last_seq - pace.seq if pace.epoch == self.hub.epoch else None
            if behind is not None and behind >= pace.behind:
                raise Slow(f"replayed for {CATCH_UP_S:g} s without catching up")
            pace.since, pace.behind = now, behind if behind is not None else pace.behind
        # (its own rate, and its share of all replays': each page books its time on both)
        count = len(page.frames)
        pace.due = max(pace.due, now) + count / self.settings.rate_per_s
        self._due = max(self._due, now) + count / self.settings.total_rate_per_s
        if (due := max(pace.due, self._due)) > now:
            await trio.sleep_until(due)


@dataclass(slots=True)
class _Pace:
    """One client's replay: where it is written and how, where it stands, when its next
    page is due, and how far behind the live end it was when its catching up was last
    judged."""

    ws: WebSocketConnection
    batch: int
    bounded: bool
    due: float
    epoch: str  # the last seq sent (or given): `seq` of `epoch`
    seq: int
    since: float  # when `behind` was taken
    behind: int
    sent: bool = False
