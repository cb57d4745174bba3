"""Log lines never tear: one write per line, children's lines forwarded whole, colours
only on a terminal and never with NO_COLOR."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from userstreamd.logs import configure_logging, forward, get_logger

from .conftest import daemon_tables, toml_text
from .helpers import drain, wait_until

ANSI = re.compile(rb"\x1b\[[0-9;]*m")
TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _under_pty(
    command: list[str], env: dict[str, str], until: Callable[[bytes], bool] | None
) -> bytes:
    """Run `command` with a pseudo-terminal as stdout and stderr; SIGINT once `until` holds
    for what it wrote so far (None: let it finish); everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env={**os.environ, **env}
    )
    os.close(slave)
    output, stop = bytearray(), threading.Event()
    reader = threading.Thread(target=drain, args=(master, output, stop))
    reader.start()
    try:
        if until is not None:
            wait_until(lambda: until(bytes(output)) or proc.poll() is not None, 90, "output")
            proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        stop.set()
        reader.join(10)
        os.close(master)
    return bytes(output)


def _log_one_line(fmt: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from userstreamd.logs import configure_logging, get_logger;"
        f"configure_logging('info', {fmt!r}); get_logger().info('hello', who='world')",
    ]


def test_console_colours_only_on_a_terminal_and_never_with_no_color() -> None:
    env = {"NO_COLOR": ""}
    coloured = _under_pty(_log_one_line("auto"), env, None)
    assert b"hello" in coloured and ANSI.search(coloured)
    plain = _under_pty(_log_one_line("auto"), {"NO_COLOR": "1"}, None)
    assert b"hello" in plain and b"\x1b" not in plain
    piped = subprocess.run(
        _log_one_line("console"), capture_output=True, timeout=60, env={**os.environ, **env}
    )
    assert b"hello" in piped.stdout and b"\x1b" not in piped.stdout


@pytest.fixture(autouse=True)
def _default_logging() -> Any:
    yield
    structlog.reset_defaults()  # not our stdout capture, once the test is over


