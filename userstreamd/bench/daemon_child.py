"""The real daemon as a child process, for ``bench e2e`` and ``bench fanout``.

`DaemonChild` writes a config file into a folder of its own (state directory, embedded
PostgreSQL, ports 0: the kernel picks free ones), runs ``python -m userstreamd --config
FILE run`` (and its `run_args`: ``--role R`` for one part on the NATS bus) under a
lifeline guard (`userstreamd.runtime.lifeline`: if the bench dies, the daemon still gets its
SIGTERM) and in a session of its own (a terminal's ^C is the bench's to handle), and
learns its URLs from the ``daemon.ready`` line of its JSON log. `stop()` is
a graceful stop (SIGTERM: the daemon drains and commits before it exits). The same folder
can be started again: the daemon resumes its stream from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from ..config import toml_text
from ..errors import UserstreamdError
from ..store.embedded import EmbeddedPostgres
from . import procs

READY_TIMEOUT_S = 180.0  # the first start runs initdb
STOP_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 3000


class BenchError(UserstreamdError):
    """A benchmark could not run (a server did not start, a child failed)."""


class DaemonChild:
    def __init__(
        self, folder: Path, tables: dict[str, dict[str, Any]], run_args: list[str] | None = None
    ) -> None:
        self.folder = folder
        self.run_args = run_args or []  # after ``run``: ``["--role", "producer"]``
        self.config_path = folder / "bench.toml"
        self.log_path = folder / "daemon.log"
        self.state_dir = folder / "state"
        self.tables: dict[str, dict[str, Any]] = {
            "daemon": {
                "state_dir": str(self.state_dir),
                "log_level": "info",
                "log_format": "json",
                "stats_interval_s": 3600.0,
            },
            "producer": {"source": "synthetic", "seed": "bench", "log_each_user_below_per_s": 0},
            "broadcaster": {"port": 0},
            "http": {"port": 0},
            "consumers": {"processes": True},
        }
        for name, keys in tables.items():
            self.tables[name] = {**self.tables.get(name, {}), **keys}
        self.pid = 0  # the daemon's (not its guard's)
        self.url = self.http_url = ""
        self._guard: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this run's lines start in the log
        self._http = httpx.Client(timeout=10.0)

    @property
    def dsn(self) -> str:
        """The embedded server's, reachable while the daemon runs (its Unix socket)."""
        return EmbeddedPostgres(self.state_dir / "postgres").dsn

    def start(self) -> None:
        """Start it as `tables` say and return once it is ready (BenchError with its log's
        tail if not)."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start it as `tables` say; `wait_ready` then (several can start meanwhile)."""
        self.config_path.write_text(toml_text(self.tables))
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [sys.executable, "-m", "userstreamd", "--config", str(self.config_path), "run"]
        command += self.run_args
        guard = [sys.executable, "-m", "userstreamd.runtime.lifeline", "--stop-signal", "TERM"]
        with self.log_path.open("ab") as log:
            self._guard = subprocess.Popen(
                [*guard, "--timeout", str(STOP_TIMEOUT_S), "--", *command],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Return once the started daemon is ready; BenchError with its log's tail if it
        exits or is not ready within READY_TIMEOUT_S."""
        assert self._guard is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (ready := self.events("daemon.ready")):
            if self._guard.poll() is not None:
                raise BenchError(f"the daemon exited with code {self._guard.returncode}: {self}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the daemon was not ready within {READY_TIMEOUT_S:.0f} s: {self}")
            time.sleep(0.05)
        self.url, self.http_url = ready[0]["url"], ready[0]["http_url"]
        self.pid = next(iter(procs.children(self._guard.pid)))

    def stop(self) -> int:
        """SIGTERM (by closing the guard's lifeline), wait for the exit; its exit code."""
        guard, self._guard = self._guard, None
        if guard is None:
            return 0
        assert guard.stdin is not None
        guard.stdin.close()
        try:
            return guard.wait(STOP_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            guard.kill()
            return guard.wait()

    def close(self) -> None:
        self.stop()
        self._http.close()

    def set_rate(self, rate_per_s: float) -> None:
        """Rewrite the file with the new producer rate and SIGHUP: applied in place."""
        self.tables["producer"]["rate_per_s"] = rate_per_s
        self.config_path.write_text(toml_text(self.tables))
        seen = len(self.events("daemon.reloaded"))
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(self.events("daemon.reloaded")) == seen and time.monotonic() < deadline:
            time.sleep(0.02)

    def events(self, name: str) -> list[dict[str, Any]]:
        """This run's log lines for event `name`."""
        found = []
        with self.log_path.open("rb") as log:
            log.seek(self._log_from)
            for line in log:
                if name.encode() in line:
                    try:
                        event = msgspec.json.decode(line)
                    except msgspec.DecodeError:
                        continue
                    if isinstance(event, dict) and event.get("event") == name:
                        found.append(event)
        return found

    def metrics(self) -> dict[str, float]:
        """/metrics now: each sample's value by name, labels summed over (histogram
        buckets keep their ``le``: ``name{le=0.005}``)."""
        text = self._http.get(self.http_url + "metrics").text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name
                if "le" in sample.labels:
                    key += f"{{le={sample.labels['le']}}}"
                values[key] = values.get(key, 0.0) + sample.value
        return values

    def __str__(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(self._log_from, self.log_path.stat().st_size - LOG_TAIL_CHARS))
                return log.read().decode(errors="replace").strip()
        except OSError as exc:
            return f"(no log: {exc})"
