"""Clients that resume from before the replay buffer (`serve.replayer`), against a daemon
on the embedded bus, its PostgreSQL and real WebSocket connections: the stored stream,
then the live one with no gap and no repeat; dead letters as one-seq gaps; a slow reader
paced, not cut off; replays over their bound waiting their turn; the database lost mid
replay."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict
from trio_websocket import ConnectionClosed

from tests.conftest import query
from tests.helpers import eventually, in_process_daemon, resumed, run_until
from userstreamd.runtime.daemon import Daemon
from userstreamd.serve.replayer import WAITING_PER_SLOT
from userstreamd.store.postgres import PostgresStore
from userstreamd.stream.client import open_ws
from userstreamd.stream.protocol import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_TRY_AGAIN_LATER,
    Gap,
    UserMessage,
    Users,
    decode_server,
)

pytestmark = pytest.mark.e2e  # (a whole daemon each, 7-15 s: beside the fast tier)

# A buffer of 200 users: most of a resume is from storage.
SMALL = {"buffer_messages": 200, "client_lag_max": 150}


def _daemon(tmp_path: Path, dsn: str, rate: float = 2000.0, **tables: dict[str, Any]) -> Daemon:
    producer = {"source": "synthetic", "rate_per_s": rate, "seed": "replay"}
    return in_process_daemon(
        tmp_path,
        dsn,
        **{
            **tables,
            "producer": {**producer, **tables.get("producer", {})},
            "broadcaster": {**SMALL, **tables.get("broadcaster", {})},
        },
    )


def _seqs(got: list[UserMessage | Gap]) -> list[int]:
    return [m.seq for m in got if isinstance(m, UserMessage)]


async def test_a_resume_from_seq_0_gets_the_stored_users_then_the_live_ones(
    tmp_path: Path, dsn: str
) -> None:
    # (at 2,000 users/s a live client may fall 1,000 behind: half a second)
    daemon = _daemon(tmp_path, dsn, broadcaster={"client_lag_max": 1000})

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() >= 3000)
        hub = daemon.hub
        live_then = hub.last_seq
        replayer = daemon.broadcaster.replayer

        async def joined_live() -> None:  # (its replay ended, and it is still connected)
            await eventually(lambda: replayer.statistics().replaying == 0, 30)
            assert hub.statistics().clients == 1

        got = await resumed(daemon.url, hub.epoch, 0, live_then + 1000, batch=100, then=joined_live)
        assert [m for m in got if not isinstance(m, UserMessage)] == []
        assert _seqs(got) == list(range(1, _seqs(got)[-1] + 1))  # no gap, no repeat
        assert replayer.statistics().stored >= live_then - 200
        assert hub.slow_disconnects == 0

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0


async def test_dead_lettered_seqs_arrive_as_one_seq_gaps_with_their_reason(
    tmp_path: Path, dsn: str
) -> None:
    store = PostgresStore(dsn)
    store.migrate()
    store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.seq % 100 = 7 THEN
              RAISE EXCEPTION 'seq % refused', NEW.seq USING ERRCODE = '22023';
            END IF; RETURN NEW; END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON incoming_users
            FOR EACH ROW EXECUTE FUNCTION refuse()""")
    daemon = _daemon(tmp_path, dsn, producer={"stop_at_position": 1000})

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() == 1000)
        hub = daemon.hub
        got = await resumed(daemon.url, hub.epoch, 0, 1000)
        gaps = [m for m in got if isinstance(m, Gap)]
        # (a refused seq still in the replay buffer, 200 users, is the user it was)
        refused = list(range(7, hub.oldest, 100))
        assert len(refused) >= 7
        assert [(g.from_seq, g.to_seq) for g in gaps] == [(s, s) for s in refused]
        for gap, seq in zip(gaps, refused, strict=True):
            assert gap.reason.startswith("dead letter: ") and f"seq {seq} refused" in gap.reason
        assert sorted(_seqs(got) + refused) == list(range(1, 1001))
        # each in its place: the seqs before and after a gap are its neighbours
        order = [m.seq if isinstance(m, UserMessage) else m.from_seq for m in got]
        assert order == list(range(1, 1001))

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0
    assert query(dsn, "SELECT count(*) FROM dead_letters WHERE epoch IS NOT NULL") == [(10,)]


async def test_a_slow_reader_in_history_is_paced_not_cut_off(tmp_path: Path, dsn: str) -> None:
    """It reads 100 users at a time with pauses while the stream moves on far more than
    client_lag_max: it is never closed as slow, and misses nothing."""
    daemon = _daemon(tmp_path, dsn, rate=200.0, history={"page_users": 100})

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() >= 1500, 60)
        hub = daemon.hub
        query_ = urlencode({"epoch": hub.epoch, "since": 0, "batch": 100})
        seqs: list[int] = []
        async with open_ws(f"{daemon.url}?{query_}", receive_buffer_size=4096) as ws:
            await ws.get_message()  # welcome
            target = hub.last_seq + 300
            while not seqs or seqs[-1] < target:
                message = decode_server(await ws.get_message())
                items = message.items if isinstance(message, Users) else [message]
                seqs += [m.seq for m in items if isinstance(m, UserMessage)]
                assert all(isinstance(m, UserMessage) for m in items), items
                if len(seqs) < 1500:
                    await trio.sleep(0.1)  # (1,000 users/s: meanwhile the stream moves on
                    # twice client_lag_max)
        assert seqs == list(range(1, seqs[-1] + 1))
        assert hub.slow_disconnects == 0

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0


