"""The command line: ``userstreamd [--config FILE] [COMMAND]``; one function per command."""

from __future__ import annotations

import argparse
import sys

import trio

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, UserstreamdError
from .logs import configure_logging, get_logger

DEFAULT_CONFIG = "config.toml"


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM."""
    from .daemon import run_daemon

    try:
        return trio.run(run_daemon, config)
    except UserstreamdError as exc:
        get_logger().error("daemon.failed", error=str(exc))
        return 1


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    """Validate the config file and say so."""
    print(f"{config.path}: ok")
    return 0


def cmd_consumer_worker(config: Config, args: argparse.Namespace) -> int:
    """Internal: one consumer as a child process of the daemon."""
    from .workers import run_consumer_worker

    return trio.run(run_consumer_worker, config, args.worker, args.url, args.ready_fd)


COMMANDS = {"run": cmd_run, "check": cmd_check, "consumer-worker": cmd_consumer_worker}


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
        help="run the daemon (default) or check the config and exit",
    )
    # consumer-worker's own options (internal: the daemon starts it).
    parser.add_argument("--worker", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"userstreamd: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.daemon.log_level, config.daemon.log_format)
    return COMMANDS[args.command](config, args)
