"""``userstreamd bench`` (no mode): throughput of each stage of the pipeline, measured.

Each benchmark runs the real code on `users` synthetic users and reports users per
second (best of `repeat` runs): generation, validation into rows, the hub's publish and
fan-out, delivery over a real WebSocket on 127.0.0.1 to a consumer-group member that
acks, batch inserts into a real PostgreSQL (an embedded server in a temporary directory
unless a DSN is given), and the whole daemon end to end (in-process, with 2 consumer
processes and its own embedded server: from ready until `users` are committed). Each run
also counts the rows it left in the table (``verified``). Figures print as a table;
``--json FILE`` writes them and ``--plot FILE.png`` draws them (matplotlib, the ``plot``
extra). While it runs, a terminal on stderr shows each stage's progress (rich); anything
else gets nothing, so a pipe or a CI log holds no escape codes.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.conninfo import make_conninfo
from rich.console import Console
from rich.progress import Progress, TaskID

from .. import __version__
from ..config import Config, DaemonConfig
from ..serve.broadcaster import run_broadcaster
from ..sources.synthetic import synthetic_user
from ..store.bootstrap import run_database
from ..store.postgres import Envelope, PostgresStore, UserRow, row_values
from ..stream.client import open_ws
from ..stream.hub import Hub
from ..stream.protocol import Ack, UserMessage, decode_server, encode
from ..stream.records import parse_user
from .display import progress_rows

SEED = "bench"
# Each figure's name in the JSON and its label in the printed table (and in docs/performance.md's).
LABELS = {
    "generate_users_per_s": "synthetic generation",
    "validate_rows_per_s": "validation into rows",
    "hub_publish_fanout_per_s": "hub publish + fan-out (1 group, 2 readers)",
    "websocket_group_delivery_per_s": "WebSocket delivery to one group member",
    "postgres_insert_rows_per_s": "PostgreSQL batch insert (COPY + ON CONFLICT, 500/batch)",
    "end_to_end_users_per_s": "the whole daemon, end to end into PostgreSQL",
}
# A stage tells the display how many users it has done every TICK users (or at each of
# its batches or acks): measured with and without a display, the difference is noise.
TICK = 500
Done = Callable[[int], None]


def _ignore(users: int) -> None:
    pass


def _users(n: int, done: Done = _ignore) -> list[dict[str, Any]]:
    users: list[dict[str, Any]] = []
    for first in range(1, n + 1, TICK):
        users += [synthetic_user(SEED, p) for p in range(first, min(first + TICK, n + 1))]
        done(len(users))
    return users


def _rows(users: list[dict[str, Any]], epoch: str, done: Done = _ignore) -> list[UserRow]:
    now = datetime.now(UTC)
    rows: list[UserRow] = []
    for first in range(0, len(users), TICK):
        rows += [
            row_values(parse_user(u), u, Envelope(p, epoch, "synthetic", now, now))
            for p, u in enumerate(users[first : first + TICK], first + 1)
        ]
        done(len(rows))
    return rows


def bench_generate(n: int, done: Done = _ignore) -> float:
    start = time.perf_counter()
    _users(n, done)
    return time.perf_counter() - start


def bench_validate(n: int, users: list[dict[str, Any]], done: Done = _ignore) -> float:
    start = time.perf_counter()
    _rows(users[:n], "bench", done)
    return time.perf_counter() - start


def bench_hub(n: int, users: list[dict[str, Any]], done: Done = _ignore) -> float:
    """Publish with one consumer group (acking everything) and two plain readers."""
    hub = Hub("bench", buffer_messages=n + 1)
    member = hub.join("db", "bench", window=n)
    readers = [hub.subscribe("a"), hub.subscribe("b")]
    start = time.perf_counter()
    for p, user in enumerate(users[:n], 1):
        hub.publish_nowait(user, "synthetic", p)
        for reader in readers:  # (as the broadcaster takes them: all that is due at once)
            hub.next_frames_nowait(reader, 256)
        hub.next_member_frames_nowait(member, 256)
        hub.ack(member, [p])
        if p % TICK == 0:
            done(p)
    elapsed = time.perf_counter() - start
    done(n)
    return elapsed


async def _bench_websocket(n: int, users: list[dict[str, Any]], done: Done) -> float:
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
                        done(received)
            elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def bench_websocket(n: int, users: list[dict[str, Any]], done: Done = _ignore) -> float:
    return trio.run(_bench_websocket, n, users, done)


def bench_insert(n: int, users: list[dict[str, Any]], dsn: str, done: Done = _ignore) -> float:
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
            done(min(i + 500, n))
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
[http]
port = 0
[consumers]
count = 2
processes = true
"""


async def _bench_end_to_end(n: int, done: Done = _ignore) -> float:
    """The whole daemon, in-process, with 2 consumer processes and its embedded server:
    seconds from ready until the group has committed `n` users."""
    from ..config import load_config
    from ..runtime.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="usd-bench-") as folder:
        path = Path(folder) / "bench.toml"
        path.write_text(_E2E_CONFIG.format(n=n))
        daemon = Daemon(load_config(path))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run, stop.wait)
            await daemon.ready.wait()
            start = time.perf_counter()
            while (committed := daemon.committed_through()) < n:
                done(committed)
                await trio.sleep(0.005)  # a poll is the probe
            done(n)
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


