"""``userstreamd bench fanout``: the real daemon broadcasting to N plain WebSocket clients.

For each server (userstreamd; with ``--compare`` also the references of `reference`):

1. start it producing 1 user/s (IDLE_RATE_PER_S); its resident memory (VmRSS), then again
   once N clients of the harness (`harness`, a separate process, or several with
   ``--harness-procs``) are connected and idle: the difference over N is the memory per
   idle client;
2. raise the rate to R (the daemon: its config file rewritten and SIGHUP, as an operator
   would), warm up, then measure for ``--duration`` seconds: users delivered per second
   over all clients, latency from ``produced_at`` to the client's read (p50, p99, max;
   0.1 ms buckets), slow closes (code 3008, since the clients connected), users the
   clients missed (gaps in their seqs), clients still connected at the end, and CPU and
   memory of the server's processes (the daemon with its consumers, page generator and
   PostgreSQL; a reference is one process).

The daemon runs as configured by default but for its own state directory, ports 0, the
synthetic source and room for N connections from one address; its consumers write the
stream into its embedded PostgreSQL meanwhile (the references do nothing else but
broadcast). Figures are reported, never judged: the machine is shared with the harness.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import msgspec

from .. import __version__
from . import procs, reference
from .daemon_child import BenchError, DaemonChild
from .display import Steps, open_steps

IDLE_RATE_PER_S = 1.0
SETTLE_S = 0.5  # after a start and after the clients connect, before memory is read
START_TIMEOUT_S = 60.0
CLIENTS_SPARE = 64  # connections allowed beyond N (the daemon's own, the live page)
HARNESS_CPU_WARNING_PCT = 90.0
BROADCAST_WORKER = "fanout-worker"  # the daemon's processes that serve clients, if any


class _Server(Protocol):
    label: str
    process: str  # what its main process is called in `procs` rows
    url: str
    pid: int

    def start(self, rate_per_s: float) -> None: ...
    def set_rate(self, rate_per_s: float) -> None: ...
    def stop(self) -> None: ...


class _Daemon:
    def __init__(self, folder: Path, clients: int) -> None:
        room = clients + CLIENTS_SPARE
        self.child = DaemonChild(
            folder, {"broadcaster": {"max_connections": room, "max_connections_per_ip": room}}
        )
        self.label, self.process = f"userstreamd {__version__}", "daemon"
        self.url, self.pid = "", 0

    def start(self, rate_per_s: float) -> None:
        self.child.tables["producer"]["rate_per_s"] = rate_per_s
        self.child.start()
        self.url, self.pid = self.child.url, self.child.pid

    def set_rate(self, rate_per_s: float) -> None:
        self.child.set_rate(rate_per_s)

    def stop(self) -> None:
        self.child.close()


class _Reference:
    """A reference server as a child process; its stdin is its lifeline."""

    def __init__(self, label: str, command: list[str], env: dict[str, str], pool: Path) -> None:
        self.label, self.command, self.env, self.pool = label, command, env, pool
        self.process = "server"
        self.url, self.pid = "", 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, rate_per_s: float) -> None:
        self.proc = subprocess.Popen(
            [*self.command, str(self.pool), str(rate_per_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # (read only if it fails: it writes nothing otherwise)
            env=self.env,
            start_new_session=True,
        )
        line = _Lines(self.proc).next(START_TIMEOUT_S, self.label)
        self.url = f"ws://127.0.0.1:{int(line.split()[1])}/"
        self.pid = self.proc.pid

    def set_rate(self, rate_per_s: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"rate {rate_per_s}\n".encode())
        self.proc.stdin.flush()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
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


class _Lines:
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


class _Harnesses:
    """`processes` harness processes sharing `clients` between them; with several `urls`,
    client k of them all goes to ``urls[k % len(urls)]`` (each process's list rotated to
    where the one before it stopped)."""

    def __init__(self, urls: list[str], clients: int, processes: int) -> None:
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
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
        self.lines = [_Lines(p) for p in self.procs]

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

    def measure(self, steps: Steps, label: str, seconds: float) -> dict[str, Any]:
        self._ask(f"measure {seconds}")
        steps.wait(label, seconds)
        return _merge(self._answers(30.0))

    def close(self) -> None:
        for proc in self.procs:
            _end(proc)


def _merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    hist: dict[int, int] = {}
    for answer in answers:
        for bucket, count in answer["latency_hist"]:
            hist[bucket] = hist.get(bucket, 0) + count
    closes: dict[str, int] = {}
    for answer in answers:
        for code, count in answer["closes"].items():
            closes[code] = closes.get(code, 0) + count
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


def percentile_ms(hist: dict[int, int], q: float, resolution_ms: float) -> float | None:
    """The `q` quantile (0..1) of a histogram of `resolution_ms` buckets: its bucket's
    middle; None if it is empty."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = max(1, round(q * total)), 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round((bucket + 0.5) * resolution_ms, 2)
    raise AssertionError("unreachable")


