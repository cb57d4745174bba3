"""Worker processes: the same program, started with an internal subcommand.

Parent side, `run_worker_process` is a supervised component: it starts
``python -m userstreamd --config FILE KIND-worker --worker N ... --ready-fd FD`` (KIND:
``consumer``, or ``fanout``: see `fanout`) in a session of its own (a terminal's ^C
reaches only the daemon, which stops children in order), forwards the JSON lines it logs
into a pipe (`logs.forward`: lines of several processes never tear), reports ready when
the child writes ``ready`` to another pipe, and raises when the child dies, so the
supervisor restarts it. The child holds a lifeline (`userstreamd.runtime.lifeline`): stopping it
closes the lifeline, then SIGKILLs it after ``stop_timeout_s``. The DSN travels in the
environment, never on the command line.

Child side, `run_consumer_worker`: one `Consumer`; the end of the lifeline, SIGTERM or
SIGINT commit what was received and exit 0. The lifeline also ends when the daemon dies
(kill -9), so no orphan keeps writing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from ..config import Config
from ..consume.consumer import Milestones, make_consumer
from ..errors import UserstreamdError
from ..logs import bind, forward, get_logger
from . import lifeline

WORKER_DSN_ENV = "USERSTREAMD_WORKER_DSN"
LOG_FORMAT_ENV = "USERSTREAMD_DAEMON_LOG_FORMAT"  # workers log JSON; the parent forwards it
READY = b"ready\n"
MAX_LINE_BYTES = 16 * 2**20  # a child's line longer than this is forwarded in pieces


class WorkerExited(UserstreamdError):
    """A worker process ended on its own."""


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
    """One consumer child process (the DSN in its environment)."""
    await run_worker_process(
        config,
        "consumer",
        worker,
        ["--url", url],
        env={WORKER_DSN_ENV: dsn},
        stop_timeout_s=stop_timeout_s,
        ready_timeout_s=ready_timeout_s,
        running=running,
        task_status=task_status,
    )


async def run_worker_process(
    config: Config,
    kind: str,
    worker: int,
    arguments: list[str],
    *,
    env: dict[str, str] | None = None,
    stop_timeout_s: float = 10.0,
    ready_timeout_s: float = 60.0,
    running: set[trio.Process] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One `kind` worker process; `running` (if given) holds it while it lives, so the
    daemon can SIGKILL every worker at once on a forced exit."""
    log = get_logger().bind(worker=worker)
    running = set() if running is None else running
    command = [
        sys.executable,
        "-m",
        "userstreamd",
        "--config",
        config.path,
        f"{kind}-worker",
        "--worker",
        str(worker),
        *arguments,
    ]
    read_fd, write_fd = os.pipe()
    async with trio.open_nursery() as nursery:
        try:
            proc = await lifeline.run_child(
                nursery,
                [*command, "--ready-fd", str(write_fd)],
                stop_timeout_s=stop_timeout_s,
                pass_fds=(write_fd,),
                env={**os.environ, **(env or {}), LOG_FORMAT_ENV: "json"},
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        finally:
            os.close(write_fd)
        running.add(proc)
        for output in (proc.stdout, proc.stderr):
            assert output is not None
            nursery.start_soon(_relay, output, worker)
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
                    else lifeline.how(proc.returncode)
                )
                raise WorkerExited(
                    f"{kind} worker {worker} (pid {proc.pid}) was never ready: {how}"
                )
            task_status.started(proc.pid)
            code = await proc.wait()
            if code != 0:
                raise WorkerExited(f"{kind} worker {worker} (pid {proc.pid}) {lifeline.how(code)}")
            log.info("supervisor.process_exited", pid=proc.pid, code=code)
        finally:
            running.discard(proc)
            with trio.CancelScope(shield=True):
                nursery.cancel_scope.cancel()
                code = await proc.wait()  # the lifeline's end, then SIGKILL if need be
                log.info("supervisor.process_stopped", pid=proc.pid, how=lifeline.how(code))


async def _relay(
    output: trio.abc.ReceiveStream, worker: int, max_line: int = MAX_LINE_BYTES
) -> None:
    """A child's output, forwarded line by line until it closes (a stop does not cut it
    short: the child's last lines say how it stopped). Output that runs past `max_line`
    without a newline goes out in pieces of that size: memory stays bounded."""
    pending = bytearray()
    with trio.CancelScope(shield=True):
        async with output:
            while chunk := await output.receive_some():
                pending += chunk
                *lines, rest = pending.split(b"\n")
                for line in lines:
                    forward(bytes(line), worker=worker)
                while len(rest) > max_line:
                    forward(bytes(rest[:max_line]), worker=worker)
                    rest = rest[max_line:]
                pending = bytearray(rest)
    if pending:
        forward(bytes(pending), worker=worker)


async def stop_on_signal(scope: trio.CancelScope) -> None:
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
        nursery.start_soon(lifeline.watch, nursery.cancel_scope)
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
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
