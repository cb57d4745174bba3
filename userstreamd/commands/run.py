"""``userstreamd run`` (and no command at all): the daemon until SIGINT/SIGTERM; and what
every command that loads the config file does first (`configured`), and how a command
that runs trio logs a crash (`run_logged`)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import trio

from ..config import ROLES, Config, load_config
from ..errors import describe
from ..logs import add_secrets, configure_logging, dsn_secrets, get_logger
from ..topology import check_role, config_rules, topology_class
from .parsing import add_command


def run_logged(main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run(main); a crash is one JSON log line with its traceback, and exit code 1."""
    try:
        return trio.run(main, *args)
    except Exception as exc:
        get_logger().error("daemon.failed", error=describe(exc), exc_info=exc)
        return 1


def configured(
    args: argparse.Namespace, *, public_port: bool = False, logs: TextIO | None = None
) -> Config:
    """The config file (and, for the commands that open the public port, the tokens and
    TLS files it names), logging set up from it (to `logs`, else stdout); ConfigError
    before anything starts."""
    config = load_config(args.config, rules=config_rules)
    if public_port:
        from ..serve.auth import load_tokens
        from ..serve.edge import tls_context

        args.tokens, args.ssl_context = load_tokens(config), tls_context(config)
    topology_class(config.cluster.bus).preflight(config)
    configure_logging(config.daemon.log_level, config.daemon.log_format, logs)
    add_secrets(config.db_password(), config.reader_password(), *dsn_secrets(config.database.dsn))
    return config


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM."""
    from ..runtime.daemon import run_daemon

    role = getattr(args, "role", "all")
    serves = role in ("all", "broadcaster")  # (only then are tokens and TLS files needed)
    config = configured(args, public_port=serves)
    check_role(config, role)
    if not serves:
        from ..serve.auth import Tokens

        args.tokens, args.ssl_context = Tokens((), required=False), None
    add_secrets(*args.tokens.secrets())
    return run_logged(run_daemon, config, args.tokens, args.ssl_context, role)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands,
        "run",
        run,
        "  userstreamd run --config /etc/userstreamd/config.toml\n"
        "  userstreamd run --config cluster.toml --role broadcaster\n",
    )
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help='which parts to run (default: all); one part needs [cluster] bus = "nats"',
    )
    return parser
