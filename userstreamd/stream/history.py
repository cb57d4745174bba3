"""The stored stream, read back: what a client resuming from before the replay buffer gets.

A topology provides ``history(epoch, since)`` (`History`): an async context manager over
`Pages`, the stream's stored users of `epoch` after seq `since`, in order, a page at a
time. The embedded bus reads them from PostgreSQL (`store.history`), the NATS bus from
the JetStream stream (`topology.nats.history`); the broadcaster's `serve.replayer` serves
them to a client and joins it to the live stream where the replay buffer takes over. No
caller asks which store it reads.

**A page accounts for every seq it covers.** `Page.frames` are the encoded ``user``
frames of the seqs stored, and a ``gap`` frame (`protocol.Gap`, with its exact seqs and
reason) for each run of seqs that no longer exists anywhere: a dead-lettered seq is a
gap of its own, with the reason it was refused; a purged or expired range is one gap.
`Page.through` is the last seq the page accounts for. A seq that may still be stored (not
yet committed) is never reported as a gap: the page stops before it, and a later page
(or the replay buffer) has it.

**The end of an epoch.** When `epoch` is not the live one and its stored history ends,
the last page says which epoch follows (`Page.next_epoch`); an epoch of which nothing is
stored raises `UnknownEpoch`. A store that cannot be read (the database or the cluster is
down) raises `HistoryUnavailable` once its own bounded retries are spent: the client is
closed with a code it can resume from.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol


class HistoryUnavailable(Exception):
    """The store could not be read (after its retries)."""


class UnknownEpoch(Exception):
    """Nothing of this epoch is stored (it never existed here, or is gone entirely)."""


@dataclass(frozen=True, slots=True)
class Page:
    """Seqs (after, `through`] of `epoch`: their ``user`` frames and ``gap`` frames in
    seq order. Empty with `through` unchanged: nothing more is stored yet."""

    epoch: str
    frames: list[bytes] = field(default_factory=list)
    through: int = 0
    users: int = 0  # how many of `frames` are users (the rest are gaps)
    next_epoch: str | None = None  # `epoch` ended at `through`: this one follows


class Pages(Protocol):
    async def next(self, limit: int) -> Page:
        """The next page: at most `limit` seqs after the last one read."""
        ...


History = Callable[[str, int], AbstractAsyncContextManager[Pages]]
"""``history(epoch, since)``: the stored stream of `epoch` after seq `since`."""
