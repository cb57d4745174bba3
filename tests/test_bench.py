"""`userstreamd bench` runs every stage for real and reports figures (never asserted:
what is asserted is that each stage did the work it timed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from userstreamd.bench import LABELS


def test_bench_prints_and_writes_every_figure(tmp_path: Path, pg_server: str) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "userstreamd",
            "bench",
            "--users",
            "300",
            "--repeat",
            "1",
            "--json",
            str(out),
            "--dsn",
            pg_server,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
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
