"""The progress of ``bench e2e`` and ``bench fanout`` on stderr: a row per step (its
label, a bar for the timed ones, a status, the elapsed time), drawn by rich only when
stderr is a terminal; otherwise nothing is written at all (a pipe or a CI log holds no
escape codes). The figures themselves go to stdout, either way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from ..logs import logs_through

LABEL_WIDTH = 44
TICK_S = 0.5  # how often a timed step refreshes its status


class Step:
    """One row: `status(text)` while it runs, `done(text)` at its end."""

    def __init__(self, progress: Progress | None, label: str, seconds: float | None) -> None:
        self._progress, self._task = progress, TaskID(0)
        if progress is not None:
            total = seconds if seconds else None  # None: a pulsing bar
            self._task = progress.add_task(label, total=total, status="")

    def status(self, text: str, elapsed_s: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=text, completed=elapsed_s or 0)

    def done(self, text: str = "done") -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=text, total=1, completed=1)
            self._progress.stop_task(self._task)


class Steps:
    """Makes the rows (without a `progress`, rows that show nothing)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    def step(self, label: str, seconds: float | None = None) -> Step:
        return Step(self._progress, label, seconds)

    def wait(self, label: str, seconds: float, status: Callable[[], str] | None = None) -> None:
        """Sleep `seconds` as a timed row, its status from `status()` every TICK_S."""
        step = self.step(label, seconds)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            step.status(status() if status else "", elapsed)
            time.sleep(min(TICK_S, seconds - elapsed))
        step.done(status() if status else "done")


@contextmanager
def progress_rows(console: Console, label_width: int) -> Iterator[Progress]:
    """The rows every mode of ``bench`` draws (label, bar, status, elapsed time), live
    while inside; meanwhile the log lines are printed above them, through the console."""

    def above(line: str) -> None:
        console.print(Text.from_ansi(line), soft_wrap=True)

    with _rows(console, label_width) as progress, logs_through(above):
        yield progress


def _rows(console: Console, label_width: int) -> Progress:
    return Progress(
        TextColumn(
            "{task.description}",
            markup=False,
            table_column=Column(width=label_width, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=20),
        TextColumn("{task.fields[status]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,  # the refresh thread shares the GIL with the timed code
        redirect_stdout=False,  # stdout is the report's (and the logs')
    )


@contextmanager
def open_steps(live: bool, console: Console | None = None) -> Iterator[Steps]:
    """The rows on `console` (stderr's by default) when `live`; else rows that show
    nothing."""
    if not live:
        yield Steps(None)
        return
    with progress_rows(console or Console(stderr=True), LABEL_WIDTH) as progress:
        yield Steps(progress)