def measure_server(
    server: _Server,
    steps: Steps,
    *,
    clients: int,
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    harness_procs: int,
) -> dict[str, Any]:
    """One server through the steps of the module's docstring; its figures."""
    name = server.label

    def snapshot() -> dict[int, procs.Proc]:
        return procs.snapshot(server.pid, root_name=server.process)

    def serving(process: str) -> bool:
        """Whether it holds clients: the server's main process, its fan-out workers."""
        return process == server.process or process.startswith(BROADCAST_WORKER)

    def serving_rss_kib() -> int:
        return sum(p.rss_kib for p in snapshot().values() if serving(p.name))

    try:
        step = steps.step(f"{name}: start")
        server.start(IDLE_RATE_PER_S)
        time.sleep(SETTLE_S)
        rss_before = serving_rss_kib()
        step.done(f"pid {server.pid}")
        step = steps.step(f"{name}: connect {clients} clients")
        harness = _Harnesses([server.url], clients, harness_procs)
        try:
            connected = harness.connected(START_TIMEOUT_S + clients / 50)
            time.sleep(SETTLE_S)
            rss_after = serving_rss_kib()
            step.done(f"{connected['clients']} connected")
            server.set_rate(rate_per_s)
            steps.wait(f"{name}: warm-up at {rate_per_s:,.0f} users/s", warmup_s)
            before, start = snapshot(), time.monotonic()
            label = f"{name}: {duration_s:g} s, {clients} clients"
            got = harness.measure(steps, label, duration_s)
            after, seconds = snapshot(), time.monotonic() - start
        finally:
            harness.close()
    finally:
        server.stop()
    usage = procs.usage(before, after, seconds)
    return figures(
        name,
        clients,
        rate_per_s,
        warmup_s,
        harness_procs,
        connected,
        got,
        usage,
        serving,
        (rss_before, rss_after),
    )


def figures(
    name: str,
    clients: int,
    rate_per_s: float,
    warmup_s: float,
    harness_procs: int,
    connected: dict[str, Any],
    got: dict[str, Any],
    usage: list[dict[str, Any]],
    serving: Callable[[str], bool],
    rss_kib: tuple[int, int],
) -> dict[str, Any]:
    """The figures of one measured run (both buses): `connected` and `got` are what the
    harness said, `usage` each process's CPU, `serving` which processes hold clients,
    `rss_kib` theirs before and after the idle clients connected."""
    hist, resolution = got["hist"], got["resolution_ms"]
    rss_before, rss_after = rss_kib
    return {
        "server": name,
        "clients": clients,
        "clients_connected": connected["clients"],
        "connect_errors": connected["errors"],
        "rate_per_s": rate_per_s,
        "duration_s": got["seconds"],
        "warmup_s": warmup_s,
        "delivered": got["users"],
        "delivered_per_s": round(got["users"] / got["seconds"], 1),
        "expected_per_s": round(connected["clients"] * rate_per_s, 1),
        "p50_ms": percentile_ms(hist, 0.50, resolution),
        "p99_ms": percentile_ms(hist, 0.99, resolution),
        "max_ms": percentile_ms(hist, 1.0, resolution),
        "latency_resolution_ms": resolution,
        "slow_closes": got["slow_closes"],
        "closes": got["closes"],
        "dropped": got["dropped"],
        "missed": got["missed"],
        "connected_at_end": got["connected"],
        "server_cpu_pct": round(sum(r["cpu_pct"] for r in usage if serving(r["process"])), 1),
        "server_processes": sum(serving(r["process"]) for r in usage),
        "server_rss_kib": {"idle": rss_before, "with_idle_clients": rss_after},
        "rss_per_idle_client_kib": (
            round((rss_after - rss_before) / connected["clients"], 2)
            if connected["clients"]
            else None
        ),
        "harness_processes": harness_procs,
        "harness_cpu_pct": got["harness_cpu_pct"],
        "processes": usage,
    }


