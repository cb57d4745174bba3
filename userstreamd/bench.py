"""``userstreamd bench``: throughput of each stage of the pipeline, measured, not assumed.

Each benchmark runs the real code on `users` synthetic users and reports users per
second (best of `repeat` runs): generation, validation into rows, the hub's publish and
fan-out, delivery over a real WebSocket on 127.0.0.1 to a consumer-group member that
acks, batch inserts into a real PostgreSQL (an embedded server in a temporary directory
unless a DSN is given), and the whole daemon end to end (in-process, with 2 consumer
processes and its own embedded server: from ready until `users` are committed). Each run
also counts the rows it left in the table (``verified``). Figures print as a table;
``--json FILE`` writes them.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from . import __version__
from .broadcaster import run_broadcaster
from .config import Config, DaemonConfig
from .hub import Hub
from .messages import Ack, UserMessage, decode_server, encode
from .records import parse_user
from .sources.synthetic import synthetic_user
from .store.bootstrap import run_database
from .store.postgres import Envelope, PostgresStore, UserRow, row_values
from .wsclient import open_ws

SEED = "bench"
# Each figure's name in the JSON and its label in the printed table (and in the README's).
LABELS = {
    "generate_users_per_s": "synthetic generation",
    "validate_rows_per_s": "validation into rows",
    "hub_publish_fanout_per_s": "hub publish + fan-out (1 group, 2 readers)",
    "websocket_group_delivery_per_s": "WebSocket delivery to one group member",
    "postgres_insert_rows_per_s": "PostgreSQL batch insert (COPY + ON CONFLICT, 500/batch)",
    "end_to_end_users_per_s": "the whole daemon, end to end into PostgreSQL",
}


def _users(n: int) -> list[dict[str, Any]]:
    return [synthetic_user(SEED, p) for p in range(1, n + 1)]


def _rows(users: list[dict[str, Any]], epoch: str) -> list[UserRow]:
    now = datetime.now(UTC)
    return [
        row_values(parse_user(u), u, Envelope(p, epoch, "synthetic", now, now))
        for p, u in enumerate(users, 1)
    ]


def bench_generate(n: int) -> float:
    start = time.perf_counter()
    _users(n)
    return time.perf_counter() - start


def bench_validate(n: int, users: list[dict[str, Any]]) -> float:
    start = time.perf_counter()
    _rows(users[:n], "bench")
    return time.perf_counter() - start


def bench_hub(n: int, users: list[dict[str, Any]]) -> float:
    """Publish with one consumer group (acking everything) and two plain readers."""
    hub = Hub("bench", buffer_messages=n + 1)
    member = hub.join("db", "bench", window=n)
    readers = [hub.subscribe("a"), hub.subscribe("b")]
    start = time.perf_counter()
    for p, user in enumerate(users[:n], 1):
        hub.publish_nowait(user, "synthetic", p)
        for reader in readers:
            hub.next_frame_nowait(reader)
        hub.next_member_frame_nowait(member)
        hub.ack(member, [p])
    return time.perf_counter() - start


async def _bench_websocket(n: int, users: list[dict[str, Any]]) -> float:
    hub = Hub("bench", buffer_messages=n + 1)
    hub.declare_group("db", holds_producer=True)  # as the daemon's own: never cut off
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_broadcaster, hub, "127.0.0.1", 0)
        async with open_ws(f"ws://127.0.0.1:{port}/?group=db&window=2000") as ws:
            await ws.get_message()  # welcome
            start = time.perf_counter()

            async def produce() -> None:
                for p, user in enumerate(users[:n], 1):
                    await hub.publish(user, "synthetic", p)

            nursery.start_soon(produce)
            received, pending = 0, []
            while received < n:
                message = decode_server(await ws.get_message())
                if isinstance(message, UserMessage):
                    received += 1
                    pending.append(message.seq)
                    if len(pending) >= 500 or received == n:
                        await ws.send_message(encode(Ack(seqs=pending)))
                        pending = []
            elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def bench_websocket(n: int, users: list[dict[str, Any]]) -> float:
    return trio.run(_bench_websocket, n, users)


def bench_insert(n: int, users: list[dict[str, Any]], dsn: str) -> float:
    """Batches of 500 rows, one statement and one transaction each, into fresh tables in a
    schema of their own (dropped afterwards: the bench never touches the real table)."""
    schema = f"userstreamd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    store = PostgresStore(
        make_conninfo(dsn, options=f"-c search_path={schema}"), application_name="userstreamd-bench"
    )
    try:
        store.migrate()
        rows = _rows(users[:n], schema)
        start = time.perf_counter()
        for i in range(0, len(rows), 500):
            store.insert_users(rows[i : i + 500])
        elapsed = time.perf_counter() - start
        _verified["postgres_rows"] = store.query("SELECT count(*) FROM incoming_users")[0][0]
        return elapsed
    finally:
        store.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


_E2E_CONFIG = """
[daemon]
state_dir = "state"
log_level = "warning"
[producer]
source = "synthetic"
seed = "bench"
rate_per_s = 100000
stop_at_position = {n}
[broadcaster]
port = 0
[consumers]
count = 2
processes = true
"""


async def _bench_end_to_end(n: int) -> float:
    """The whole daemon, in-process, with 2 consumer processes and its embedded server:
    seconds from ready until the group has committed `n` users."""
    from .config import load_config
    from .daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="usd-bench-") as folder:
        path = Path(folder) / "bench.toml"
        path.write_text(_E2E_CONFIG.format(n=n))
        daemon = Daemon(load_config(path))
        group = daemon.config.consumers.group
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run, stop.wait)
            await daemon.ready.wait()
            start = time.perf_counter()
            while daemon.hub.watermark(group)[0] < n:  # noqa: ASYNC110 (a poll is the probe)
                await trio.sleep(0.005)
            elapsed = time.perf_counter() - start
            store = PostgresStore(daemon.dsn)
            count = await trio.to_thread.run_sync(
                store.query, "SELECT count(*) FROM incoming_users"
            )
            store.close()
            _verified["end_to_end_rows"] = count[0][0]
            stop.set()
        return elapsed


async def _on_embedded_database(work: Callable[[str], float]) -> float:
    """`work(dsn)` in a thread, against an embedded server in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="usd-bench-") as folder:
        config = Config(daemon=DaemonConfig(state_dir=folder), path=f"{folder}/bench.toml")
        async with trio.open_nursery() as nursery:
            dsn = await nursery.start(run_database, config)
            try:
                return await trio.to_thread.run_sync(work, dsn)
            finally:
                nursery.cancel_scope.cancel()


