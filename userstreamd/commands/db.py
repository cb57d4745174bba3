"""``userstreamd db status`` and ``userstreamd db migrate``: the command and its output
(aligned text, or with ``--json`` the `Status` object whose keys
`userstreamd.store.admin` documents); what it reads and writes is the store's.

Exit codes: 0 done; 1 the database could not be reached or read (one line on stderr
naming what was tried).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from ..config import Config
from ..errors import UserstreamdError
from ..logs import redact
from ..store.admin import Epoch, Status, apply_migrations, how, printable, read_status
from ..store.postgres import migrations
from .parsing import add_command
from .run import configured


def run(args: argparse.Namespace) -> int:
    """Show the database's state, or apply its migrations."""
    config = configured(args, logs=sys.stderr)  # stdout is for the report
    if args.action == "migrate":
        return migrate(config)
    return status(config, as_json=args.json)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands,
        "db",
        run,
        "  userstreamd db status\n"
        "  userstreamd db status --json | jq .rows\n"
        "  userstreamd db migrate --config /etc/userstreamd/config.toml\n",
    )
    parser.add_argument(
        "action",
        choices=("status", "migrate"),
        help="status: rows, latest seq per epoch, checkpoints, ingest lag, dead letters; "
        "migrate: apply the pending schema migrations",
    )
    parser.add_argument("--json", action="store_true", help="status as one JSON object")
    return parser


def _fail(command: str, exc: UserstreamdError) -> int:
    print(f"userstreamd: db {command}: {redact(printable(str(exc), 1000))}", file=sys.stderr)
    return 1


def status(config: Config, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the database's state (read only); the exit code."""
    out = out or sys.stdout
    try:
        report = read_status(config)
    except UserstreamdError as exc:
        return _fail("status", exc)
    out.write(msgspec.json.encode(report).decode() + "\n" if as_json else render(report))
    return 0


def migrate(config: Config, *, out: TextIO | None = None) -> int:
    """Apply the pending migrations and say which; the exit code."""
    out = out or sys.stdout
    names = {v: name for v, name, _ in migrations()}
    try:
        database, applied = apply_migrations(config)
    except UserstreamdError as exc:
        return _fail("migrate", exc)
    out.write(f"database  {database.target} ({how(database)})\n")
    for version in applied:
        out.write(f"applied   {version} {names[version]}\n")
    latest = max(names)
    out.write(f"schema    {'now' if applied else 'already'} at version {latest}\n")
    return 0


def _at(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _versions(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) or "none"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def render(status: Status) -> str:
    """The report as aligned text."""
    db, schema = status.database, status.schema
    missing = "- (table not created yet: run `userstreamd db migrate`)"
    lines = [
        ("database", f"{db.target} ({how(db)})"),
        ("checked at", _at(status.checked_at)),
        ("schema", f"applied {_versions(schema.applied)}; pending {_versions(schema.pending)}"),
    ]
    if schema.unknown:
        lines.append(("", f"not known to this version: {_versions(schema.unknown)}"))
    lines.append(("rows", missing if status.rows is None else f"{status.rows} in incoming_users"))
    if status.epochs == []:
        lines.append(("epochs", "none yet"))
    elif status.epochs is not None:
        shown = f"{status.epochs_total} ({len(status.epochs)} most recent below"
        lines.append(("epochs", f"{shown}, with the checkpoints of group {status.group!r})"))
    if (i := status.ingest) is not None and i.last_row_at is None:
        lines.append(("last row", "none yet"))
    elif i is not None:
        lines.append(("last row", f"{_at(i.last_row_at)} ({_s(i.since_last_row_s)} ago)"))
        lines.append(("last minute", f"{i.window_rows} rows in the minute up to the last row"))
        lines.append(
            (
                "latency",
                f"produced -> stored p50 {_s(i.latency_p50_s)}, p99 {_s(i.latency_p99_s)} "
                f"(newest {i.latency_sample} rows)",
            )
        )
    if (dl := status.dead_letters) is not None:
        lines.append(("dead letters", f"{dl.total} total, {dl.last_hour} in the last hour"))
        if (latest := dl.latest) is not None:
            lines.append(("latest", f"{_at(latest.received_at)} from {latest.source}:"))
            lines.append(("", latest.error))
    if (b := status.upstream_budget) is not None:
        lines.append(
            (
                "upstream budget",
                f"{b.spent} of {b.limit} users in the last {b.window_s:g} s ({b.url})",
            )
        )
    width = max(len(key) for key, _ in lines) + 2
    text = [f"{key:<{width}}{value}".rstrip() for key, value in lines]
    if status.epochs:
        text += ["", *_epoch_table(status.epochs)]
    return "\n".join(text) + "\n"


def _epoch_table(epochs: list[Epoch]) -> list[str]:
    header = (
        "EPOCH",
        "CONFIGURED",
        "ROWS",
        "ROWS BY SOURCE",
        "LATEST SEQ",
        "CHECKPOINT",
        "POSITION",
        "LAG",
        "AT",
    )
    rows = [header]
    for e in epochs:
        c = e.checkpoint
        by_source = ", ".join(f"{printable(k, 20)} {n}" for k, n in e.rows_by_source.items())
        rows.append(
            (
                printable(e.epoch, 40),
                printable(e.source or "-", 20),
                str(e.rows),
                by_source or "-",
                "-" if e.latest_seq is None else str(e.latest_seq),
                "-" if c is None else str(c.seq),
                "-" if c is None else str(c.position),
                "-" if e.checkpoint_lag is None else str(e.checkpoint_lag),
                "-" if c is None else _at(c.updated_at),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 4, 5, 6, 7}
    return [
        *(
            "  ".join(
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
            for row in rows
        ),
        "",
        "CONFIGURED is producer.source when the epoch began (what regenerates it);",
        "ROWS BY SOURCE is what the stored users are: randomuser from the API, synthetic",
        "generated here (the source, or the fallback while the API was unreachable).",
    ]
