"""The embedded bus's history: the stored stream read back from PostgreSQL.

`StoredHistory(epoch, since)` is the embedded topology's ``history`` (`stream.history`
has the contract). A page is one round of queries on one of the history's own
connections (``history.connections``, never the consumers'):

- the users of `epoch` after the last seq read, by the unique index on (epoch, seq), each
  encoded as the ``user`` frame it was (its record as stored, in ``raw``);
- how far the table is *final*: every seq up to there is committed or set aside, so a
  seq missing below it will never be stored. For the live epoch that is the consumer
  group's watermark (or its stored checkpoint, whichever is further); for an older one,
  the last seq stored of it;
- the dead letters among the missing seqs (by (epoch, seq)): each is a one-seq ``gap``
  with the reason the database refused it. Any other missing seq below the final point
  is a ``gap`` too ("not stored": an invalid record, or a user whose uuid was already
  stored); one above it ends the page: it is still on its way.

The server writes each ``user`` frame (json_build_object over the row): the daemon's
loop only passes the text on, and a page is one call on a thread (its queries and the
page made of them). A call that fails is tried again a few times (about 3 s in all),
then the replay ends with `HistoryUnavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import msgspec
import stamina
import trio

from ..config import Config
from ..errors import StoreError
from ..logs import get_logger
from ..stream.history import HistoryUnavailable, Page, UnknownEpoch
from ..stream.protocol import Gap
from .calls import StoreCalls
from .postgres import PostgresStore

T = TypeVar("T")

NOT_STORED = "not stored: an invalid record, or a user whose uuid was stored before"
ATTEMPTS = 4  # a query, and its retries

# Bounded by seq on both sides: a plan that reads the index from `after` whatever the
# planner's row estimates (stale ones made "seq > after ... LIMIT" sort the whole tail).
# The server writes each ``user`` frame (`protocol.UserMessage`'s fields, in its order):
# the daemon only passes the text on.
_USERS = """SELECT seq, convert_to(json_build_object('type', 'user', 'epoch', epoch,
  'seq', seq, 'position', coalesce(position, 0), 'produced_at', produced_at,
  'source', source, 'user', raw)::text, 'UTF8')