def run_fanout(
    *,
    clients: int = 100,
    rate_per_s: float = 1000.0,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    harness_procs: int = 1,
    compare: bool = False,
    install_node_ws: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The figures of userstreamd's fan-out (and with `compare` the references'), as the
    JSON report has them."""
    report = procs.report_head("fanout")
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
    ):
        base = Path(folder)
        measure = partial(
            measure_server,
            steps=steps,
            clients=clients,
            rate_per_s=rate_per_s,
            duration_s=duration_s,
            warmup_s=warmup_s,
            harness_procs=harness_procs,
        )
        report["fanout"] = measure(_Daemon(base, clients))
        if not compare:
            return report
        pool = base / "users.jsonl"
        reference.write_pool(pool)
        compared: dict[str, Any] = {}
        python = [sys.executable, "-m", "userstreamd.bench.reference"]
        label = f"websockets {reference.websockets_version()}"
        compared["websockets"] = _measure_reference(
            measure, _Reference(label, python, dict(os.environ), pool)
        )
        step = steps.step("node ws: find node and ws")
        found = reference.node_ws(install=install_node_ws)
        if isinstance(found, str):
            step.done("unavailable")
            compared["node_ws"] = {"unavailable": found}
        else:
            command, env, version = found
            step.done(f"ws {version}")
            server = _Reference(f"node ws {version}", command, env, pool)
            compared["node_ws"] = _measure_reference(measure, server)
        report["fanout_compare"] = compared
    return report


def _measure_reference(
    measure: Callable[[_Server], dict[str, Any]], server: _Reference
) -> dict[str, Any]:
    """Its figures; or, when it fails, why (userstreamd's figures still count)."""
    try:
        return measure(server)
    except BenchError as exc:
        return {"unavailable": str(exc)}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def print_fanout(report: dict[str, Any]) -> None:
    main = report["fanout"]
    print(
        f"userstreamd {report['version']} bench fanout: {main['clients']} clients, "
        f"{main['rate_per_s']:,.0f} users/s ({main['clients'] * main['rate_per_s']:,.0f} "
        f"frames/s asked), {main['duration_s']:.0f} s after {main['warmup_s']:g} s warm-up; "
        f"Python {report['python']}, {report['cpus']} CPUs"
    )
    print(
        f"  {'server':<22} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'slow closes':>11} {'missed':>7} {'server CPU':>10} {'RSS/idle client':>15}"
    )
    rows = [main, *report.get("fanout_compare", {}).values()]
    names = ["userstreamd", *report.get("fanout_compare", {})]
    for name, row in zip(names, rows, strict=True):
        if "unavailable" in row:
            print(f"  {name:<22} unavailable ({row['unavailable']})")
            continue
        per_client = row["rss_per_idle_client_kib"]
        memory = "-" if per_client is None else f"{per_client:,.1f} KiB"
        print(
            f"  {row['server']:<22} {row['delivered_per_s']:>12,.0f} {_ms(row['p50_ms']):>8} "
            f"{_ms(row['p99_ms']):>8} {_ms(row['max_ms']):>8} {row['slow_closes']:>11} "
            f"{row['missed']:>7} {row['server_cpu_pct']:>9.0f}% {memory:>15}"
        )
    for name, row in zip(names, rows, strict=True):
        if "unavailable" in row:
            continue
        if row["clients_connected"] < row["clients"]:
            errors = "; ".join(row["connect_errors"][:3])
            connected = f"{row['clients_connected']} of {row['clients']} connected"
            print(f"  note: {name}: {connected}: {errors}")
        if row["harness_cpu_pct"] >= HARNESS_CPU_WARNING_PCT:
            print(
                f"  note: {name}: the harness used {row['harness_cpu_pct']:.0f}% of a core: "
                "its figures may be the harness's limit (try --harness-procs 2)"
            )
    if "fanout_compare" in report:
        print(
            "  (the references only broadcast a pool of pre-built users; userstreamd's server "
            "CPU is its daemon process, producer, hub and broadcaster, and any fan-out workers)"
        )
