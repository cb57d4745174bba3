"""The parent's side of the fan-out harness (`harness`: N plain WebSocket clients in a
process of their own): `Harnesses` starts one or more harness processes sharing the
clients (and the stalled clients of ``--stalled``), asks them to measure and merges their
answers; `Lines` reads a child's standard output with a deadline; `end_process` ends a
child through its lifeline (stdin).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from typing import Any

import msgspec

from .daemon_child import BenchError
from .display import Steps


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """Close its lifeline (stdin) and its output; SIGKILL if it has not exited in 10 s."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Lines:
    """A child's standard output, line by line, with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buffer = proc, proc.stdout.fileno(), b""

    def next(self, timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what}: no answer within {timeout_s:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    why = (
                        self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    )
                    raise BenchError(f"{what}: exited with code {code}: {why.strip()[-1000:]}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


class Harnesses:
    """`processes` harness processes sharing `clients` between them; with several `urls`,
    client k of them all goes to ``urls[k % len(urls)]`` (each process's list rotated to
    where the one before it stopped)."""

    def __init__(self, urls: list[str], clients: int, processes: int) -> None:
        shares = _shares(clients, processes)
        starts = [sum(shares[:i]) % len(urls) for i in range(processes)]
        self.procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "userstreamd.bench.harness"),
                    *urls[start:],
                    *urls[:start],
                    str(share),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            for share, start in zip(shares, starts, strict=True)
            if share
        ]
        self.lines = [Lines(p) for p in self.procs]

    def _ask(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()

    def _answers(self, timeout_s: float) -> list[dict[str, Any]]:
        return [msgspec.json.decode(lines.next(timeout_s, "the harness")) for lines in self.lines]

    def connected(self, timeout_s: float) -> dict[str, Any]:
        answers = self._answers(timeout_s)
        return {
            "clients": sum(a["clients"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]],
        }

    def stall(self, clients: int, timeout_s: float) -> dict[str, Any]:
        """Open `clients` stalled clients, shared as the others are; how many are open."""
        for proc, share in zip(self.procs, _shares(clients, len(self.procs)), strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f"stall {share}\n".encode())
            proc.stdin.flush()
        answers = self._answers(timeout_s)
        return {
            "clients": sum(a["clients"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]],
        }

    def measure(self, steps: Steps, label: str, seconds: float) -> dict[str, Any]:
        self._ask(f"measure {seconds}")
        steps.wait(label, seconds)
        return merge(self._answers(30.0))

    def settle(self) -> dict[str, Any]:
        """What became of the stalled clients (`stalled.StalledClients.result`, merged)."""
        self._ask("settle")
        answers = self._answers(30.0)
        after = [s for a in answers for s in a["stalled_closed_after_s"]]
        return {
            **{key: sum(a[key] for a in answers) for key in ("stalled", "stalled_open")},
            "stalled_closes": _add([a["stalled_closes"] for a in answers]),
            "stalled_closed_after_s": sorted(after),
        }

    def close(self) -> None:
        for proc in self.procs:
            end_process(proc)


def _shares(clients: int, processes: int) -> list[int]:
    return [clients // processes + (i < clients % processes) for i in range(processes)]


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    hist: dict[int, int] = {}
    for answer in answers:
        for bucket, count in answer["latency_hist"]:
            hist[bucket] = hist.get(bucket, 0) + count
    closes = _add([a["closes"] for a in answers])
    total = {
        key: sum(a[key] for a in answers)
        for key in ("users", "missed", "slow_closes", "dropped", "connected", "bad_frames")
    }
    return {
        **total,
        "seconds": max(a["seconds"] for a in answers),
        "hist": hist,
        "resolution_ms": answers[0]["resolution_ms"],
        "closes": closes,
        "harness_cpu_pct": max(a["cpu_pct"] for a in answers),
    }


def _add(counts: list[dict[str, int]]) -> dict[str, int]:
    """Counts by key, summed over several answers."""
    total: dict[str, int] = {}
    for each in counts:
        for key, count in each.items():
            total[key] = total.get(key, 0) + count
    return dict(sorted(total.items()))
