"""Supervision with real child processes, real signals and a real sd_notify socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest

from userstreamd.store.embedded import EmbeddedPostgres

from .conftest import assert_rows_match, daemon_tables, toml_text
from .helpers import free_ports, wait_until

pytestmark = pytest.mark.e2e


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_killed_consumer_process_is_restarted_and_nothing_else_stops(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": 50, "seed": "kill"}
    tables["consumers"]["processes"] = True
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    time.sleep(1.5)
    victim = next(e for e in daemon.events("supervisor.process_started") if e["worker"] == 1)
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> list[dict[str, Any]]:
        return [
            e
            for e in daemon.events("supervisor.process_started")
            if e["worker"] == 1 and e["pid"] != victim["pid"]
        ]

    wait_until(restarted)
    time.sleep(1.5)
    assert daemon.stop() == 0
    backoff = daemon.events("supervisor.backoff")
    assert [e["component"] for e in backoff] == ["consumer-1"]
    assert 0.05 <= backoff[0]["restart_in_s"] <= 0.1, "restart_delay_min_s, jittered"
    crash = [e for e in daemon.events("supervisor.component_crashed")]
    assert [e["component"] for e in crash] == ["consumer-1"]
    assert "killed by SIGKILL" in crash[0]["error"]
    assert [e["component"] for e in daemon.events("supervisor.restarted")] == ["consumer-1"]
    # The state is in the logs too: restart count and last exit per component.
    states = [
        e["components"]
        for e in daemon.events("daemon.stats")
        if e["components"]["consumer-1"]["restarts"] == 1
    ]
    assert states and "killed by SIGKILL" in states[0]["consumer-1"]["last_exit"]
    assert states[0]["producer"] == {"state": "running", "restarts": 0, "last_exit": None}
    # The producer never waited: the other consumer and the buffer carried on.
    published = daemon.events("producer.published")
    assert not daemon.events("producer.backpressure")
    assert [e["seq"] for e in published] == list(range(1, len(published) + 1))
    assert _ts(published[0]) < killed_at < _ts(published[-1])
    assert_rows_match(dsn, published)


def test_component_crashing_on_every_start_hits_the_intensity_limit(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    # The broadcaster's address is not this machine's (TEST-NET-1): it fails at every
    # start. (A port in use is not restarted at all: see the test after this one.)
    tables = daemon_tables(tmp_path, dsn)
    tables["broadcaster"] = {"host": "192.0.2.1", "port": 0, "auth": "none"}
    tables["producer"] = {"source": "synthetic"}
    tables["supervisor"] = {
        "restart_delay_min_s": 0.1,
        "restart_delay_max_s": 0.8,
        "max_restarts": 4,
        "max_restarts_window_s": 30,
    }
    daemon = daemon_factory(tables)
    code = daemon.stop_when_exited(timeout_s=60)
    assert code == 1
    backoffs = [e for e in daemon.events("supervisor.backoff")]
    assert {e["component"] for e in backoffs} == {"broadcaster"}
    delays = [e["restart_in_s"] for e in backoffs]
    assert len(delays) == 4
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.8], strict=True):
        assert base / 2 <= delay <= base
    giving_up = daemon.events("daemon.giving_up")
    assert len(giving_up) == 1
    assert giving_up[0]["reason"].startswith("broadcaster: more than 4 restarts in 30 s")
    assert "Cannot assign requested address" in giving_up[0]["reason"]
    assert not daemon.events("daemon.ready")
    assert not daemon.events("supervisor.stop_timeout"), "the failed start stops at once"
    assert daemon.events("database.embedded_stopped") or tables["database"]["dsn"]


def _lines_naming(daemon: Any, text: str) -> list[str]:
    return [line for line in daemon.log_path.read_text().splitlines() if text in line]


def test_a_second_daemon_on_the_same_ports_exits_1_at_once_naming_the_address(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    """Issue 22 item 10: a port held at start is a configuration fault, not a crash to
    restart: one line naming the address, exit 1, no restarts; the first daemon lives on."""
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": 20}
    http_port, ws_port = free_ports(2)
    tables["http"] = {"port": http_port}
    tables["broadcaster"] = {"port": ws_port}
    first = daemon_factory(tables, name="first")
    first.wait_for("daemon.ready")
    started_at = time.monotonic()
    second = daemon_factory(tables, name="second")  # the same file: same ports, same state
    assert second.stop_when_exited(timeout_s=60) == 1
    print(f"the second daemon exited {time.monotonic() - started_at:.2f} s after its start")
    address = f"127.0.0.1:{http_port}"  # (the operations port is the first one it opens)
    [line] = _lines_naming(second, address)
    [giving_up] = second.events("daemon.giving_up")
    assert giving_up["reason"].startswith(f"http: cannot listen on {address} (http.port)")
    assert address in line and "Traceback" not in line
    for event in ("supervisor.component_crashed", "supervisor.backoff", "daemon.ready"):
        assert not second.events(event), event
    # The first one was not disturbed: it goes on streaming and stops cleanly.
    published = len(first.events("producer.published"))
    wait_until(lambda: len(first.events("producer.published")) > published + 10, 30, "streaming")
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_a_daemon_on_a_held_port_or_state_directory_exits_1_naming_it(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    """The broadcaster's port held by another program, then the state directory held by
    another userstreamd (its lock file names the holder's pid): each one line, exit 1."""
    from userstreamd.store.embedded import hold_state_dir

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tables = daemon_tables(tmp_path, dsn)
        tables["broadcaster"] = {"port": port}
        tables["producer"] = {"source": "synthetic"}
        held_port = daemon_factory(tables, name="held-port")
        assert held_port.stop_when_exited(timeout_s=60) == 1
    [giving_up] = held_port.events("daemon.giving_up")
    assert giving_up["reason"].startswith(
        f"broadcaster: cannot listen on 127.0.0.1:{port} (broadcaster.port): the address is "
        "in use by another process (another userstreamd?)"
    )
    assert len(_lines_naming(held_port, f"127.0.0.1:{port}")) == 1
    assert not held_port.events("supervisor.component_crashed")

    state = tmp_path / "held-state"
    state.mkdir()
    tables = daemon_tables(tmp_path, dsn)
    tables["daemon"]["state_dir"] = str(state)
    del tables["database"]  # the embedded server: it needs the state directory's lock
    with hold_state_dir(state):  # as a running daemon (or `userstreamd db`) holds it
        held_state = daemon_factory(tables, name="held-state")
        assert held_state.stop_when_exited(timeout_s=60) == 1
    [giving_up] = held_state.events("daemon.giving_up")
    assert giving_up["reason"].startswith(
        f"database: {state} (daemon.state_dir) is in use by another userstreamd (pid {os.getpid()})"
    )
    assert len(_lines_naming(held_state, f"pid {os.getpid()}")) == 1
    assert not held_state.events("supervisor.component_crashed")
    assert not (state / "postgres" / "PG_VERSION").exists(), "no initdb under a held directory"


def test_sigterm_at_200_per_s_commits_everything_received(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": 200, "seed": "term"}
    tables["consumers"].update(processes=True, batch_size=100)
    tables["supervisor"] = {"stop_timeout_s": 10, "drain_timeout_s": 10}
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    wait_until(lambda: len(daemon.events("producer.published")) >= 600, 60, "600 published")
    sent_at = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    print(f"stopped {time.monotonic() - sent_at:.1f} s after SIGTERM")
    # Within the drain and stop timeouts: neither ran out.
    assert not daemon.events("daemon.drain_timeout")
    assert not daemon.events("supervisor.stop_timeout")
    published = daemon.events("producer.published")
    assert len(published) >= 600
    drained = daemon.events("daemon.drained")
    assert drained and drained[0]["committed_through"] == drained[0]["last_seq"] == len(published)
    assert_rows_match(dsn, published)
    assert {e["how"] for e in daemon.events("supervisor.process_stopped")} == {"exited with code 0"}


def test_sd_notify_ready_watchdog_status_stopping(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        tables = daemon_tables(tmp_path, dsn)
        tables["producer"] = {"source": "synthetic", "rate_per_s": 20}
        daemon = daemon_factory(
            tables, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        )
        messages: list[tuple[float, str]] = []

        def receive_until(text: str) -> None:
            while not any(text in m for _, m in messages):
                data = sock.recv(4096).decode()
                messages.append((time.time(), data))

        receive_until("READY=1")
        ready_event = daemon.wait_for("daemon.ready")
        while sum("WATCHDOG=1" in m for _, m in messages) < 3:  # one every 0.5 s
            messages.append((time.time(), sock.recv(4096).decode()))
        daemon.proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.stop_when_exited() == 0
    ready = next(m for _, m in messages if "READY=1" in m)
    assert f"MAINPID={daemon.proc.pid}" in ready and "STATUS=" in ready
    assert "not ready" not in ready, ready  # the STATUS= line says what /readyz says
    ready_at = next(t for t, m in messages if "READY=1" in m)
    assert ready_at >= _ts(ready_event) - 0.05, "READY=1 only once every component is up"
    assert sum("WATCHDOG=1" in m for _, m in messages) >= 3
    watchdogs = [t for t, m in messages if "WATCHDOG=1" in m]
    print("watchdog intervals", [round(b - a, 2) for a, b in pairwise(watchdogs)])
    statuses = [m for _, m in messages if m.startswith("STATUS=")]
    assert statuses and "users streamed at 20/s from synthetic" in statuses[-1]
    assert not any("not ready" in m for m in statuses), statuses
    assert messages[-1][1].startswith("STOPPING=1")


def test_sighup_reloads_rate_and_rejects_a_broken_file(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": 5}
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    tables["producer"]["rate_per_s"] = 50
    daemon.config_path.write_text(toml_text(tables))
    daemon.proc.send_signal(signal.SIGHUP)
    changed = daemon.wait_for("producer.rate_changed")
    assert (changed["old"], changed["new"]) == (5.0, 50.0)
    assert daemon.wait_for("daemon.reloaded")["applied"] == ["producer.rate_per_s"]
    # A key only a restart applies: logged, left alone, and the daemon lives on (this
    # used to crash it at the next status line).
    tables["consumers"]["group"] = "renamed"
    daemon.config_path.write_text(toml_text(tables))
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_for("daemon.reload_needs_restart")["keys"] == ["consumers.group"]
    daemon.config_path.write_text(toml_text(tables) + "\n[producer]\nrate_per_s = 'fast'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    rejected = daemon.wait_for("daemon.reload_rejected")
    count = len(daemon.events("producer.published"))
    wait_until(lambda: len(daemon.events("producer.published")) > count + 30, 30, "streaming")
    wait_until(lambda: len(daemon.events("daemon.stats")) >= 2, 30, "stats lines")
    assert daemon.stop() == 0
    assert str(daemon.config_path) in rejected["error"]
    committed = daemon.events("daemon.drained")[0]["committed_through"]
    assert committed == len(daemon.events("producer.published"))


def test_a_second_signal_exits_at_once(tmp_path: Path, dsn: str, daemon_factory: Any) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": 200}
    tables["consumers"]["processes"] = True
    tables["supervisor"] = {"drain_timeout_s": 60, "stop_timeout_s": 60}
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    time.sleep(1)
    for pid in [e["pid"] for e in daemon.events("supervisor.process_started")]:
        os.kill(pid, signal.SIGSTOP)  # consumers frozen: a graceful stop would wait 60 s
    sent_at = time.monotonic()
    daemon.proc.send_signal(signal.SIGINT)
    daemon.wait_for("daemon.stopping")
    daemon.proc.send_signal(signal.SIGINT)
    try:
        code = daemon.stop_when_exited(timeout_s=30)
    finally:
        for pid in [e["pid"] for e in daemon.events("supervisor.process_started")]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 1  # (stop_when_exited's 30 s: not the 60 s a graceful stop would wait)
    print(f"exited {time.monotonic() - sent_at:.1f} s after the first signal")
    actions = [e["action"] for e in daemon.events("daemon.signal")]
    assert actions == ["graceful stop", "immediate exit"]
    assert not daemon.events("daemon.drained") and not daemon.events("daemon.drain_timeout")


def test_two_daemons_cannot_share_a_state_directory(tmp_path: Path, daemon_factory: Any) -> None:
    tables = daemon_tables(tmp_path, "")  # embedded PostgreSQL in tmp_path/state
    tables["producer"] = {"source": "synthetic", "rate_per_s": 5}
    tables["supervisor"] = {"max_restarts": 1}
    first = daemon_factory(tables, name="first")
    first.wait_for("daemon.ready")
    second = daemon_factory(tables, name="second")
    assert second.stop_when_exited(timeout_s=60) == 1
    reason = second.events("daemon.giving_up")[0]["reason"]
    assert f"in use by another userstreamd (pid {first.proc.pid})" in reason
    time.sleep(0.5)
    assert first.proc.poll() is None, "the first daemon and its server carry on"
    assert not second.events("embedded_postgres.stale_server")
    assert first.stop() == 0
    assert first.events("database.embedded_stopped")[0]["exit_code"] == 0


def _gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (dead, waiting for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_a_killed_postmaster_is_restarted_though_a_backend_outlived_it(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """Item 2: kill -9 of the embedded postmaster while a backend is busy (a loop checks
    for no postmaster death): the backend keeps the shared memory, and the restart failed
    (`pre-existing shared memory block ... is still in use`) until the daemon gave up.
    The daemon kills what is left of the old server, and restarts it at the first try."""
    tables = daemon_tables(tmp_path, "")  # the daemon's own embedded server
    tables["daemon"]["log_level"] = "info"
    tables["producer"] = {"source": "synthetic", "rate_per_s": 50}
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready", 120)
    data = tmp_path / "state" / "postgres"
    admin = EmbeddedPostgres(data).dsn
    busy = psycopg.connect(admin, autocommit=True)
    backend = busy.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    looping = threading.Thread(target=_loop_forever, args=(busy,), daemon=True)
    looping.start()
    try:
        wait_until(lambda: _active(admin, backend), 30, "the loop running")
        os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        wait_until(lambda: len(daemon.events("database.ready")) == 2, 60, "a second start")
        assert _gone(backend), "the old server's backend lives on"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(backend, signal.SIGKILL)
        looping.join(10)
    crashed = [e for e in daemon.events("supervisor.component_crashed")]
    assert [e["component"] for e in crashed] == ["database"]  # the kill, and nothing after
    [reaped] = daemon.events("embedded_postgres.leftovers_killed")
    assert backend in reaped["pids"]
    assert daemon.stop() == 0


def _loop_forever(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute("DO $$ BEGIN LOOP END LOOP; END $$")
    conn.close()


def _active(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row == ("active",)
