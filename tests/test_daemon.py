"""The daemon in-process: `Daemon.run(shutdown_trigger=...)`, a real PostgreSQL, real
sockets, no signals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import trio

from userstreamd.stream.client import open_ws
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import Gap, UserMessage, decode_server

from .conftest import query
from .helpers import eventually, in_process_daemon, run_until, write_config


async def test_a_broadcast_only_daemon_waits_for_nobody(tmp_path: Path, dsn: str) -> None:
    """Item 17: with no consumers there is no group to hold the producer back, so it
    streams past the buffer instead of stopping once the buffer is full."""
    daemon = in_process_daemon(
        tmp_path,
        dsn,
        consumers={"count": 0},
        producer={"source": "synthetic", "rate_per_s": 5000},
        broadcaster={"buffer_messages": 500},
    )

    async def stream_past_the_buffer() -> None:
        await eventually(lambda: daemon.hub.last_seq > 2000)

    assert await run_until(daemon, stream_past_the_buffer) == 0
    assert daemon.producer is not None
    assert daemon.producer.statistics().backpressure_waits == 0


async def test_the_producer_stays_within_max_lead_of_the_database(tmp_path: Path, dsn: str) -> None:
    """Item 19: overloaded (50,000/s asked), the producer is never more than
    ``consumers.max_lead`` users ahead of what the group committed, so the consumers get
    the loop's time instead of the buffer filling first."""
    daemon = in_process_daemon(
        tmp_path,
        dsn,
        consumers={"count": 1, "max_lead": 1000, "batch_size": 200},
        producer={"source": "synthetic", "rate_per_s": 50_000},
    )
    leads: list[int] = []

    async def watch_the_lead() -> None:
        group = daemon.config.consumers.group
        while daemon.hub.watermark(group)[0] < 5000:
            leads.append(daemon.hub.last_seq - daemon.hub.watermark(group)[0])
            await trio.sleep(0.005)

    assert await run_until(daemon, watch_the_lead) == 0
    assert max(leads) <= 1000
    assert daemon.producer is not None and daemon.producer.statistics().backpressure_waits > 0
    # The final checkpoint (item 9) is the last committed seq.
    (committed,) = query(dsn, "SELECT max(seq) FROM incoming_users")[0]
    assert query(dsn, "SELECT seq FROM stream_checkpoints") == [(committed,)]
    assert committed == daemon.hub.last_seq


async def test_reload_applies_only_reloadable_keys(tmp_path: Path, dsn: str) -> None:
    """Item 8: a reload after editing consumers.group used to swap the whole config and
    crash on the next status line; now only the reloadable keys apply."""
    daemon = in_process_daemon(tmp_path, dsn, producer={"source": "synthetic", "rate_per_s": 50})
    path = Path(daemon.config.path)

    async def edit_and_reload() -> None:
        assert path == write_config(
            tmp_path,
            dsn,
            producer={"source": "synthetic", "rate_per_s": 80},
            consumers={"group": "elsewhere"},
        )
        daemon._reload()
        assert "users streamed at 80/s" in daemon._status()
        assert daemon.producer is not None and daemon.producer.rate_per_s == 80
        await eventually(lambda: daemon.hub.watermark("db")[0] > 20)

    assert await run_until(daemon, edit_and_reload) == 0
    assert daemon.config.consumers.group == "db"
    assert daemon.config.producer.rate_per_s == 80


def test_a_client_ahead_of_a_restarted_daemon_waits_for_its_next_seq() -> None:
    """Item 10: a daemon restarted from checkpoint seq 9216 of epoch E; a client that had
    seq 9358 of E resumes at 9359 once it is regenerated: no gap, no duplicate."""
    hub = Hub("E", first_seq=9217)
    sub = hub.subscribe("client", since=("E", 9358))
    assert sub.gap is None
    for position in range(9217, 9361):
        hub.publish_nowait({"n": position}, "synthetic", position)
    frames = []
    while (frame := hub.next_frame_nowait(sub)) is not None:
        frames.append(decode_server(frame))
    assert [m.seq for m in frames if isinstance(m, UserMessage)] == [9359, 9360]


def test_a_client_far_ahead_or_from_another_epoch_gets_a_gap() -> None:
    hub = Hub("E", first_seq=101, client_lag_max=50)
    for since in [("E", 200), ("F", 100)]:
        sub = hub.subscribe("client", since=since)
        assert isinstance(sub.gap, Gap) and sub.gap.from_seq is None
        assert sub.next_seq == 101


async def test_a_client_resumes_across_a_restart_that_regenerates_seqs(
    tmp_path: Path, dsn: str
) -> None:
    """Item 10 end to end: the restarted daemon resumes the epoch from a checkpoint 100
    users behind what the client saw (as after a crash); the client gets no gap and no
    duplicate."""
    tables = {"producer": {"source": "synthetic", "rate_per_s": 200, "seed": "restart"}}
    seen: list[int] = []
    first = in_process_daemon(tmp_path, dsn, **tables)

    async def read_some() -> None:
        async with open_ws(first.url) as ws:
            while len(seen) < 300:
                message = decode_server(await ws.get_message())
                if isinstance(message, UserMessage):
                    seen.append(message.seq)

    assert await run_until(first, read_some) == 0
    epoch, last = first.hub.epoch, seen[-1]
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE stream_checkpoints SET seq = %s, position = %s", (last - 100,) * 2)
    second = in_process_daemon(tmp_path, dsn, **tables)
    after: list[Any] = []

    async def resume() -> None:
        assert (second.hub.epoch, second.hub.last_seq) == (epoch, last - 100)
        async with open_ws(f"{second.url}?epoch={epoch}&since={last}") as ws:
            while len(after) < 50:
                message = decode_server(await ws.get_message())
                if isinstance(message, UserMessage | Gap):
                    after.append(message)

    assert await run_until(second, resume) == 0
    assert [m.seq for m in after if isinstance(m, UserMessage)] == list(range(last + 1, last + 51))


async def test_the_database_probe_stops_before_the_database(
    tmp_path: Path, dsn: str, monkeypatch: Any
) -> None:
    """Item 14: a probe while the database stops warned `health.database_not_ready ...
    the database system is shutting down` on a clean stop."""
    from userstreamd.runtime import daemon as daemon_module

    order: list[str] = []
    run_database = daemon_module.run_database

    async def database(*args: Any, **kwargs: Any) -> None:
        try:
            await run_database(*args, **kwargs)
        finally:
            order.append("database stopped")

    monkeypatch.setattr(daemon_module, "run_database", database)
    daemon = in_process_daemon(tmp_path, dsn, producer={"source": "synthetic", "rate_per_s": 50})
    probe_run = daemon.probe.run

    async def probe() -> None:
        try:
            await probe_run()
        finally:
            order.append("probe stopped")

    monkeypatch.setattr(daemon.probe, "run", probe)

    async def probed() -> None:
        await eventually(lambda: daemon.probe.state == "ok")

    assert await run_until(daemon, probed) == 0
    assert order == ["probe stopped", "database stopped"]
