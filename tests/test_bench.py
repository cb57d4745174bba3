"""`userstreamd bench` runs every stage for real and reports figures (never asserted:
what is asserted is that each stage did the work it timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
    names = {
        "generate_users_per_s",
        "validate_rows_per_s",
        "hub_publish_fanout_per_s",
        "websocket_group_delivery_per_s",
        "postgres_insert_rows_per_s",
        "end_to_end_users_per_s",
    }
    assert set(report["results"]) == names
    assert all(value > 0 for value in report["results"].values())
    assert report["users"] == 300 and report["database"] == "external"
    assert report["verified"] == {"postgres_rows": 300, "end_to_end_rows": 300}
    for name in names:
        assert name in result.stdout
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
