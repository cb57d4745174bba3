"""The embedded bus's history (`store.history`): pages of the stored stream that account
for every seq, read from a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from userstreamd.config import Config, DatabaseConfig, HistoryConfig
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.history import NOT_STORED, StoredHistory, page_of
from userstreamd.store.postgres import DeadLetter, Envelope, PostgresStore, row_values
from userstreamd.stream.history import HistoryUnavailable, Page, UnknownEpoch
from userstreamd.stream.protocol import Gap, UserMessage, decode_server
from userstreamd.stream.records import parse_user

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _row(seq: int) -> tuple[int, bytes]:
    """(seq, its user frame), as the history's query gives them."""
    user = UserMessage(
        epoch="e",
        seq=seq,
        position=seq * 10,
        produced_at=AT,
        source="synthetic",
        user=synthetic_user("h", seq),
    )
    return seq, msgspec.json.encode(user)


def _read(page: Page) -> list[tuple[str, int, int]]:
    """("user", seq, seq) or ("gap", from, to) per frame."""
    out = []
    for frame in page.frames:
        m = decode_server(frame)
        if isinstance(m, UserMessage):
            out.append(("user", m.seq, m.seq))
        else:
            assert isinstance(m, Gap) and m.from_seq is not None
            out.append(("gap", m.from_seq, m.to_seq))
    return out


def test_a_page_accounts_for_every_seq_up_to_where_the_store_is_final() -> None:
    rows = [_row(s) for s in (1, 2, 4, 5)]
    page = page_of("e", 0, rows, 10, 9, [(3, "refused: bad data")])
    assert _read(page) == [
        ("user", 1, 1),
        ("user", 2, 2),
        ("gap", 3, 3),
        ("user", 4, 4),
        ("user", 5, 5),
        ("gap", 6, 9),
    ]
    assert (page.through, page.users) == (9, 4)
    gaps = [decode_server(f) for f in page.frames if f.startswith(b'{"type":"gap"')]
    assert [g.reason for g in gaps if isinstance(g, Gap)] == [
        "dead letter: refused: bad data",
        NOT_STORED,
    ]
    user = decode_server(page.frames[0])
    assert isinstance(user, UserMessage)
    assert (user.epoch, user.position, user.produced_at, user.source) == ("e", 10, AT, "synthetic")
    assert user.user == synthetic_user("h", 1)


def test_a_missing_seq_that_may_still_be_stored_ends_the_page_before_it() -> None:
    # 3 and 4 are not committed yet (above the final point 2): no gap for them
    page = page_of("e", 0, [_row(1), _row(2), _row(5)], 10, 2, [])
    assert (_read(page), page.through) == ([("user", 1, 1), ("user", 2, 2)], 2)
    # part of a hole is final: gaps up to the final point, then the page ends
    page = page_of("e", 0, [_row(1), _row(8)], 10, 5, [(4, "x")])
    assert _read(page) == [("user", 1, 1), ("gap", 2, 3), ("gap", 4, 4), ("gap", 5, 5)]
    assert page.through == 5
    # nothing stored after 7 and nothing final: an empty page, where it was
    page = page_of("e", 7, [], 17, 3, [])
    assert (page.frames, page.through) == ([], 7)
    # a page covers its seqs only, whatever is final beyond them
    page = page_of("e", 0, [_row(s) for s in (1, 2)], 3, 100, [])
    assert _read(page) == [("user", 1, 1), ("user", 2, 2), ("gap", 3, 3)]
    assert (page.through, page.users) == (3, 2)
    # a letter of a seq stored since (2) is no gap; a seq refused twice is one
    page = page_of("e", 0, [_row(1), _row(2), _row(4)], 4, 4, [(2, "old"), (3, "x"), (3, "x")])
    assert _read(page) == [("user", 1, 1), ("user", 2, 2), ("gap", 3, 3), ("user", 4, 4)]


def _config(dsn: str) -> Config:
    return Config(database=DatabaseConfig(dsn=dsn), history=HistoryConfig(connections=2))


