"""The command line: ``userstreamd [--config FILE] [COMMAND] [OPTIONS]``. `main` parses
and runs; each command is a module of this package with its parser (``add_parser``) and
its handler (``run``): `run` (also when no command is given), `check`, `init_config`,
`db`, `bench`, and `workers` for the internal ``consumer-worker`` and ``fanout-worker``
(the daemon starts them; hidden from ``--help``). ``tail`` runs `tail`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..config import load_config
from ..errors import ConfigError
from . import bench, check, db, init_config, run, workers
from .parsing import DEFAULT_CONFIG, Help, add_command, config_option

TOKEN_ENV = "USERSTREAMD_TOKEN"


def _tail_url(args: argparse.Namespace) -> str:
    """--url, else the config file's broadcaster (when the file exists), else the default."""
    if args.url:
        return str(args.url)
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists():
        return "ws://127.0.0.1:8765/"
    broadcaster = load_config(args.config).broadcaster  # (its address: no topology needed)
    host = broadcaster.host if broadcaster.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    scheme = "wss" if broadcaster.tls_cert_file else "ws"
    return f"{scheme}://{host}:{broadcaster.port}/"


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the stream in the terminal, resuming after a disconnect."""
    from . import tail

    url = _tail_url(args)
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"userstreamd: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    return tail.run(
        url,
        json_lines=args.json,
        since=args.since,
        epoch=args.epoch,
        group=args.group,
        token=token,
        ca_file=args.ca_file,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userstreamd",
        description="Stream random users from an API over WebSocket into PostgreSQL.",
        epilog="examples:\n"
        "  userstreamd --config config.toml            run the daemon\n"
        "  userstreamd check --config config.toml      validate a config file\n"
        "  userstreamd COMMAND --help                  a command's options and examples",
        formatter_class=Help,
    )
    config_option(parser, DEFAULT_CONFIG)
    parser.add_argument("--version", action="version", version=f"userstreamd {__version__}")
    parser.set_defaults(handler=run.run)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    run.add_parser(commands)
    check.add_parser(commands)
    init_config.add_parser(commands)
    tail = add_command(
        commands,
        "tail",
        cmd_tail,
        "  userstreamd tail                            the config file's broadcaster\n"
        "  userstreamd tail --json | jq .user.email\n"
        "  userstreamd tail --url ws://host:8765/ --since 4200\n"
        f"  {TOKEN_ENV}=... userstreamd tail --group watchers\n",
    )
    tail.add_argument(
        "--url",
        help="the broadcaster's WebSocket URL (default: from the config file's [broadcaster], "
        "else ws://127.0.0.1:8765/)",
    )
    tail.add_argument("--json", action="store_true", help="print each user frame as JSON")
    tail.add_argument(
        "--since", type=int, metavar="SEQ", help="start after this seq (resume from there)"
    )
    tail.add_argument("--epoch", help="the epoch --since refers to (default: the current one)")
    tail.add_argument(
        "--group", metavar="NAME", help="join this consumer group as a member (and ack)"
    )
    tail.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"a file holding the token to present (default: ${TOKEN_ENV}, if set)",
    )
    tail.add_argument("--ca-file", metavar="FILE", help="CA certificates for a wss:// URL")

    db.add_parser(commands)
    bench.add_parser(commands)
    workers.add_parser(commands)  # internal: not listed
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for problem in str(exc).splitlines():
            print(f"userstreamd: config error: {problem}", file=sys.stderr)
        return 2
