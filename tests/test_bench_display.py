"""bench's live progress rows on a terminal (`userstreamd/bench/display.py`): a log line
written while they are live is drawn once, above them, and the rows stay whole. The
terminal is pyte's emulator, fed what rich and the logs wrote."""

from __future__ import annotations

import io

import pyte
import structlog
from rich.console import Console

from userstreamd.bench.display import LABEL_WIDTH, progress_rows
from userstreamd.logs import configure_logging, get_logger

WIDTH, HEIGHT = 120, 30


def _screen(written: str) -> list[str]:
    screen = pyte.Screen(WIDTH, HEIGHT)
    screen.set_mode(pyte.modes.LNM)  # a newline returns the carriage, as a tty's onlcr does
    pyte.Stream(screen).feed(written)
    return [line.rstrip() for line in screen.display if line.strip()]


def test_a_log_line_during_the_live_rows_is_drawn_once_above_them() -> None:
    """Issue 22 item 17: `embedded_postgres.path_opened` (logged as root while bench
    starts the daemon) used to be written into rich's live area: rows drawn two or three
    times."""
    terminal = io.StringIO()  # stderr: the rows and the logs share it, as in bench
    console = Console(file=terminal, force_terminal=True, width=WIDTH, height=HEIGHT)
    configure_logging("warning", "console", terminal)
    try:
        with progress_rows(console, LABEL_WIDTH) as progress:
            started = progress.add_task("starting the daemon", total=1, status="ready")
            progress.update(started, completed=1)
            streaming = progress.add_task("streaming", total=10, status="120 users/s")
            progress.refresh()  # the rows are on the screen
            get_logger().warning("embedded_postgres.path_opened", path="/root", added="o+x")
            progress.update(streaming, completed=5, status="130 users/s")
            progress.refresh()
    finally:
        structlog.reset_defaults()
    lines = _screen(terminal.getvalue())
    assert len(lines) == 3, "\n".join(lines)
    assert "embedded_postgres.path_opened" in lines[0] and "path=/root" in lines[0]
    assert lines[1].startswith("starting the daemon") and "ready" in lines[1]
    assert lines[2].startswith("streaming") and "130 users/s" in lines[2]
