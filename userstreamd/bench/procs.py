"""CPU time and memory of a process tree, read from /proc (Linux; no dependency).

`snapshot(root)` reads the root and every descendant (the daemon, its consumer workers,
the embedded PostgreSQL's guard, server and backends); `usage(before, after, seconds)`
turns two snapshots into one row per process: CPU seconds and percent of one core over
the interval, resident and peak resident memory (``VmRSS``, ``VmHWM``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, NamedTuple

from .. import __version__

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WORKERS = ("consumer-worker", "fanout-worker")  # the daemon's child processes, by command


class Proc(NamedTuple):
    pid: int
    name: str  # what the process is: "daemon", "consumer-worker 1", "postgres walwriter"
    cpu_s: float  # user + system, since it started
    rss_kib: int
    peak_rss_kib: int


def report_head(mode: str) -> dict[str, Any]:
    """The first keys of a ``bench e2e`` or ``bench fanout`` JSON report: what ran, on
    what (the CLI adds the bus)."""
    return {
        "version": __version__,
        "mode": mode,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _stat(pid: int) -> tuple[int, float]:
    """Its parent's pid and its CPU seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _memory(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM in KiB (0 for a zombie)."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        words = line.split()
        if words and words[0] in values:
            values[words[0]] = int(words[1])
    return values["VmRSS:"], values["VmHWM:"]


def rss_kib(pid: int) -> int:
    return _memory(pid)[0]


def cpu_s(pid: int) -> float:
    return _stat(pid)[1]


def children(pid: int) -> list[int]:
    """Its direct children (every /proc entry whose parent it is)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if _stat(int(entry.name))[0] == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
    return found


def _name(pid: int, root: int, root_name: str, backends: dict[int, str]) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv if a]
    line = " ".join(words).strip()
    if pid == root:
        return root_name
    kind = next((w for w in words if w in WORKERS), None)
    if kind is not None:
        worker = words[words.index("--worker") + 1] if "--worker" in words[:-1] else "?"
        return f"{kind} {worker}"
    if "userstreamd.runtime.lifeline" in words:
        return "postgres guard (lifeline)"
    if line.startswith("postgres: "):  # a server process sets its title
        if "[local]" in line:
            return f"postgres backend ({backends.get(pid, 'client')})"
        return "postgres " + line.removeprefix("postgres: ")
    if words and words[0].endswith("/postgres"):
        return "postgres server"
    if "-m" in words[:-1]:  # another Python child: its module (the page generator)
        return words[words.index("-m") + 1]
    return Path(words[0]).name if words else "?"


def snapshot(
    root: int, backends: dict[int, str] | None = None, root_name: str = "daemon"
) -> dict[int, Proc]:
    """`root` (named `root_name`) and its descendants now; `backends` names PostgreSQL
    backends by pid (their application_name). Processes that end while it reads, or have
    ended, are left out."""
    tree: dict[int, Proc] = {}
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = _stat(int(entry.name))[0]
            except (OSError, ValueError, IndexError):
                continue
    wanted, queue = [], [root]
    while queue:
        pid = queue.pop()
        wanted.append(pid)
        queue += [child for child, parent in parents.items() if parent == pid]
    for pid in wanted:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"":  # a zombie: nothing left
                continue
            rss, peak = _memory(pid)
            tree[pid] = Proc(
                pid, _name(pid, root, root_name, backends or {}), _stat(pid)[1], rss, peak
            )
        except (OSError, ValueError, IndexError):
            continue
    return tree


def usage(before: dict[int, Proc], after: dict[int, Proc], seconds: float) -> list[dict[str, Any]]:
    """One row per process alive at the end: CPU over the interval (all of it for one that
    started meanwhile) and memory, the root first, then by name."""
    rows = []
    for pid, proc in after.items():
        spent = proc.cpu_s - (before[pid].cpu_s if pid in before else 0.0)
        rows.append(
            {
                "process": proc.name,
                "pid": pid,
                "cpu_s": round(spent, 2),
                "cpu_pct": round(100 * spent / seconds, 1) if seconds > 0 else 0.0,
                "rss_kib": proc.rss_kib,
                "peak_rss_kib": proc.peak_rss_kib,
            }
        )
    root = next(iter(after), None)
    return sorted(rows, key=lambda r: (r["pid"] != root, r["process"], r["pid"]))
