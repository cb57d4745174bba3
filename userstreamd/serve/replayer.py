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
is paced by its own reads and is never cut off as slow while it replays (a client that
reads nothing for ``write_timeout_s`` is dropped, as anywhere). At most
``history.rate_per_s`` users a second per client, at most ``history.max_replays``
clients replaying at once (the next ones wait, connected, their turn), and the store is
read on connections that are not the consumers'.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio
from trio_websocket import WebSocketConnection

from ..config import HistoryConfig
from ..stream.history import History, HistoryUnavailable, Page
from ..stream.hub import Hub
from ..stream.protocol import Gap, encode
from .wsframes import send_frames

IDLE_S = 0.1  # the wait before asking the store again when it has nothing new yet


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
        """The buffer holds seq + 1 on, and the client may join live from there."""
        hub = self.hub
        return seq + 1 >= hub.oldest and hub.last_seq - seq < max(1, hub.client_lag_max // 2)

    async def replay(
        self, ws: WebSocketConnection, since: tuple[str, int], batch: int
    ) -> tuple[str, int]:
        """Send the client what it missed after `since` = (epoch, seq), until the buffer
        can serve it live; where it stands then (for `Hub.subscribe`). UnknownEpoch if
        `since`'s epoch is stored nowhere; HistoryUnavailable if the store failed."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.replaying += 1
        self.replays += 1
        try:
            return await self._replay(ws, since, batch)
        except HistoryUnavailable:
            self.unavailable += 1
            raise
        finally:
            self.replaying -= 1
            self._slots.release()

    async def _replay(
        self, ws: WebSocketConnection, since: tuple[str, int], batch: int
    ) -> tuple[str, int]:
        hub, page_users = self.hub, self.settings.page_users
        assert self.history is not None
        epoch, seq = since
        pace = _Pace(ws, batch, trio.current_time())
        while True:
            if epoch == hub.epoch and (seq >= hub.last_seq or self._near(seq)):
                return epoch, seq
            if epoch == hub.epoch and seq + 1 >= hub.oldest:  # (buffered: copy a page)
                last = min(hub.last_seq, seq + page_users)
                frames = hub.frames(seq + 1, last)
                await self._send(pace, Page(epoch, frames, last, len(frames)), "buffered")
                seq = last
                continue
            async with self.history(epoch, seq) as pages:
                while not (epoch == hub.epoch and seq + 1 >= hub.oldest):
                    page = await pages.next(page_users)
                    if page.through == seq and not page.frames and page.next_epoch is None:
                        await trio.sleep(IDLE_S)  # (not stored yet, nor buffered: soon)
                        continue
                    await self._send(pace, page)
                    seq = page.through
                    if page.next_epoch is not None:
                        start = Gap(
                            epoch=page.next_epoch,
                            from_seq=None,
                            to_seq=0,
                            reason=f"epoch {epoch} ended at seq {seq}; "
                            f"epoch {page.next_epoch} starts at seq 1",
                        )
                        await self._send(pace, Page(epoch, [encode(start).encode()], seq))
                        epoch, seq = page.next_epoch, 0
                        break

    async def _send(self, pace: _Pace, page: Page, source: str = "stored") -> None:
        """The page's frames (waiting for the client's socket), then the rate's pause."""
        if page.frames:
            frames = self.in_frames(page.frames, pace.batch)
            await send_frames(pace.ws, frames, self.write_timeout_s)
        self.sent[source] += page.users
        self.gaps += len(page.frames) - page.users
        now = trio.current_time()
        pace.due = max(pace.due, now) + len(page.frames) / self.settings.rate_per_s
        if pace.due > now:
            await trio.sleep_until(pace.due)


@dataclass(slots=True)
class _Pace:
    """One client's replay: where it is written, how, and when its next page is due."""

    ws: WebSocketConnection
    batch: int
    due: float
