"""The command line: ``userstreamd [--config FILE] [COMMAND]``; one function per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import __version__
from .config import Config, load_config
from .errors import ConfigError
from .logs import add_secrets, configure_logging, get_logger
from .supervisor import describe

DEFAULT_CONFIG = "config.toml"


def _run_logged(main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run(main); a crash is one JSON log line with its traceback, and exit code 1."""
    try:
        return trio.run(main, *args)
    except Exception as exc:
        get_logger().error("daemon.failed", error=describe(exc), exc_info=exc)
        return 1


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM."""
    from .daemon import run_daemon

    add_secrets(*args.tokens.secrets())
    return _run_logged(run_daemon, config, args.tokens, args.ssl_context)


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    """Validate the config file (and the tokens and TLS files it names) and say so."""
    print(f"{config.path}: ok")
    return 0


def cmd_consumer_worker(config: Config, args: argparse.Namespace) -> int:
    """Internal: one consumer as a child process of the daemon."""
    from .workers import run_consumer_worker

    return _run_logged(run_consumer_worker, config, args.worker, args.url, args.ready_fd)


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure each stage's throughput; print it, and write JSON with --json FILE."""
    from .bench import print_report, run_benchmarks, write_json

    report = run_benchmarks(args.users, args.repeat, args.dsn)
    print_report(report)
    if args.json:
        write_json(report, args.json)
    return 0


def _dsn_secrets(dsn: str) -> list[str]:
    """The password written into a DSN, if any (so that no log line shows it)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return [str(conninfo_to_dict(dsn).get("password") or "")]
    except Exception:  # a DSN psycopg cannot parse: the patterns in logs.redact still apply
        return []


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "consumer-worker": cmd_consumer_worker,
    "bench": None,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userstreamd",
        description="Stream random users from an API over WebSocket into PostgreSQL.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"TOML config file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--version", action="version", version=f"userstreamd {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=sorted(COMMANDS),
        help="run the daemon (default), check the config, or bench the pipeline's stages",
    )
    bench = parser.add_argument_group("bench")
    bench.add_argument("--users", type=int, default=20_000, help="users per benchmark")
    bench.add_argument("--repeat", type=int, default=3, help="runs per benchmark (best wins)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--dsn", default="", help="PostgreSQL to insert into (default: embedded)")
    # consumer-worker's own options (internal: the daemon starts it).
    parser.add_argument("--worker", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        configure_logging("warning")
        return cmd_bench(args)
    try:
        config = load_config(args.config)
        if args.command in ("run", "check"):  # the public port's files, before anything starts
            from .auth import load_tokens
            from .edge import tls_context

            args.tokens, args.ssl_context = load_tokens(config), tls_context(config)
    except ConfigError as exc:
        print(f"userstreamd: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.daemon.log_level, config.daemon.log_format)
    add_secrets(config.db_password(), *_dsn_secrets(config.database.dsn))
    command = COMMANDS[args.command]
    assert command is not None
    return command(config, args)