# What the last run of each stage verifiably did (rows counted in the table afterwards).
_verified: dict[str, int] = {}


def _best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def run_benchmarks(n: int = 20_000, repeat: int = 3, dsn: str = "") -> dict[str, Any]:
    users = _users(n)
    results: dict[str, float] = {
        "generate_users_per_s": n / _best(lambda: bench_generate(n), repeat),
        "validate_rows_per_s": n / _best(lambda: bench_validate(n, users), repeat),
        "hub_publish_fanout_per_s": n / _best(lambda: bench_hub(n, users), repeat),
        "websocket_group_delivery_per_s": n / _best(lambda: bench_websocket(n, users), repeat),
    }
    if dsn:
        results["postgres_insert_rows_per_s"] = n / _best(
            lambda: bench_insert(n, users, dsn), repeat
        )
    else:
        results["postgres_insert_rows_per_s"] = n / trio.run(
            _on_embedded_database, lambda dsn: _best(lambda: bench_insert(n, users, dsn), repeat)
        )
    results["end_to_end_users_per_s"] = n / _best(lambda: trio.run(_bench_end_to_end, n), repeat)
    return {
        "version": __version__,
        "users": n,
        "repeat": repeat,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "database": "external" if dsn else "embedded",
        "results": {k: round(v, 1) for k, v in results.items()},
        "verified": dict(_verified),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"userstreamd {report['version']} bench: {report['users']} users, best of "
        f"{report['repeat']}, Python {report['python']}, {report['cpus']} CPUs, "
        f"{report['database']} PostgreSQL"
    )
    print(f"  {'stage':<58} {'users/s':>9}")
    for name, value in report["results"].items():
        print(f"  {LABELS[name]:<58} {value:>9,.0f}")


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
