"""A fan-out worker's history: the daemon's, read through its private socket.

A plain client of a fan-out worker that resumes from before the worker's buffer is
replayed (`replayer`) from ``relayed_history(upstream)(epoch, since)``: a connection of
the worker's own to the daemon's private socket that resumes after (`epoch`, `since`) in
``users`` frames. The daemon serves it from its own buffer and storage (its topology's
`history`), so the worker's clients get exactly what the daemon's would, gaps included;
the worker closes that connection as soon as its own buffer can take the client over.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import trio
from trio_websocket import WebSocketConnection

from ..errors import ProtocolError
from ..stream.client import LOST, WELCOME_TIMEOUT_S, open_ws
from ..stream.history import History, HistoryUnavailable, Page, UnknownEpoch
from ..stream.protocol import (
    MAX_BATCH,
    FrameKind,
    Gap,
    Welcome,
    decode_head,
    decode_kind,
    decode_server,
)


def relayed_history(upstream: str) -> History:
    """``history(epoch, since)`` read from the daemon at `upstream` (its private socket)."""

    @contextlib.asynccontextmanager
    async def history(epoch: str, since: int) -> AsyncIterator[_Relayed]:
        query = urlencode({"epoch": epoch, "since": since, "batch": MAX_BATCH})
        async with contextlib.AsyncExitStack() as stack:
            try:
                # (a frame or two read ahead: the daemon is paced by this client's reads)
                ws = await stack.enter_async_context(
                    open_ws(f"{upstream}?{query}", message_queue_size=1)
                )
                with trio.fail_after(WELCOME_TIMEOUT_S):
                    welcome = decode_server(await ws.get_message())
                if not isinstance(welcome, Welcome):
                    raise ProtocolError("no welcome")
            except _LOST as exc:
                raise HistoryUnavailable(f"the daemon cannot be read: {exc}") from exc
            yield _Relayed(ws, epoch, since)

    return history


_LOST = LOST


class _Relayed:
    def __init__(self, ws: WebSocketConnection, epoch: str, since: int) -> None:
        self.ws, self.epoch, self.after = ws, epoch, since
        self.first = True

    async def next(self, limit: int) -> Page:
        """The daemon's next frame, as a page (its ``users`` frames hold up to 1,000)."""
        try:
            message = await self.ws.get_message()
            frame = message.encode() if isinstance(message, str) else message
            return self._page(frame, decode_kind(frame))
        except _LOST as exc:
            raise HistoryUnavailable(f"the daemon cannot be read: {exc}") from exc

    def _page(self, frame: bytes, kind: FrameKind) -> Page:
        first, self.first = self.first, False
        if kind.type == "gap":
            if kind.from_seq is None and kind.to_seq == 0:  # (the next epoch starts)
                gap = decode_server(frame)
                assert isinstance(gap, Gap)
                return Page(self.epoch, [], self.after, 0, gap.epoch)
            if kind.from_seq is None:  # (nothing of it matched: the buffer says so)
                if first:
                    raise UnknownEpoch(self.epoch)
                raise ProtocolError("an unmatched gap in the middle of a replay")
            self.after = kind.to_seq
            return Page(self.epoch, [frame], self.after, 0)
        items = [bytes(item) for item in kind.items] if kind.type == "users" else [frame]
        if kind.type not in ("users", "user"):
            return Page(self.epoch, [], self.after, 0)  # (a checkpoint: not for plain clients)
        self.after = decode_head(items[-1]).seq
        return Page(self.epoch, items, self.after, len(items))
