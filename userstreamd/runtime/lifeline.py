"""Child processes that cannot outlive the daemon.

Every child (a consumer worker, the embedded PostgreSQL) gets a *lifeline*: a pipe on
its standard input whose only writer is the daemon. The daemon never writes to it; the
end of file says "stop", and the kernel says it on the daemon's behalf when the daemon
dies, even by SIGKILL. There is no race with the child's start-up (a pipe that is
already at its end stays there) and no polling of ``getppid()``.

- `run_child` starts a child with ``trio.run_process`` and a lifeline; cancelling it
  closes the lifeline, waits ``stop_timeout_s`` for the child to exit, then SIGKILLs it.
- `watch` is the child's side, for children that run trio: it cancels a scope at EOF.
- ``python -m userstreamd.runtime.lifeline --stop-signal INT --timeout S [--user UID --group GID]
  -- COMMAND...`` is the
  guard for a program that knows nothing of lifelines (PostgreSQL): it runs COMMAND, and
  at the lifeline's end sends it the stop signal, then SIGKILL after S seconds; it exits
  with COMMAND's status. COMMAND also gets SIGKILL if the guard itself is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import trio

from ..logs import get_logger

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def how(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


async def run_child(
    nursery: trio.Nursery, command: Sequence[str], *, stop_timeout_s: float, **options: Any
) -> trio.Process:
    """Start `command` in `nursery` with a lifeline on its stdin; return once it runs."""
    log = get_logger()

    async def stop(proc: trio.Process) -> None:
        assert proc.stdin is not None
        await proc.stdin.aclose()  # the lifeline's end: "stop"
        with trio.move_on_after(stop_timeout_s):
            await proc.wait()
        if proc.returncode is None:
            log.error("supervisor.process_killed", pid=proc.pid, after_s=stop_timeout_s)
            proc.kill()

    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            list(command),
            stdin=subprocess.PIPE,
            check=False,
            deliver_cancel=stop,
            **options,
        )
    )
    return proc


async def watch(scope: trio.CancelScope, fd: int = 0) -> None:
    """Cancel `scope` when the lifeline on `fd` ends (the daemon stopped us, or died)."""
    async with trio.lowlevel.FdStream(os.dup(fd)) as lifeline:
        while await lifeline.receive_some():
            pass
    get_logger().info("worker.lifeline_closed")
    scope.cancel()


def guard(
    command: Sequence[str], stop_signal: int, timeout_s: float, run_as: dict[str, Any]
) -> int:
    """Run `command` until it exits; stop it when stdin ends. Returns its exit status."""
    import ctypes

    prctl = ctypes.CDLL(None).prctl  # looked up before the fork: the child only calls it
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def in_child() -> None:
        for signum in ignored:
            signal.signal(signum, signal.SIG_DFL)
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)  # only the lifeline stops us
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, preexec_fn=in_child, cwd="/", **run_as
    )
    pidfd = os.pidfd_open(child.pid)
    stopping = False
    while child.poll() is None:
        watched = [pidfd] if stopping else [pidfd, sys.stdin.fileno()]
        ready, _, _ = select.select(watched, [], [], timeout_s if stopping else None)
        if stopping and not ready:
            child.kill()
        elif not stopping and sys.stdin.fileno() in ready and not os.read(0, 4096):
            stopping = True
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(stop_signal)
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userstreamd.runtime.lifeline")
    parser.add_argument("--stop-signal", default="TERM", help="sent at the lifeline's end")
    parser.add_argument("--timeout", type=float, default=30.0, help="then SIGKILL")
    parser.add_argument("--user", type=int, help="run COMMAND as this uid (we are root)")
    parser.add_argument("--group", type=int, help="... and this gid")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    run_as: dict[str, Any] = {}
    if args.user is not None:
        run_as = {"user": args.user, "group": args.group, "extra_groups": []}
    return guard(args.command, signal.Signals[f"SIG{args.stop_signal}"], args.timeout, run_as)


if __name__ == "__main__":
    sys.exit(main())
