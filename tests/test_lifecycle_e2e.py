"""The daemon's life cycle as a real process: nothing outlives it, giving up is quick."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import daemon_tables
from .helpers import wait_until

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet has stopped running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_kill_9_of_the_daemon_leaves_no_process_behind(tmp_path: Path, daemon_factory: Any) -> None:
    """Item 12: the embedded PostgreSQL (under its guard) and the consumer workers all end
    soon after a SIGKILL of the daemon, by themselves (they used to keep running until the
    next start)."""
    tables = daemon_tables(tmp_path, "")  # embedded PostgreSQL
    tables["producer"] = {"source": "synthetic", "rate_per_s": 100}
    tables["consumers"]["processes"] = True
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    wait_until(lambda: len(daemon.events("consumer.batch_inserted")) >= 2, 30)
    left = _descendants(daemon.proc.pid)
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in left if _alive(pid)}
    assert "postgres" in names and len(left) >= 5, names  # guard, postmaster, 2 workers...
    daemon.proc.kill()
    daemon.proc.wait()
    killed_at = time.monotonic()
    wait_until(lambda: not [pid for pid in left if _alive(pid)], 30, "children gone")
    print(f"children gone {time.monotonic() - killed_at:.1f} s after the SIGKILL")


def test_a_guarded_program_stops_when_the_lifeline_ends(tmp_path: Path) -> None:
    """The guard on its own: the end of stdin sends the stop signal; the exit status is
    the program's."""
    script = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(3)); print('up', flush=True); time.sleep(60)"
    command = ["--stop-signal", "INT", "--", sys.executable, "-c", script]
    with subprocess.Popen(
        [sys.executable, "-m", "userstreamd.runtime.lifeline", *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as guard:
        assert guard.stdout is not None and guard.stdout.readline() == b"up\n"
        assert guard.stdin is not None
        guard.stdin.close()
        assert guard.wait(10) == 3


def test_a_guarded_program_dies_with_its_guard(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "userstreamd.runtime.lifeline", "--", "sleep", "60"],
        stdin=subprocess.PIPE,
    ) as guard:
        wait_until(lambda: bool(_descendants(guard.pid)), 10, "sleep started")
        (child,) = _descendants(guard.pid)
        os.kill(guard.pid, signal.SIGKILL)
        guard.wait()
    wait_until(lambda: not _alive(child), 30, "sleep killed with its guard")  # (< its 60 s)


def test_giving_up_stops_at_once_without_draining(tmp_path: Path, daemon_factory: Any) -> None:
    """Item 13: when the database dies and the supervisor gives up, the daemon does not
    wait out the drain on the database it gave up on (here 60 s), nor stop the workers
    one after the other."""
    tables = daemon_tables(tmp_path, "")
    tables["producer"] = {"source": "synthetic", "rate_per_s": 100}
    tables["consumers"]["processes"] = True
    tables["supervisor"] = {"max_restarts": 0, "drain_timeout_s": 60, "stop_timeout_s": 30}
    daemon = daemon_factory(tables)
    daemon.wait_for("daemon.ready")
    wait_until(lambda: len(daemon.events("consumer.batch_inserted")) >= 2, 30)
    os.kill(daemon.events("database.embedded_started")[0]["pid"], signal.SIGKILL)
    assert daemon.stop_when_exited(timeout_s=90) == 1
    gave_up = daemon.events("daemon.giving_up")[0]
    stopped = daemon.events("daemon.stopped")[0]
    print(f"{_ts(stopped) - _ts(gave_up):.1f} s from giving up to stopped")
    # No drain at all (neither finished nor timed out), no component waited out.
    assert daemon.events("daemon.stopping")[0]["giving_up"] is True
    assert not daemon.events("daemon.drained")
    assert not daemon.events("daemon.drain_timeout")
    assert not daemon.events("supervisor.stop_timeout")


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()