class _Stage:
    """Runs one stage `repeat` times; with a display (`progress`), its row there: its label,
    which run, a bar of the users done over all runs, the elapsed time, then its figure."""

    def __init__(self, progress: Progress | None, n: int, repeat: int, name: str) -> None:
        self._progress, self._n, self._repeat, self._run = progress, n, repeat, 1
        self._task = TaskID(0)
        if progress is not None:
            self._task = progress.add_task(LABELS[name], total=n * repeat, status="setting up")

    def best(self, run: Callable[[Done], float]) -> float:
        """Users per second of the fastest of `repeat` runs; `run(done)` returns seconds."""
        seconds = []
        for number in range(1, self._repeat + 1):
            self._run = number
            self._update(completed=(number - 1) * self._n, status=f"run {number}/{self._repeat}")
            seconds.append(run(self._done))
        per_s = round(self._n / min(seconds), 1)  # as the report has it
        self._update(completed=self._n * self._repeat, status=f"{per_s:,.0f} users/s")
        return per_s

    def _done(self, users: int) -> None:
        self._update(completed=(self._run - 1) * self._n + users)

    def _update(self, **changes: Any) -> None:
        if self._progress is not None:  # thread-safe: the insert stage runs in a thread
            self._progress.update(self._task, **changes)


@contextmanager
def _open_display(live: bool, n: int, repeat: int) -> Iterator[Callable[[str], _Stage]]:
    """Yields `stage(name)`: with `live`, each stage's progress on stderr (rich) until the
    block ends; otherwise nothing is shown."""
    if not live:
        yield partial(_Stage, None, n, repeat)
        return
    console = Console(stderr=True)
    # The bar, the status ("123,456 users/s") and the elapsed time keep their width on a
    # narrow terminal; the label gives way (ends in "…").
    label_width = max(16, min(max(map(len, LABELS.values())), console.width - 47))
    with progress_rows(console, label_width) as progress:
        yield partial(_Stage, progress, n, repeat)


def run_benchmarks(
    n: int = 20_000, repeat: int = 3, dsn: str = "", *, progress: bool = False
) -> dict[str, Any]:
    """Every stage on `n` users, best of `repeat`, into `dsn` (or an embedded server).
    With `progress`, and stderr a terminal, each stage's progress shows there meanwhile."""
    users = _users(n)
    results: dict[str, float] = {}
    with _open_display(progress and sys.stderr.isatty(), n, repeat) as stage:
        for name, run in [
            ("generate_users_per_s", partial(bench_generate, n)),
            ("validate_rows_per_s", partial(bench_validate, n, users)),
            ("hub_publish_fanout_per_s", partial(bench_hub, n, users)),
            ("websocket_group_delivery_per_s", partial(bench_websocket, n, users)),
        ]:
            results[name] = stage(name).best(run)
        insert = stage("postgres_insert_rows_per_s")
        results["postgres_insert_rows_per_s"] = (
            insert.best(partial(bench_insert, n, users, dsn))
            if dsn
            else trio.run(
                _on_embedded_database,
                lambda embedded: insert.best(partial(bench_insert, n, users, embedded)),
            )
        )
        results["end_to_end_users_per_s"] = stage("end_to_end_users_per_s").best(
            partial(trio.run, _bench_end_to_end, n)
        )
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


_NO_MATPLOTLIB = "matplotlib is not installed: pip install 'userstreamd[plot]'"
# The plot's axis is logarithmic when the fastest stage is over this many times the slowest
# (on a linear axis the slowest bar would be a sliver).
LOG_SCALE_SPREAD = 20


def plot_available() -> str | None:
    """None when `write_plot` can work, else the one-line reason and fix (checked before
    the benchmarks run, not after minutes of work)."""
    try:
        from matplotlib.backends import backend_agg  # noqa: F401
    except ImportError:
        return _NO_MATPLOTLIB
    return None


def write_plot(report: dict[str, Any], path: str) -> None:
    """A PNG bar chart of `report`'s figures at `path`: users/s per stage under the table's
    labels, each figure written at the end of its bar, on a log axis when the spread needs
    it (LOG_SCALE_SPREAD). Drawn on matplotlib's Agg canvas: no display, no pyplot state.
    Raises ImportError naming the extra when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        raise ImportError(_NO_MATPLOTLIB, name="matplotlib") from exc
    values = [float(v) for v in report["results"].values()]
    labels = [LABELS.get(name, name) for name in report["results"]]
    figure = Figure(figsize=(11, 1.8 + 0.55 * len(values)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    bars = axes.barh(labels, values, color="tab:blue")
    axes.invert_yaxis()  # the first stage on top, as in the table
    axes.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=4)
    if _log_scale(values):
        axes.set_xscale("log")
        axes.set_xlim(min(values) / 2, max(values) * 4)  # room for the figures
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("users/s (log scale)")
    else:
        axes.set_xlim(0, max(values) * 1.18)
        axes.set_xlabel("users/s")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    axes.set_title(
        f"userstreamd {report['version']} bench: {report['users']:,} users, best of "
        f"{report['repeat']}\nPython {report['python']}, {report['cpus']} CPUs, "
        f"{report['database']} PostgreSQL"
    )
    figure.savefig(path, format="png", dpi=100)


def _log_scale(values: list[float]) -> bool:
    return min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPREAD
