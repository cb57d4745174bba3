"""How every command's parser is built: `add_command` gives a subcommand its ``--help``
(its handler's docstring, then examples) and the ``--config`` option, which may come
before or after the command's name."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

DEFAULT_CONFIG = "config.toml"

Handler = Callable[[argparse.Namespace], int]


class Help(argparse.RawDescriptionHelpFormatter):
    pass


def add_command(
    commands: Any, name: str, handler: Handler, examples: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its docstring and `examples`; each one also takes
    --config, so it may come before or after the command's name."""
    summary = (handler.__doc__ or "").strip()
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary[0].lower() + summary[1:].rstrip("."),
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=Help,
    )
    config_option(parser, argparse.SUPPRESS)
    parser.set_defaults(handler=handler)
    return parser


def config_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=default,
        metavar="FILE",
        help=f"TOML config file (default: {DEFAULT_CONFIG}); any key may be overridden by "
        "the environment variable USERSTREAMD_<TABLE>_<KEY>",
    )