def _store(dsn: str, epochs: dict[str, list[int]], dead: dict[str, list[int]]) -> None:
    """Users of each epoch at the seqs given, dead letters at others (epochs begun in
    order)."""
    store = PostgresStore(dsn)
    store.migrate()
    for epoch, seqs in epochs.items():
        store.begin_stream(epoch, "h", "synthetic")
        rows = []
        for seq in seqs:
            raw = synthetic_user(epoch, seq)
            env = Envelope(seq, epoch, "synthetic", AT, AT, seq)
            rows.append(row_values(parse_user(raw), raw, env))
        store.insert_users(rows)
        store.insert_dead_letters(
            [
                DeadLetter("consumer", None, seq, "row refused", synthetic_user(epoch, seq), epoch)
                for seq in dead.get(epoch, [])
            ]
        )
    store.close()


async def _all(history: StoredHistory, epoch: str, since: int, limit: int) -> list[Page]:
    pages = []
    async with history(epoch, since) as reader:
        while True:
            page = await reader.next(limit)
            if not page.frames and page.next_epoch is None:
                return pages
            pages.append(page)
            if page.next_epoch is not None:
                return pages


async def test_an_older_epoch_is_read_to_its_end_then_says_which_epoch_follows(dsn: str) -> None:
    await trio.to_thread.run_sync(
        _store, dsn, {"old": [1, 2, 4, 5, 6], "live": [1, 2, 3, 5000, 5001]}, {"old": [3]}
    )
    history = StoredHistory(_config(dsn), dsn, lambda: ("live", 3))
    try:
        pages = await _all(history, "old", 1, 2)  # (pages of two seqs)
        assert [_read(p) for p in pages] == [
            [("user", 2, 2), ("gap", 3, 3)],
            [("user", 4, 4), ("user", 5, 5)],
            [("user", 6, 6)],
        ]
        assert [p.next_epoch for p in pages] == [None, None, "live"]
        stored = decode_server(pages[2].frames[0])  # (the frame the server wrote)
        assert isinstance(stored, UserMessage) and stored.user == synthetic_user("old", 6)
        assert (stored.epoch, stored.seq, stored.position) == ("old", 6, 6)
        assert (stored.produced_at, stored.source) == (AT, "synthetic")
        # the live epoch: as far as it is final (3), then nothing yet
        pages = await _all(history, "live", 0, 1000)
        assert [_read(p) for p in pages] == [[("user", 1, 1), ("user", 2, 2), ("user", 3, 3)]]
        # final further on: the run of seqs never stored is one gap, to the next stored
        history.live = lambda: ("live", 5001)
        pages = await _all(history, "live", 3, 10)
        assert [_read(p) for p in pages] == [
            [("gap", 4, 4999)],
            [("user", 5000, 5000), ("user", 5001, 5001)],
        ]
        with pytest.raises(UnknownEpoch):
            await _all(history, "never", 0, 10)
    finally:
        await history.aclose()


@pytest.mark.e2e  # (its retries take seconds: beside the fast tier)
async def test_an_unreadable_database_ends_the_replay_with_history_unavailable(dsn: str) -> None:
    await trio.to_thread.run_sync(_store, dsn, {"live": [1, 2]}, {})
    history = StoredHistory(_config(dsn), dsn, lambda: ("live", 2))
    name = conninfo_to_dict(dsn)["dbname"]
    admin = dsn.replace(f"dbname={name}", "dbname=postgres")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        with trio.fail_after(30), pytest.raises(HistoryUnavailable):
            await _all(history, "live", 0, 10)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await history.aclose()
    # and once it is back, it is read again
    history = StoredHistory(_config(dsn), dsn, lambda: ("live", 2))
    try:
        assert [_read(p) for p in await _all(history, "live", 0, 10)] == [
            [("user", 1, 1), ("user", 2, 2)]
        ]
    finally:
        await history.aclose()
