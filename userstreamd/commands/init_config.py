"""``userstreamd init-config``: write the commented default config file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .parsing import DEFAULT_CONFIG, add_command


def run(args: argparse.Namespace) -> int:
    """Write the commented default config file."""
    from ..config import default_config_text

    text = default_config_text()
    if args.path == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.path)
    try:
        with path.open("w" if args.force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        print(f"userstreamd: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"userstreamd: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}; check it with: userstreamd check --config {path}")
    return 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands,
        "init-config",
        run,
        "  userstreamd init-config                     write ./config.toml\n"
        "  userstreamd init-config /etc/userstreamd/config.toml --force\n"
        "  userstreamd init-config - | less            print it\n",
    )
    parser.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"where to write it (default: {DEFAULT_CONFIG}; - for standard output)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    return parser
