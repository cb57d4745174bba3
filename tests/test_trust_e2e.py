"""The trust boundary, end to end: the real daemon as a child process, strangers on its
public port (a separate hostile process on 127.0.0.2-8), and what must not change for
everyone else: the well-behaved client's stream, the consumers' commits, the components,
the memory, and the secrets in the output."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected

from userstreamd.stream.client import open_ws

from .conftest import assert_rows_match, daemon_tables, query
from .helpers import eventually

pytestmark = pytest.mark.e2e

RATE = 100
MEMORY_BOUND_MB = 200  # the daemon's RSS under all of the abuse below (measured: ~70 MB)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _port(daemon: Any) -> int:
    ready = await trio.to_thread.run_sync(daemon.wait_for, "daemon.ready")
    return int(ready["url"].rstrip("/").rsplit(":", 1)[1])


async def test_hostile_clients_change_nothing_for_anyone_else(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": RATE, "seed": "hostile"}
    tables["broadcaster"] = {
        "port": 0,
        "groups": ["audit"],
        "max_connections": 2000,
        "max_connections_per_ip": 150,
        "handshake_timeout_s": 3.0,
        "ping_interval_s": 2.0,
        "pong_timeout_s": 2.0,
        "close_timeout_s": 1.0,
        "ack_timeout_s": 3.0,
        "client_lag_max": 1000,
        "max_messages_per_s": 50.0,
    }
    daemon = daemon_factory(tables)
    port = await _port(daemon)
    arrivals: list[tuple[float, int]] = []
    peak_mb = 0.0

    async def well_behaved() -> None:
        async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
            await ws.get_message()
            while True:
                message = json.loads(await ws.get_message())
                arrivals.append((time.monotonic(), message["seq"]))

    async def watch_memory() -> None:
        nonlocal peak_mb
        while True:
            peak_mb = max(peak_mb, _rss_mb(daemon.proc.pid))
            await trio.sleep(0.2)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(well_behaved)
            nursery.start_soon(watch_memory)
            await eventually(lambda: len(arrivals) >= 10)
            hostile_from = (time.time(), len(arrivals))
            hostile = await trio.run_process(
                [sys.executable, "-m", "tests.hostile", str(port)],
                capture_stdout=True,
                cwd=Path(__file__).parent.parent,
            )
            hostile_to = (time.time(), len(arrivals))
            await eventually(lambda: len(arrivals) >= hostile_to[1] + 10)
            nursery.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(daemon.stop) == 0
    answers = json.loads(hostile.stdout)

    # The strangers got clear answers.
    assert answers["status_101"] >= 100, answers  # the ones that were let in
    # Beyond the per-IP limit (150): a 429, or just a close while 64 answers are pending;
    # within it: closed at the handshake timeout.
    assert answers["half_open_429"] + answers["half_open_none"] == 500, answers
    assert answers["half_open_429"] >= 100 and answers["half_open_none"] >= 150, answers
    assert answers["status_400"] >= 60 and answers["status_404"] >= 20, answers
    assert answers["status_403"] >= 20, answers  # ?group=db on the public port
    assert answers.get("close_1009", 0) + answers.get("send_refused", 0) >= 2, answers
    assert answers.get("close_1008") == 1, json.dumps(answers)  # the flood of frames
    assert answers.get("close_4000") == 1, answers
    # The well-behaved client: every seq, in order, before, during and after the abuse.
    # (How long it ever waited is printed, not asserted: that is the machine's speed.)
    seqs = [seq for _, seq in arrivals]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the stream"
    assert hostile_from[1] < hostile_to[1] < len(arrivals), "the stream stopped during the abuse"
    pauses = [b - a for (a, _), (b, _) in pairwise(arrivals)]
    # The consumers kept committing through the abuse, and everything published is stored.
    commits = sorted(
        datetime.fromisoformat(e["timestamp"]).timestamp()
        for e in daemon.events("consumer.batch_inserted")
    )
    during = [t for t in commits if hostile_from[0] < t < hostile_to[0]]
    assert len(during) >= 2 and commits[-1] > hostile_to[0], "the consumers stopped committing"
    stall = max(b - a for a, b in pairwise(commits))
    published = daemon.events("producer.published")
    assert_rows_match(dsn, published)
    # Nothing restarted, nothing escaped a connection handler, memory stayed bounded.
    assert daemon.events("supervisor.restarted") == []
    last = daemon.events("daemon.stats")[-1]
    assert all(c["restarts"] == 0 for c in last["components"].values()), last["components"]
    assert last["broadcaster"]["edge"]["handler_errors"] == 0
    # (invalid UTF-8: the peer gets its close frame, 1007, before the TCP close)
    assert last["broadcaster"]["closed"]["closed_1007"] == 1, last["broadcaster"]["closed"]
    assert answers.get("close_1007") == 1, answers
    assert last["broadcaster"]["edge"]["handshake_timeouts"] >= 100
    assert daemon.events("broadcaster.connection_failed") == []
    print(
        f"peak RSS {peak_mb:.0f} MB, longest pause {max(pauses):.3f} s, commit gap {stall:.3f} s,"
        f" {len(published)} published at {RATE}/s, {hostile_to[0] - hostile_from[0]:.1f} s of abuse"
    )
    assert peak_mb < MEMORY_BOUND_MB, f"daemon RSS peaked at {peak_mb:.0f} MB"


async def test_tokens_and_a_rogue_group_member_cannot_thin_the_stream(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    viewer, rogue = "viewer-Qw8eRt5yUi3o", "rogue-Pa9sDf4gHj2k"
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {
        "source": "synthetic",
        "rate_per_s": 400,
        "seed": "rogue",
        "stop_at_position": 2000,
    }
    env = {"USERSTREAMD_TOKENS": f"viewer {viewer} read;rogue {rogue} read group:db"}
    daemon = daemon_factory(tables, env=env)
    port = await _port(daemon)
    url = f"ws://127.0.0.1:{port}/"
    with trio.fail_after(60):
        for token, target, status in [
            (None, url, 401),
            ("wrong-token-0123456789", url, 401),
            (viewer, f"{url}?group=db", 403),
            (rogue, f"{url}?group=db", 403),  # even with group:db: not on this port
        ]:
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_ws(target, token=token):
                    pass
            assert rejected.value.status_code == status
        async with open_ws(url, token=rogue) as plain:  # reads, and acks all it sees
            await plain.get_message()
            seen = 0
            while seen < 2000:
                message = json.loads(await plain.get_message())
                if message["type"] == "user":
                    seen = message["seq"]
                    if seen % 100 == 0:
                        ack = {"type": "ack", "seqs": list(range(seen - 99, seen + 1))}
                        await plain.send_message(json.dumps(ack))
        await eventually(
            lambda: (
                bool(daemon.events("daemon.stats"))
                and daemon.events("daemon.stats")[-1]["committed_through"] >= 2000
            )
        )
    assert await trio.to_thread.run_sync(daemon.stop) == 0
    assert query(dsn, "SELECT count(*) FROM incoming_users") == [(2000,)]
    refusals = daemon.events("broadcaster.refused")
    assert {e["status"] for e in refusals} == {401, 403}
    text = daemon.log_path.read_text()
    assert viewer not in text and rogue not in text


def test_no_secret_and_no_prefix_of_one_reaches_the_output(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """The database is unreachable at start: the daemon retries, gives up and exits 1,
    with tracebacks, and without a trace of the passwords or the token."""
    inline, from_env, token = "Zr7KqVx9LmT4pWs2", "Jh3GfD8sA1kL6mN0", "Xc5VbN7mQ2wE9rT4"
    tables = daemon_tables(tmp_path, f"postgresql://app:{inline}@127.0.0.1:1/app")
    tables["producer"] = {"source": "synthetic"}
    tables["supervisor"] = {
        "max_restarts": 2,
        "restart_delay_min_s": 0.1,
        "restart_delay_max_s": 0.2,
    }
    env = {"USERSTREAMD_DB_PASSWORD": from_env, "USERSTREAMD_TOKENS": f"web {token} read"}
    daemon = daemon_factory(tables, env=env)
    assert daemon.stop_when_exited() == 1
    output = daemon.log_path.read_text()
    assert daemon.events("daemon.giving_up"), output[-2000:]
    assert "exception" in output  # tracebacks were logged: they are where locals leaked
    for secret in (inline, from_env, token):
        for n in range(4, len(secret) + 1):
            assert secret[:n] not in output, f"{secret[:n]!r} of a secret is in the output"
