"""Consumers as child processes: the same program, started with an internal subcommand.

Parent side, `run_consumer_process` is a supervised component: it starts
``python -m userstreamd --config FILE consumer-worker --worker N --url URL --ready-fd FD``
in a session of its own (a terminal's ^C reaches only the daemon, which stops children
in order), reports ready when the child writes ``ready`` to the pipe, and raises when the
child dies, so the supervisor restarts it. Stopping sends SIGTERM, then SIGKILL after
``stop_timeout_s``. The DSN travels in the environment, never on the command line.

Child side, `run_consumer_worker`: one `Consumer`; SIGTERM/SIGINT commit what was
received and exit 0; the child also exits when its parent disappears (kill -9 of the
daemon), so no orphan keeps writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from .config import Config
from .consumer import Milestones, make_consumer
from .errors import UserstreamdError
from .logs import bind, get_logger

WORKER_DSN_ENV = "USERSTREAMD_WORKER_DSN"
READY = b"ready\n"


class WorkerExited(UserstreamdError):
    """A worker process ended on its own."""


def _how(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


async def run_consumer_process(
    config: Config,
    worker: int,
    url: str,
    dsn: str,
    *,
    stop_timeout_s: float = 10.0,
    ready_timeout_s: float = 60.0,
    running: set[trio.Process] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One consumer child process; `running` (if given) holds it while it lives, so the
    daemon can SIGKILL every worker at once on a forced exit."""
    log = get_logger().bind(worker=worker)
    running = set() if running is None else running
    read_fd, write_fd = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "userstreamd",
                "--config",
                config.path,
                "consumer-worker",
                "--worker",
                str(worker),
                "--url",
                url,
                "--ready-fd",
                str(write_fd),
            ],
            pass_fds=(write_fd,),
            env={**os.environ, WORKER_DSN_ENV: dsn},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    running.add(proc)
    log.info("supervisor.process_started", pid=proc.pid)
    try:
        async with trio.lowlevel.FdStream(read_fd) as pipe:
            said = b""
            with trio.move_on_after(ready_timeout_s):
                while not said.endswith(b"\n") and (chunk := await pipe.receive_some()):
                    said += chunk
        if said != READY:
            with trio.move_on_after(1):  # the pipe closed: the child is on its way out
                await proc.wait()
            how = (
                f"not ready within {ready_timeout_s:g} s"
                if proc.returncode is None
                else _how(proc.returncode)
            )
            raise WorkerExited(f"consumer worker {worker} (pid {proc.pid}) was never ready: {how}")
        task_status.started(proc.pid)
        code = await proc.wait()
        if code != 0:
            raise WorkerExited(f"consumer worker {worker} (pid {proc.pid}) {_how(code)}")
        log.info("supervisor.process_exited", pid=proc.pid, code=code)
    finally:
        if proc.returncode is None:
            with trio.CancelScope(shield=True):
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(stop_timeout_s):
                    await proc.wait()
                if proc.returncode is None:
                    log.error("supervisor.process_killed", pid=proc.pid, after_s=stop_timeout_s)
                    proc.kill()
                    await proc.wait()
            stopped = proc.poll()
            assert stopped is not None  # waited for above, under the shield
            log.info("supervisor.process_stopped", pid=proc.pid, how=_how(stopped))
        running.discard(proc)


async def _exit_with_parent(parent: int, scope: trio.CancelScope) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 (no event exists for "parent died")
        await trio.sleep(0.5)
    get_logger().warning("worker.parent_gone", parent=parent)
    scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            get_logger().info("worker.signal", signal=signal.Signals(signum).name)
            scope.cancel()
            return


async def run_consumer_worker(config: Config, worker: int, url: str, ready_fd: int) -> int:
    """The child process's main: consume until told to stop."""
    bind(component="consumer", worker=worker, pid=os.getpid())
    dsn = os.environ.get(WORKER_DSN_ENV)
    if not dsn:
        raise WorkerExited(f"{WORKER_DSN_ENV} is not set: consumer-worker is internal")
    consumer = make_consumer(config, url, dsn, worker, Milestones(config.database.milestone_every))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_exit_with_parent, os.getppid(), nursery.cancel_scope)
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        await nursery.start(consumer.run)
        os.write(ready_fd, READY)
        os.close(ready_fd)
    stats = consumer.statistics()
    get_logger().info(
        "worker.stopped",
        received=stats.received,
        inserted=stats.inserted,
        acked_seq=stats.acked_seq,
    )
    return 0
