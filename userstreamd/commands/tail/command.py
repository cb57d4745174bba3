"""The command: arguments checked, signals handled, the exit code."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import sys
import threading
from functools import partial
from typing import TextIO
from urllib.parse import parse_qsl, urlsplit

import trio

from ...logs import redact
from ...stream.protocol import NAME
from .follower import Fatal, OutputClosed, Tail
from .render import clean, notice

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_TOKEN = re.compile(r"^[!-~]+$")  # what a token file may hold (auth._TOKEN)


def check_arguments(
    url: str,
    *,
    since: int | None,
    epoch: str | None,
    group: str | None,
    ca_file: str | None,
    token: str | None = None,
) -> str | None:
    """What is wrong with the arguments, in one line; None when nothing is."""
    try:
        parts = urlsplit(url)
        valid = bool(parts.path) if parts.scheme == "ws+unix" else bool(parts.hostname)
        valid = valid and parts.scheme in ("ws", "wss", "ws+unix") and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        return f"expected a ws://, wss:// or ws+unix:// URL, got {clean(redact(url))!r}"
    in_url = sorted({key for key, _ in parse_qsl(parts.query)} & {"epoch", "since", "group"})
    if in_url:
        return f"give {', '.join('--' + key for key in in_url)} as options, not in the URL"
    if since is not None and since < 0:
        return "--since must be a seq, 0 or more"
    if epoch is not None and since is None:
        return "--epoch goes with --since (the seq to start after)"
    if epoch is not None and not NAME.match(epoch):
        return "--epoch must be 1-64 letters, digits, '_', '.' or '-'"
    if group is not None:
        if since is not None:
            return "--since is not for group members: the group keeps their place"
        if not NAME.match(group):
            return "--group must be 1-64 letters, digits, '_', '.' or '-'"
    if token is not None and not _TOKEN.match(token):  # (never show it)
        return "the token must be printable ASCII without spaces: is the token file one line?"
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            return f"--ca-file {clean(ca_file)}: {clean(getattr(exc, 'strerror', None) or exc)}"
    return None


async def follow(
    tail: Tail,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Tail] = trio.TASK_STATUS_IGNORED,
) -> int:
    """`run` inside trio: follow the stream until SIGINT/SIGTERM (when `handle_signals`),
    `Tail.stop` or cancellation; the exit code."""
    task_status.started(tail)
    code = EXIT_OK

    async def follow_until_stopped(nursery: trio.Nursery) -> None:
        nonlocal code
        try:
            await tail.run()
        except Fatal as exc:
            tail.notice(str(exc))
            code = EXIT_FAILED
        except OutputClosed as exc:
            if not exc.quiet:
                tail.notice(str(exc))
                code = EXIT_FAILED
            _discard_further_output(tail.out)
        finally:
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        if handle_signals:
            await nursery.start(_stop_on_signals, tail, nursery.cancel_scope)
        nursery.start_soon(follow_until_stopped, nursery)
    return code


async def _stop_on_signals(
    tail: Tail,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGINT or SIGTERM stops tail quietly (the connection closed properly,
    the last acks sent: bounded); a second one cancels everything at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            if not tail.stopping:
                tail.stop()
            else:
                scope.cancel()


def _discard_further_output(out: TextIO) -> None:
    """After a broken pipe: point the descriptor at /dev/null, so that the interpreter's
    final flush does not print 'Exception ignored ... BrokenPipeError' (see the Python
    docs, 'Note on SIGPIPE')."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        finally:
            os.close(devnull)


def run(
    url: str,
    *,
    json_lines: bool = False,
    since: int | None = None,
    epoch: str | None = None,
    group: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``userstreamd tail``: print the stream at `url` until SIGINT/SIGTERM; the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    problem = check_arguments(
        url, since=since, epoch=epoch, group=group, ca_file=ca_file, token=token
    )
    if problem is not None:
        notice(err, problem)
        return EXIT_USAGE
    client = Tail(
        url,
        out,
        err,
        json_lines=json_lines,
        since=since,
        epoch=epoch,
        group=group,
        token=token,
        ca_file=ca_file,
    )
    main = partial(
        follow, client, handle_signals=threading.current_thread() is threading.main_thread()
    )
    try:
        return trio.run(main)
    except KeyboardInterrupt:  # before the signal receiver is up, or a second Ctrl-C
        return EXIT_OK