def test_a_childs_lines_are_forwarded_whole(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    huge = json.dumps({"event": "consumer.failed", "level": "error", "tb": "x" * 2**20})
    forward(huge.encode(), worker=3)
    forward(b"Traceback (most recent call last):", worker=3)
    forward(b'{"event": "db", "dsn": "postgresql://u:hunter2@h/db"}')
    get_logger().info("after")
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == huge, "a JSON line from a child passes through unchanged"
    crash = json.loads(lines[1])
    assert crash["event"] == "child.output"
    assert crash["line"] == "Traceback (most recent call last):"
    assert crash["worker"] == 3
    assert "hunter2" not in lines[2], "forwarded lines are redacted too"
    assert json.loads(lines[3])["event"] == "after"
    assert len(lines) == 4


def test_forwarded_lines_are_rendered_for_the_console(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    forward(b'{"event":"consumer.milestone","level":"info","timestamp":"2026-01-01T00:00:00Z"}')
    forward(b'{"event":"noise","level":"debug"}')  # below the level: dropped
    out = capfd.readouterr().out
    assert out.startswith("2026-01-01T00:00:00Z [info")
    assert "consumer.milestone" in out and "noise" not in out
    assert out.count("\n") == 1


def _busy_daemon(tmp_path: Path, dsn: str) -> Path:
    """4 consumer processes at 2,000 users/s, the producer logging every user."""
    tables = daemon_tables(tmp_path, dsn)
    tables["daemon"].update(log_format="auto", log_level="info")
    tables["producer"] = {
        "source": "synthetic",
        "rate_per_s": 2000,
        "log_each_user_below_per_s": 5000,
    }
    tables["consumers"].update(count=4, processes=True, batch_size=200)
    tables["database"]["milestone_every"] = 50
    path = tmp_path / "busy.toml"
    path.write_text(toml_text(tables))
    return path


def _daemon(path: Path) -> list[str]:
    return [sys.executable, "-m", "userstreamd", "--config", str(path)]


@pytest.mark.e2e
def test_no_line_tears_under_a_pipe(tmp_path: Path, dsn: str) -> None:
    """Busy until over 1,000 users were published and every worker logged a milestone
    (however long that takes here), then SIGINT: every line of the pipe is one record."""
    path = _busy_daemon(tmp_path, dsn)
    proc = subprocess.Popen(
        _daemon(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    lines: list[bytes] = []

    def read() -> None:
        assert proc.stdout is not None
        with proc.stdout as out:
            for line in out:
                lines.append(line)

    events: list[dict[str, Any]] = []

    def busy_enough() -> bool:
        events.extend(json.loads(line) for line in lines[len(events) :])
        workers = {e["worker"] for e in events if e["event"] == "consumer.milestone"}
        published = sum(e["event"] == "producer.published" for e in events)
        return workers == {1, 2, 3, 4} and published > 1000

    reader = threading.Thread(target=read)
    reader.start()
    try:
        started = time.monotonic()
        wait_until(lambda: busy_enough() or proc.poll() is not None, 90, "a busy daemon")
        print(f"busy enough after {time.monotonic() - started:.1f} s")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        proc.kill()
        reader.join(90)
    events = [json.loads(line) for line in lines]
    workers = {e["worker"] for e in events if e["event"] == "consumer.milestone"}
    assert workers == {1, 2, 3, 4}, "every worker's lines came through"
    assert sum(e["event"] == "producer.published" for e in events) > 1000


def _terminal_lines(out: bytes) -> list[bytes]:
    return [line for line in ANSI.sub(b"", out).split(b"\r\n") if line]


def _milestone_workers(lines: list[bytes]) -> set[bytes]:
    milestones = [line for line in lines if b"consumer.milestone" in line]
    return {m[1] for line in milestones if (m := re.search(rb"worker=(\d)", line))}


@pytest.mark.e2e
def test_no_two_records_share_a_line_on_a_terminal(tmp_path: Path, dsn: str) -> None:
    path = _busy_daemon(tmp_path, dsn)

    def busy_enough(out: bytes) -> bool:
        if out.count(b"\r\n") <= 1000:
            return False
        lines = _terminal_lines(out)
        return len(lines) > 1000 and _milestone_workers(lines) == {b"1", b"2", b"3", b"4"}

    lines = _terminal_lines(_under_pty(_daemon(path), {"NO_COLOR": ""}, busy_enough))
    assert len(lines) > 1000
    for line in lines:
        assert TIMESTAMP.match(line), line
        assert len(TIMESTAMP.findall(line)) == 1, line
    workers = _milestone_workers(lines)
    assert workers == {b"1", b"2", b"3", b"4"}, "every worker's lines came through"


async def test_long_lines_of_several_children_arrive_whole(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """4 processes each logging 10 lines of 256 KiB at once (far beyond what one pipe
    write keeps whole), forwarded as the daemon forwards its workers' output."""
    import trio

    from userstreamd.runtime.workers import _relay

    configure_logging("info", "json")
    child = (
        "import sys\n"
        "from userstreamd.logs import configure_logging, get_logger\n"
        "configure_logging('info', 'json')\n"
        "for i in range(10):\n"
        "    get_logger().info('long', worker=int(sys.argv[1]), i=i, text='x' * 2**18)\n"
    )
    procs = []
    async with trio.open_nursery() as nursery:
        for worker in range(4):
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", child, str(worker)], stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            nursery.start_soon(_relay, proc.stdout, worker)
            procs.append(proc)
    assert [await proc.wait() for proc in procs] == [0] * 4
    lines = capfd.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert sorted((e["worker"], e["i"]) for e in events) == [
        (w, i) for w in range(4) for i in range(10)
    ]
    assert all(len(e["text"]) == 2**18 for e in events)


async def test_output_without_newlines_is_forwarded_in_bounded_pieces(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A child that writes 1 MiB with no newline: the daemon holds at most `max_line`
    bytes of it, and every byte comes out, as lines of at most that size."""
    import trio

    from userstreamd.runtime.workers import _relay

    configure_logging("info", "json")
    child = "import sys; sys.stdout.write('x' * 2**20); sys.stdout.flush()"
    proc = await trio.lowlevel.open_process([sys.executable, "-c", child], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    await _relay(proc.stdout, 7, max_line=2**16)
    assert await proc.wait() == 0
    events = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert {e["event"] for e in events} == {"child.output"}
    assert all(e["worker"] == 7 and len(e["line"]) <= 2**16 for e in events)
    assert sum(len(e["line"]) for e in events) == 2**20