async def test_replays_over_the_bound_wait_their_turn_and_all_complete(
    tmp_path: Path, dsn: str
) -> None:
    daemon = _daemon(
        tmp_path,
        dsn,
        producer={"stop_at_position": 2000},
        history={"max_replays": 2, "page_users": 200, "rate_per_s": 20000.0},
    )
    waiting_seen = 0

    async def check() -> None:
        nonlocal waiting_seen
        await eventually(lambda: daemon.committed_through() == 2000)
        hub, replayer = daemon.hub, daemon.broadcaster.replayer
        results: list[list[int]] = []

        async def one() -> None:
            results.append(_seqs(await resumed(daemon.url, hub.epoch, 0, 2000)))

        async def watch() -> None:
            nonlocal waiting_seen
            while True:
                stats = replayer.statistics()
                assert stats.replaying <= 2
                waiting_seen = max(waiting_seen, stats.waiting)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as clients:
                for _ in range(8):
                    clients.start_soon(one)
            nursery.cancel_scope.cancel()
        assert results == [list(range(1, 2001))] * 8
        assert replayer.statistics().replays == 8

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0
    assert waiting_seen >= 1


async def test_a_replay_whose_database_is_lost_is_closed_1011_and_resumes_later(
    tmp_path: Path, dsn: str, pg_server: str
) -> None:
    daemon = _daemon(
        tmp_path,
        dsn,
        producer={"stop_at_position": 3000},
        history={"page_users": 100, "rate_per_s": 2000.0},
    )
    name = conninfo_to_dict(dsn)["dbname"]

    def allow(on: bool) -> None:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}')
            if not on:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() == 3000)
        hub = daemon.hub
        seqs: list[int] = []
        query_ = urlencode({"epoch": hub.epoch, "since": 0, "batch": 100})
        async with open_ws(f"{daemon.url}?{query_}") as ws:
            await ws.get_message()  # welcome
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = decode_server(await ws.get_message())
                    items = message.items if isinstance(message, Users) else [message]
                    seqs += [m.seq for m in items if isinstance(m, UserMessage)]
                    if len(seqs) == 500:
                        await trio.to_thread.run_sync(allow, False)
        assert closed.value.reason.code == CLOSE_INTERNAL_ERROR
        assert "history unavailable" in (closed.value.reason.reason or "")
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 3000
        assert daemon.broadcaster.replayer.statistics().unavailable == 1
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{daemon.http_url}metrics")).text
        assert "userstreamd_history_unavailable_total 1.0" in metrics
        await trio.to_thread.run_sync(allow, True)
        rest = await resumed(daemon.url, hub.epoch, seqs[-1], 3000)
        assert _seqs(rest) == list(range(seqs[-1] + 1, 3001))

    try:
        with trio.fail_after(120):
            assert await run_until(daemon, check) == 0
    finally:
        allow(True)


async def test_a_fanout_workers_client_is_replayed_from_the_daemons_history(
    tmp_path: Path, dsn: str
) -> None:
    """With fan-out workers, the public port is theirs: a client resuming from seq 0 is
    replayed from the daemon's history through the worker."""
    daemon = _daemon(
        tmp_path,
        dsn,
        producer={"stop_at_position": 3000},
        broadcaster={"workers": 2},
    )

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() == 3000)
        hub = daemon.hub
        await eventually(lambda: daemon.broadcaster.fanout_totals()["clients"] == 0)
        got = await resumed(daemon.url, hub.epoch, 0, 3000, batch=100)
        assert [m for m in got if not isinstance(m, UserMessage)] == []
        assert _seqs(got) == list(range(1, 3001))
        assert daemon.broadcaster.replayer.statistics().stored >= 2800  # (the daemon's)

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0


async def test_with_no_consumers_what_the_buffer_lost_is_one_gap_not_a_wait(
    tmp_path: Path, dsn: str
) -> None:
    """Broadcast only: nothing is stored, nothing holds the buffer back. A resume from
    seq 0 is told at once that seqs 1 .. oldest - 1 exist nowhere, then gets the rest."""
    daemon = _daemon(tmp_path, dsn, producer={"stop_at_position": 1000}, consumers={"count": 0})

    async def check() -> None:
        hub = daemon.hub
        await eventually(lambda: hub.last_seq == 1000)
        with trio.fail_after(10):
            got = await resumed(daemon.url, hub.epoch, 0, 1000)
        first = got[0]
        assert isinstance(first, Gap) and (first.from_seq, first.to_seq) == (1, hub.oldest - 1)
        assert first.reason == "not stored, and no longer in the replay buffer"
        assert _seqs(got) == list(range(hub.oldest, 1001))

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0


async def test_beyond_64_waiting_per_replay_slot_a_client_is_told_to_come_back(
    tmp_path: Path, dsn: str
) -> None:
    """One slot, held by a client that reads nothing; 64 wait; the next is closed 1013."""
    daemon = _daemon(
        tmp_path,
        dsn,
        producer={"stop_at_position": 20_000},
        history={"max_replays": 1},
        broadcaster={"write_timeout_s": 60.0},
    )

    async def check() -> None:
        await eventually(lambda: daemon.committed_through() == 20_000)
        hub, replayer = daemon.hub, daemon.broadcaster.replayer
        query_ = urlencode({"epoch": hub.epoch, "since": 0})
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(1 + WAITING_PER_SLOT):  # (the first holds the slot, reading nothing)
                await stack.enter_async_context(open_ws(f"{daemon.url}?{query_}"))
            await eventually(lambda: replayer.statistics().waiting == WAITING_PER_SLOT, 30)
            async with open_ws(f"{daemon.url}?{query_}") as last:
                await last.get_message()  # welcome
                with pytest.raises(ConnectionClosed) as closed:
                    await last.get_message()
            assert closed.value.reason.code == CLOSE_TRY_AGAIN_LATER
            assert replayer.statistics().replaying == 1

    with trio.fail_after(120):
        assert await run_until(daemon, check) == 0
