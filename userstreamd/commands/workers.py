"""The internal ``consumer-worker`` and ``fanout-worker`` commands: the daemon starts them
as its child processes (`runtime.workers.run_worker_process`); not listed in ``--help``."""

from __future__ import annotations

import argparse
from typing import Any

from ..logs import add_secrets
from .parsing import Handler, config_option
from .run import configured, run_logged


def run_consumer(args: argparse.Namespace) -> int:
    """Internal: one consumer as a child process of the daemon."""
    from ..runtime.workers import run_consumer_worker

    config = configured(args)
    return run_logged(run_consumer_worker, config, args.worker, args.url, args.ready_fd)


def run_fanout(args: argparse.Namespace) -> int:
    """Internal: one fan-out worker (a share of the public port) as a child process."""
    from ..serve.fanout import run_fanout_worker

    config = configured(args, public_port=True)
    add_secrets(*args.tokens.secrets())
    origins = [o for o in args.origins.split(",") if o]
    return run_logged(
        run_fanout_worker,
        config,
        args.worker,
        args.upstream,
        args.port,
        origins,
        args.tokens,
        args.ssl_context,
        args.ready_fd,
    )


def _worker_command(commands: Any, kind: str, handler: Handler) -> argparse.ArgumentParser:
    """An internal ``KIND-worker`` command, as `workers.run_worker_process` starts it."""
    command: argparse.ArgumentParser = commands.add_parser(f"{kind}-worker")
    config_option(command, argparse.SUPPRESS)
    command.set_defaults(handler=handler)
    command.add_argument("--worker", type=int, required=True)
    command.add_argument("--ready-fd", type=int, required=True)
    return command


def add_parser(commands: Any) -> None:
    """Both, without help= so that they are not listed."""
    consumer = _worker_command(commands, "consumer", run_consumer)
    consumer.add_argument("--url", required=True)
    fanout = _worker_command(commands, "fanout", run_fanout)
    fanout.add_argument("--upstream", required=True)
    fanout.add_argument("--port", type=int, required=True)
    fanout.add_argument("--origins", default="")