FROM incoming_users WHERE epoch = %s AND seq > %s AND seq <= %s ORDER BY seq"""
_NEXT_STORED = "SELECT min(seq) FROM incoming_users WHERE epoch = %s AND seq > %s"
# (a seq refused again after a redelivery has a letter each time: one gap)
_DEAD = """SELECT DISTINCT ON (seq) seq, left(error, 200) FROM dead_letters
WHERE epoch = %s AND seq > %s AND seq <= %s ORDER BY seq, id LIMIT %s"""
_CHECKPOINT = "SELECT coalesce(max(seq), 0) FROM stream_checkpoints WHERE epoch = %s"
_LAST = """SELECT greatest(
  (SELECT max(seq) FROM incoming_users WHERE epoch = %s),
  (SELECT max(seq) FROM dead_letters WHERE epoch = %s AND seq IS NOT NULL)),
  EXISTS (SELECT 1 FROM streams WHERE epoch = %s)"""
_NEXT_EPOCH = """SELECT epoch FROM streams
WHERE created_at > (SELECT created_at FROM streams WHERE epoch = %s)
ORDER BY created_at LIMIT 1"""

_encoder = msgspec.json.Encoder()

Row = tuple[int, bytes]  # seq, its user frame (UTF-8: never decoded here)


def _gap(epoch: str, first: int, last: int, reason: str) -> bytes:
    return _encoder.encode(Gap(epoch=epoch, from_seq=first, to_seq=last, reason=reason))


def page_of(
    epoch: str,
    after: int,
    rows: list[Row],
    upto: int,
    final: int,
    dead: list[tuple[int, str]],
) -> Page:
    """The page of seqs (`after`, `upto`]: `rows` (every stored user among them, in seq
    order), `final` (every seq up to it is committed or set aside), `dead` (the dead
    letters among them, up to `final`)."""
    frames: list[bytes] = []
    letters = iter(dead)
    letter = next(letters, None)

    def missing(first: int, last: int) -> None:  # seqs first..last, none stored
        nonlocal letter
        while letter is not None and letter[0] <= last:
            seq, error = letter
            letter = next(letters, None)
            if seq < first:  # (a letter of a seq stored since, or a second letter)
                continue
            if seq > first:
                frames.append(_gap(epoch, first, seq - 1, NOT_STORED))
            frames.append(_gap(epoch, seq, seq, f"dead letter: {error}"))
            first = seq + 1
        if first <= last:
            frames.append(_gap(epoch, first, last, NOT_STORED))

    through, users = after, 0
    for seq, frame in rows:
        if seq > through + 1:
            if seq - 1 > final:  # (still on its way: this page ends before it)
                break
            missing(through + 1, seq - 1)
        frames.append(frame)
        through = seq
        users += 1
    if through < (end := min(upto, final)):  # (none of them stored, and none will be)
        missing(through + 1, end)
        through = end
    return Page(epoch, frames, through, users)


class StoredHistory:
    """``history(epoch, since)`` from PostgreSQL, through `connections` of its own.
    `live()` is (the live epoch, the seq through which its consumer group committed)."""

    def __init__(self, config: Config, dsn: str, live: Callable[[], tuple[str, int]]) -> None:
        self.live = live
        self._pool: list[StoreCalls] = [
            StoreCalls(
                PostgresStore.from_config(config, dsn, application_name="userstreamd-history")
            )
            for _ in range(config.history.connections)
        ]
        self._free = trio.Semaphore(len(self._pool))

    @contextlib.asynccontextmanager
    async def __call__(self, epoch: str, since: int) -> AsyncIterator[_Pages]:
        pages = _Pages(self, epoch, since)
        live_epoch, _ = self.live()
        if epoch != live_epoch:
            last, recorded = await self.query(_LAST, epoch, epoch, epoch)
            if last is None and not recorded:
                raise UnknownEpoch(f"epoch {epoch} is not stored")
            pages.last = last or 0
        yield pages

    async def query(self, sql: str, *params: Any) -> Any:
        """The first row of `sql`."""
        rows: list[Any] = await self.run(lambda store: store.query(sql, params))
        return rows[0]

    async def run(self, work: Callable[[PostgresStore], T]) -> T:
        """`work(store)` in a thread, on a free connection of the history's, tried again
        a few times; HistoryUnavailable once they are spent."""
        async with self._free:
            calls = self._pool.pop()
            try:
                async for attempt in stamina.retry_context(
                    on=StoreError, attempts=ATTEMPTS, wait_initial=0.2, wait_max=2.0
                ):
                    with attempt:
                        return await calls.once(work, calls.store)
            except StoreError as exc:
                get_logger().warning("history.unavailable", error=str(exc))
                raise HistoryUnavailable(f"the database cannot be read: {exc}") from exc
            finally:
                self._pool.append(calls)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for calls in self._pool:
            await calls.aclose()


class _Pages:
    def __init__(self, history: StoredHistory, epoch: str, since: int) -> None:
        self.history, self.epoch, self.after = history, epoch, since
        self.last: int | None = None  # an older epoch's last seq stored (None: the live one)

    async def next(self, limit: int) -> Page:
        """One page: its queries and the page made of them in one call on a thread."""
        live_epoch, committed = self.history.live()
        committed = committed if live_epoch == self.epoch else 0
        page = await self.history.run(partial(self._read, limit, committed))
        self.after = page.through
        if page.next_epoch == "":  # (this older epoch ended, and none follows it stored)
            page = Page(page.epoch, page.frames, page.through, page.users, live_epoch)
        return page

    def _read(self, limit: int, committed: int, store: PostgresStore) -> Page:
        """(In a thread.) How far the table is final, first: a user committed before this
        is in the rows read after it (read later, a user committed meanwhile could count
        as gone)."""
        epoch, after = self.epoch, self.after
        if self.last is None:
            (stored,) = store.query(_CHECKPOINT, (epoch,))[0]
            final = max(committed, stored)
        else:
            final = self.last
        upto = after + limit
        rows: list[Any] = store.query(_USERS, (epoch, after, upto), binary=True)
        if not rows and final > upto:  # (a run of seqs not stored: to the next stored one)
            (stored_next,) = store.query(_NEXT_STORED, (epoch, after))[0]
            upto = final if stored_next is None else max(upto, stored_next - 1)
        dead: list[Any] = []
        if min(upto, final) > after:
            dead = store.query(_DEAD, (epoch, after, min(upto, final), limit))
            if len(dead) == limit:  # (a page holds at most `limit` of them)
                upto = dead[-1][0]
        page = page_of(epoch, after, rows, upto, final, dead)
        if self.last is not None and page.through >= self.last:
            found = store.query(_NEXT_EPOCH, (epoch,))
            following = found[0][0] if found else ""  # ("": the live one)
            page = Page(epoch, page.frames, page.through, page.users, following)
        return page
