"""``userstreamd check``: validate the config file, or print the configuration in effect."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..serve.auth import is_loopback
from .parsing import add_command
from .run import configured


def run(args: argparse.Namespace) -> int:
    """Validate the config file (and the tokens and TLS files it names) and say so."""
    config = configured(args, public_port=True, logs=sys.stderr)
    if config.http.enabled and not is_loopback(config.http.host):
        print(
            f"userstreamd: warning: {config.path}: http.host = {config.http.host!r} is not "
            "loopback: /metrics, /healthz, /readyz, /status.json and the live page have no "
            "authentication; keep that port behind a firewall or a proxy",
            file=sys.stderr,
        )
    if args.effective:
        from ..config import effective_toml

        print(effective_toml(config), end="")
    else:
        print(f"{config.path}: ok")
    return 0


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands,
        "check",
        run,
        "  userstreamd check --config config.toml\n"
        "  USERSTREAMD_BROADCASTER_PORT=9000 userstreamd check --effective\n",
    )
    parser.add_argument(
        "--effective",
        action="store_true",
        help="print the configuration in effect: defaults filled in, environment overrides "
        "applied and marked, secrets as ***",
    )
    return parser
