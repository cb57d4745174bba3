"""`userstreamd bench` runs every stage for real and reports figures (never asserted:
what is asserted is that each stage did the work it timed); its progress shows on a
terminal only; --plot draws the figures."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from userstreamd import bench
from userstreamd.bench import LABELS
from userstreamd.cli import main

from .helpers import drain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT: dict[str, Any] = {
    "version": "0.1.0",
    "users": 20000,
    "repeat": 3,
    "python": "3.11.7",
    "cpus": 2,
    "database": "embedded",
    "results": dict(
        zip(LABELS, [32700.0, 99000.0, 111800.0, 14800.0, 35500.0, 8100.0], strict=True)
    ),
    "verified": {"postgres_rows": 20000, "end_to_end_rows": 20000},
}


def _bench_command(pg_server: str, *options: str) -> list[str]:
    command = [sys.executable, "-m", "userstreamd", "bench", "--users", "300", "--repeat", "1"]
    return [*command, "--dsn", pg_server, *options]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert height >= 300 and width >= 600
    assert len({tuple(pixel) for pixel in image.reshape(-1, image.shape[2])}) > 10  # drawn on


def test_bench_prints_and_writes_every_figure(tmp_path: Path, pg_server: str) -> None:
    """Through a pipe, as in CI: the table, the JSON and the plot; no progress display and
    not one escape code."""
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        _bench_command(pg_server, "--json", str(out), "--plot", str(plot)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    assert "run 1/1" not in result.stderr
    _assert_png(plot)
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(LABELS)
    assert all(value > 0 for value in report["results"].values())
    assert report["users"] == 300 and report["database"] == "external"
    assert report["verified"] == {"postgres_rows": 300, "end_to_end_rows": 300}
    for label in LABELS.values():
        assert label in result.stdout
    # The bench works in a schema of its own and leaves nothing behind.
    assert (
        "userstreamd_bench_"
        not in subprocess.run(
            [
                sys.executable,
                "-c",
                "import psycopg,sys; print(psycopg.connect(sys.argv[1]).execute("
                "\"SELECT string_agg(nspname, ',') FROM pg_namespace\").fetchone()[0])",
                pg_server,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_every_speed_figure_in_the_readme_is_a_bench_figure() -> None:
    """The README's speed table has exactly the stages `bench` measures, under the same
    labels, next to the command that produced them (it used to quote figures no command
    printed)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    assert "`userstreamd bench --json bench.json`" in section
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \|$", section, re.MULTILINE)
    assert {label for label, _ in rows} == set(LABELS.values())
    figures = re.findall(r"\b\d[\d,]* (?:users|rows)/s\b", readme)
    assert not figures, f"speed figures outside the bench table: {figures}"


def _run_with_stderr_on_a_terminal(command: list[str]) -> tuple[int, str, str]:
    """`command` with stdout a pipe and stderr a 120-column pseudo-terminal: its exit code,
    its stdout and what its terminal showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(slave)
    terminal, stop = bytearray(), threading.Event()
    reader = threading.Thread(target=drain, args=(master, terminal, stop))
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()  # nothing to do once it has exited
        stop.set()
        reader.join(10)
        os.close(master)
    return proc.returncode, stdout.decode(), terminal.decode(errors="replace")


def test_bench_shows_each_stage_on_a_terminal(pg_server: str) -> None:
    """stderr a terminal: a live row per stage (its label, which run, a bar, elapsed and at
    the end its figure); stdout still holds the plain table and nothing else."""
    code, stdout, terminal = _run_with_stderr_on_a_terminal(_bench_command(pg_server))
    assert code == 0, terminal
    assert "\x1b[" in terminal  # drawn live, not printed once
    for label in LABELS.values():
        assert label in terminal
    assert "run 1/1" in terminal and "0:00:0" in terminal and "━" in terminal
    assert re.search(r"\d users/s", terminal)
    assert "\x1b" not in stdout
    header = re.search(r"^userstreamd \S+ bench: ", stdout, re.MULTILINE)
    assert header, stdout
    table = stdout[header.start() :].splitlines()  # after any warning log line
    assert "bench: 300 users, best of 1" in table[0]
    assert [line[2:60].rstrip() for line in table[2:]] == list(LABELS.values())


def test_bench_help_offers_plot() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "userstreamd", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--plot FILE.png" in result.stdout


@pytest.mark.parametrize(
    ("slowest", "log_scale"), [(8100.0, False), (900.0, True)], ids=["linear", "log"]
)
def test_write_plot_draws_a_png(tmp_path: Path, slowest: float, log_scale: bool) -> None:
    """A real PNG of a report, on a linear axis or, when the fastest stage is over
    LOG_SCALE_SPREAD times the slowest, a logarithmic one."""
    report = {**REPORT, "results": {**REPORT["results"], "end_to_end_users_per_s": slowest}}
    assert bench._log_scale(list(report["results"].values())) is log_scale
    bench.write_plot(report, str(tmp_path / "bench.png"))
    _assert_png(tmp_path / "bench.png")


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` now fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_plot_fails_fast_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any benchmark runs: one line on stderr that names the extra, exit code 2."""
    assert bench.plot_available() is None
    _without_matplotlib(monkeypatch)
    reason = bench.plot_available()
    assert reason is not None and "pip install 'userstreamd[plot]'" in reason
    with pytest.raises(ImportError, match=re.escape("userstreamd[plot]")):
        bench.write_plot(REPORT, str(tmp_path / "bench.png"))
    plot = tmp_path / "never.png"
    assert main(["bench", "--users", "300", "--repeat", "1", "--plot", str(plot)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "userstreamd[plot]" in err
    assert not plot.exists()
