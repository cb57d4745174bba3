"""``userstreamd check``: validate the config file, or print the configuration in effect."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from ..config import Config, is_loopback
from .parsing import add_command
from .run import configured


def config_warnings(config: Config) -> Iterator[tuple[str, str]]:
    """(key, why) for values that are valid but likely not what was meant."""
    p, ru = config.producer, config.randomuser
    allowed_per_s = ru.budget_users / ru.budget_window_s
    if p.source == "randomuser" and p.rate_per_s > allowed_per_s:
        then = (
            "the synthetic fallback serves the rest of each window"
            if p.fallback == "synthetic"
            else "the stream stops for the rest of each window (no fallback)"
        )
        yield (
            "producer.rate_per_s",
            f"{p.rate_per_s:g} users/s is more than the Random User API's budget allows "
            f"(randomuser.budget_users {ru.budget_users} per budget_window_s "
            f"{ru.budget_window_s:g} = {allowed_per_s:.3g} users/s): the budget is spent "
            f"{ru.budget_users / p.rate_per_s:.3g} s into each window, then {then}",
        )
    if config.http.enabled and not is_loopback(config.http.host):
        yield (
            "http.host",
            f"{config.http.host!r} is not loopback: /metrics, /healthz, /readyz, /status.json "
            "and the live page have no authentication; keep that port behind a firewall or "
            "a proxy",
        )


def run(args: argparse.Namespace) -> int:
    """Validate the config file (and the tokens and TLS files it names) and say so."""
    config = configured(args, public_port=True, logs=sys.stderr)
    for key, why in config_warnings(config):
        print(f"{config.path}: warning: {key}: {why}", file=sys.stderr)
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
