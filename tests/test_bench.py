"""`userstreamd bench` runs every stage for real and reports figures (never asserted:
what is asserted is that each stage did the work it timed); its progress shows on a
terminal only; --plot draws the figures. `bench e2e` and `bench fanout` run the real
daemon as a child process; the fan-out harness counts every frame of a known server.

The end-to-end tests run for a second or two on a machine shared with other work, so
they assert on counted work (users committed, none missing, frames received, the JSON's
shape), never on a rate or a latency from such a window."""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from userstreamd import __version__, bench
from userstreamd.bench import LABELS, fanout, harness, stalled
from userstreamd.bench.display import open_steps
from userstreamd.bench.fanout_servers import DaemonServer
from userstreamd.commands.cli import _parser, main

from .helpers import drain


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT: dict[str, Any] = {
    "version": "0.1.0",
    "users": 20000,
    "repeat": 3,
    "python": "3.11.7",
    "cpus": 2,
    "database": "embedded",
    "results": dict(
        zip(LABELS, [32700.0, 99000.0, 111800.0, 14800.0, 35500.0, 8100.0], strict=True)
    ),
    "verified": {"postgres_rows": 20000, "end_to_end_rows": 20000},
}


def _bench_command(pg_server: str, *options: str) -> list[str]:
    command = [sys.executable, "-m", "userstreamd", "bench", "--users", "300", "--repeat", "1"]
    return [*command, "--dsn", pg_server, *options]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert height >= 300 and width >= 600
    assert len({tuple(pixel) for pixel in image.reshape(-1, image.shape[2])}) > 10  # drawn on


@pytest.mark.e2e
def test_bench_prints_and_writes_every_figure(tmp_path: Path, pg_server: str) -> None:
    """Through a pipe, as in CI: the table, the JSON and the plot; no progress display and
    not one escape code."""
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        _bench_command(pg_server, "--json", str(out), "--plot", str(plot)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    assert "run 1/1" not in result.stderr
    _assert_png(plot)
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(LABELS)
    assert all(value > 0 for value in report["results"].values())
    assert report["users"] == 300 and report["database"] == "external"
    assert report["verified"] == {"postgres_rows": 300, "end_to_end_rows": 300}
    for label in LABELS.values():
        assert label in result.stdout
    # The bench works in a schema of its own and leaves nothing behind.
    assert (
        "userstreamd_bench_"
        not in subprocess.run(
            [
                sys.executable,
                "-c",
                "import psycopg,sys; print(psycopg.connect(sys.argv[1]).execute("
                "\"SELECT string_agg(nspname, ',') FROM pg_namespace\").fetchone()[0])",
                pg_server,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_every_speed_figure_in_the_docs_is_a_bench_figure() -> None:
    """The speed table of docs/performance.md has exactly the stages `bench` measures, under
    the same labels, next to the command that produced them (the README used to quote
    figures no command printed); no other page of the docs, nor the README, quotes one."""
    repo = Path(__file__).resolve().parent.parent
    performance = (repo / "docs" / "performance.md").read_text()
    section = performance.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    assert "`userstreamd bench --json bench.json`" in section
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \|$", section, re.MULTILINE)
    assert {label for label, _ in rows} == set(LABELS.values())
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        figures = re.findall(r"\b\d[\d,]* (?:users|rows)/s\b", page.read_text())
        assert not figures, f"speed figures outside the bench table, in {page.name}: {figures}"


def _run_with_stderr_on_a_terminal(command: list[str]) -> tuple[int, str, str]:
    """`command` with stdout a pipe and stderr a 120-column pseudo-terminal: its exit code,
    its stdout and what its terminal showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(slave)
    terminal, stop = bytearray(), threading.Event()
    reader = threading.Thread(target=drain, args=(master, terminal, stop))
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()  # nothing to do once it has exited
        stop.set()
        reader.join(10)
        os.close(master)
    return proc.returncode, stdout.decode(), terminal.decode(errors="replace")


@pytest.mark.e2e
def test_bench_shows_each_stage_on_a_terminal(pg_server: str) -> None:
    """stderr a terminal: a live row per stage (its label, which run, a bar, elapsed and at
    the end its figure); stdout still holds the plain table and nothing else."""
    code, stdout, terminal = _run_with_stderr_on_a_terminal(_bench_command(pg_server))
    assert code == 0, terminal
    assert "\x1b[" in terminal  # drawn live, not printed once
    for label in LABELS.values():
        assert label in terminal
    assert "run 1/1" in terminal and "0:00:0" in terminal and "━" in terminal
    assert re.search(r"\d users/s", terminal)
    assert "\x1b" not in stdout
    header = re.search(r"^userstreamd \S+ bench: ", stdout, re.MULTILINE)
    assert header, stdout
    table = stdout[header.start() :].splitlines()  # after any warning log line
    assert "bench: 300 users, best of 1" in table[0]
    assert [line[2:60].rstrip() for line in table[2:]] == list(LABELS.values())


def test_bench_help_offers_plot() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "userstreamd", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--plot FILE.png" in result.stdout


@pytest.mark.parametrize(
    ("slowest", "log_scale"), [(8100.0, False), (900.0, True)], ids=["linear", "log"]
)
def test_write_plot_draws_a_png(tmp_path: Path, slowest: float, log_scale: bool) -> None:
    """A real PNG of a report, on a linear axis or, when the fastest stage is over
    LOG_SCALE_SPREAD times the slowest, a logarithmic one."""
    report = {**REPORT, "results": {**REPORT["results"], "end_to_end_users_per_s": slowest}}
    assert bench._log_scale(list(report["results"].values())) is log_scale
    bench.write_plot(report, str(tmp_path / "bench.png"))
    _assert_png(tmp_path / "bench.png")


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` now fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_plot_fails_fast_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any benchmark runs: one line on stderr that names the extra, exit code 2."""
    assert bench.plot_available() is None
    _without_matplotlib(monkeypatch)
    reason = bench.plot_available()
    assert reason is not None and "pip install 'userstreamd[plot]'" in reason
    with pytest.raises(ImportError, match=re.escape("userstreamd[plot]")):
        bench.write_plot(REPORT, str(tmp_path / "bench.png"))
    plot = tmp_path / "never.png"
    assert main(["bench", "--users", "300", "--repeat", "1", "--plot", str(plot)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "userstreamd[plot]" in err
    assert not plot.exists()


# -- bench e2e and bench fanout: the real daemon as a child process -------------------


def _run_bench(*options: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`userstreamd bench ...` through pipes (no terminal: no display), as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "userstreamd", "bench", *options],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    return result


@pytest.mark.e2e
def test_bench_e2e_writes_every_figure(tmp_path: Path) -> None:
    """Both runs of the daemon: users committed per second with zero loss verified in its
    database, produced -> committed latency of every user of the 1,000/s run, and each
    process's CPU and memory (the daemon, its consumer workers, PostgreSQL)."""
    out = tmp_path / "e2e.json"
    result = _run_bench("e2e", "--duration", "2", "--warmup", "0.5", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["bus"] == "embedded"
    e2e = report["e2e"]
    assert isinstance(e2e["users_per_s"], float)
    loss = e2e["zero_loss"]
    assert loss["verified"] is True and loss["drained"] is True
    assert loss["published"] > 0
    assert loss["rows"] == loss["distinct_seqs"] == loss["max_seq"] == loss["published"]
    assert loss["min_seq"] == 1
    latency = e2e["latency_ms"]
    assert e2e["latency_users"] > 0 and "commit timestamp" in e2e["latency_source"]
    assert latency["p50"] <= latency["p99"] <= latency["max"]  # (of the users counted)
    assert set(e2e["latency_ms_daemon_histogram"]) >= {"p50", "p99"}
    for run in ("processes", "latency_processes"):
        names = {p["process"] for p in e2e[run]}
        assert {"daemon", "consumer-worker 1", "consumer-worker 2", "postgres server"} <= names
        assert any(n.startswith("postgres backend (") for n in names)
        for proc in e2e[run]:
            assert proc["cpu_s"] >= 0 and proc["peak_rss_kib"] > 0, proc
    assert "zero loss verified" in result.stdout
    assert re.search(r"produced -> committed +p50 [\d.]+ ms, p99 [\d.]+ ms", result.stdout)


@pytest.mark.e2e
def test_bench_fanout_compare_writes_every_figure(tmp_path: Path) -> None:
    """userstreamd and the websockets reference side by side (Node's ws too when this
    machine has it; the test never installs it): users delivered to every client, their
    latency, slow closes, memory per idle client. With stderr a terminal, each step shows
    there; stdout holds the plain table."""
    out = tmp_path / "fanout.json"
    code, stdout, terminal = _run_with_stderr_on_a_terminal(
        [
            *(sys.executable, "-m", "userstreamd", "bench", "fanout", "--clients", "5"),
            *("--rate", "200", "--duration", "1", "--warmup", "0.3", "--compare"),
            *("--idle-seconds", "1", "--stalled", "1", "--no-install", "--json", str(out)),
        ]
    )
    assert code == 0, terminal
    assert "\x1b" not in stdout and "\x1b[" in terminal
    for step in (f"userstreamd {__version__}: connect 5 clients", "websockets ", "5 connected"):
        assert step in terminal
    report = json.loads(out.read_text())
    compare = report["fanout_compare"]
    for row in (report["fanout"], compare["websockets"]):
        assert row["delivered"] > 0 and "delivered_per_s" in row, row
        assert row["clients_connected"] == row["connected_at_end"] == 5
        assert row["missed"] == 0 and row["dropped"] == 0
        assert 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["slow_closes"] >= 0 and row["rss_per_idle_client_kib"] is not None
        assert row["server_cpu_pct"] >= 0 and row["server_processes"] >= 1
        assert row["idle_server_cpu_pct"] >= 0 and 0 <= row["idle_p50_ms"] <= row["idle_p99_ms"]
        assert row["stalled"] == row["stalled_connected"] == 1
        assert row["stalled_closed"] + row["stalled_open_at_end"] == 1
    assert report["fanout"]["server"].startswith("userstreamd ")
    assert any(p["process"].startswith("consumer-worker") for p in report["fanout"]["processes"])
    assert compare["websockets"]["server"].startswith("websockets ")
    node = compare["node_ws"]
    assert "unavailable" in node or node["delivered"] > 0
    lines = stdout.splitlines()
    assert any(line.split()[:1] == ["userstreamd"] for line in lines[2:])
    assert any(line.split()[:1] == ["websockets"] for line in lines[2:])
    assert any(line.split()[:2] == ["node", "ws"] or "node_ws" in line for line in lines[2:])
    assert any(line.strip().startswith("idle (1 user/s, 1 s)") for line in lines)
    assert "stalled clients (never read), websockets " in stdout


@pytest.mark.e2e
def test_bench_fanout_stalled_clients_are_closed_3008_and_idle_figures_are_sane(
    tmp_path: Path,
) -> None:
    """The daemon with client_lag_max 200 at 200 users/s: 2 stalled clients (they never
    read) are closed with a 3008 close frame, found among what they were sent; the 3
    reading clients (a second behind before they would be cut off too) are the only ones
    counted. The idle phase gives the server's CPU and the latency of the idle users.
    (close_timeout_s 30: the daemon waits for their answer to its close frame beyond the
    measured phase, so its end is still open then and the frame is still there to read.)"""
    server = DaemonServer(tmp_path, 3)
    server.child.tables["broadcaster"] |= {"client_lag_max": 200, "close_timeout_s": 30.0}
    with open_steps(False) as steps:
        row = fanout.measure_server(
            server,
            steps,
            clients=3,
            rate_per_s=200,
            duration_s=3.0,
            warmup_s=0.3,
            harness_procs=1,
            idle_s=1.5,
            stalled=2,
        )
    assert row["stalled"] == row["stalled_connected"] == 2 and row["stalled_connect_errors"] == []
    assert row["stalled_closed"] == 2 and row["stalled_closes"] == {"3008": 2}
    assert row["stalled_open_at_end"] == 0
    after = row["stalled_closed_after_s"]
    assert 0 <= after["min"] <= after["max"] <= row["duration_s"] + stalled.SETTLE_S
    assert row["clients_connected"] == row["connected_at_end"] == 3
    assert row["slow_closes"] == row["missed"] == row["dropped"] == 0 and row["delivered"] > 0
    assert row["idle_s"] >= 1.5 and row["idle_delivered"] > 0
    assert row["idle_server_cpu_pct"] >= 0
    assert 0 <= row["idle_p50_ms"] <= row["idle_p99_ms"]


def test_a_stalled_client_is_watched_in_the_kernels_table_of_connections() -> None:
    """Both ends of a connection on 127.0.0.1 are in `established_pairs` (local port,
    remote port) while it is open; once the server's end is closed, its row is gone."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        conn, _ = listener.accept()
        ports = (listener.getsockname()[1], client.getsockname()[1])
        pairs = stalled.established_pairs()
        assert ports in pairs and ports[::-1] in pairs
        conn.close()
        assert ports not in stalled.established_pairs()


# -- the harness ----------------------------------------------------------------------


def _server_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False) -> bytes:
    n = len(payload)
    if n < 126:
        size = bytes([n])
    elif n < 65536:
        size = bytes([126]) + n.to_bytes(2, "big")
    else:
        size = bytes([127]) + n.to_bytes(8, "big")
    head = bytes([(0x80 if fin else 0) | opcode]) + bytes([size[0] | (0x80 if masked else 0)])
    head += size[1:]
    if masked:
        key = b"\x01\x02\x03\x04"
        return head + key + harness.mask(payload, key)
    return head + payload


def _user(seq: int, pad: int = 0) -> bytes:
    produced_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    user = {"name": "x" * pad, "login": {"uuid": str(seq)}}
    return json.dumps(
        {
            "type": "user",
            "epoch": "e",
            "seq": seq,
            "position": seq,
            "produced_at": produced_at,
            "source": "synthetic",
            "user": user,
        }
    ).encode()


def _stream(users: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A server's bytes for one client and the messages in them: a welcome, `users` small
    user frames, one of 70 kB (a 64-bit length), one in two fragments, a ``users`` frame
    of two, one after a gap of one seq, a ping, and a close with 3008 (slow)."""
    welcome = b'{"type":"welcome","epoch":"e","seq":0,"clients":1}'
    small = [_user(seq) for seq in range(1, users + 1)]
    big, split = _user(users + 1, pad=70_000), _user(users + 2, pad=300)
    batch = b'{"type":"users","items":[' + _user(users + 3) + b"," + _user(users + 4) + b"]}"
    after_gap = _user(users + 6)
    messages = [(1, welcome), *[(1, u) for u in small], (1, big), (1, split), (1, batch)]
    messages += [(1, after_gap), (9, b"hi"), (8, (3008).to_bytes(2, "big") + b"slow")]
    wire = _server_frame(1, welcome) + b"".join(_server_frame(1, u) for u in small)
    wire += _server_frame(1, big, masked=True)  # (a server must not; the reader copes)
    wire += _server_frame(1, split[:100], fin=False) + _server_frame(0, split[100:])
    wire += _server_frame(1, batch) + _server_frame(1, after_gap)
    wire += _server_frame(9, b"hi") + _server_frame(8, (3008).to_bytes(2, "big") + b"slow")
    return wire, messages


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20], ids=["1", "7", "1000", "all"])
def test_frame_reader_reassembles_whatever_the_reads(chunk: int) -> None:
    """Frames split anywhere or several in one read, 7-, 16- and 64-bit lengths, masked
    or not, fragmented: the same messages out, in order."""
    wire, messages = _stream(users=20)
    reader = harness.FrameReader()
    out: list[tuple[int, bytes]] = []
    for start in range(0, len(wire), chunk):
        out += reader.feed(wire[start : start + chunk])
    assert out == messages


class _RawServer:
    """A WebSocket server from raw sockets in a thread: the handshake, then `wire` to
    each of `clients` clients once all are connected, in odd-sized writes; what each
    client sent back is kept."""

    def __init__(self, clients: int, wire: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients, self.wire = clients, wire
        self.replies: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        conns = []
        for _ in range(self.clients):
            conn, _ = self.listener.accept()
            conn.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", request, re.IGNORECASE)
            assert key is not None
            accept = base64.b64encode(
                hashlib.sha1(key[1] + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            conns.append(conn)
        for conn in conns:
            for start in range(0, len(self.wire), 4093):
                conn.sendall(self.wire[start : start + 4093])
        for conn in conns:
            reply = b""
            with contextlib.suppress(OSError):
                while chunk := conn.recv(4096):
                    reply += chunk
            self.replies.append(reply)
            conn.close()
        self.listener.close()


def test_the_harness_counts_every_user_and_each_slow_close() -> None:
    """3 clients against a server that sends each of them 205 users (one after a gap)
    then a ping and a 3008 close: every user counted once, the gap, the slow closes; each
    client answered the ping and the close, masked."""
    wire, _ = _stream(users=200)
    server = _RawServer(3, wire)
    url = f"ws://127.0.0.1:{server.port}/"
    with subprocess.Popen(
        [sys.executable, "-m", "userstreamd.bench.harness", url, "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        connected = json.loads(proc.stdout.readline())
        assert connected == {"event": "connected", "clients": 3, "failed": 0, "errors": []}
        server.thread.join(30)
        proc.stdin.write("measure 0.2\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    assert result["users_total"] == 3 * 205 and result["missed_total"] == 3
    assert result["slow_closes"] == 3 and result["closes"] == {"3008": 3}
    assert result["connected"] == 0 and result["dropped"] == 0 and result["bad_frames"] == 0
    for reply in server.replies:
        frames = harness.FrameReader().feed(reply)
        assert frames == [(10, b"hi"), (8, (3008).to_bytes(2, "big"))]
        assert all(b & 0x80 for b in reply[1:2])  # masked, as a client must


def test_percentiles_of_a_histogram() -> None:
    hist = {0: 50, 10: 49, 200: 1}  # 0.1 ms buckets
    assert fanout.percentile_ms(hist, 0.5, 0.1) == 0.05
    assert fanout.percentile_ms(hist, 0.99, 0.1) == 1.05
    assert fanout.percentile_ms(hist, 1.0, 0.1) == 20.05
    assert fanout.percentile_ms({}, 0.5, 0.1) is None


# -- --bus nats: the parts as processes on a local NATS JetStream cluster -------------


@pytest.mark.cluster
def test_bench_e2e_on_nats_checks_zero_loss_over_the_stream(tmp_path: Path) -> None:
    """A 3-node cluster, a producer and (by default) a process per consumer, one
    PostgreSQL: users committed and published per second, every seq the stream holds
    committed exactly once, produced -> committed latency of the 1,000/s run, and the CPU
    and memory of each process, the nats-servers' too."""
    out = tmp_path / "e2e.json"
    result = _run_bench(
        *("e2e", "--bus", "nats", "--duration", "3", "--warmup", "0.5", "--json", str(out)),
        timeout_s=240,
    )
    report = json.loads(out.read_text())
    assert report["bus"] == "nats" and report["mode"] == "e2e"
    e2e = report["e2e"]
    embedded_keys = {"duration_s", "users_per_s", "zero_loss", "latency_ms", "latency_users"}
    embedded_keys |= {"processes", "latency_processes", "latency_ms_daemon_histogram"}
    assert embedded_keys <= set(e2e)
    assert e2e["consumer_processes"] == 2 and e2e["consumers_per_process"] == [1, 1]
    assert e2e["nats_servers"] == 3 and e2e["replicas"] == 3
    assert {"users_per_s", "published_per_s", "backlog_at_end", "drain_s"} <= set(e2e)
    loss = e2e["zero_loss"]
    assert loss["verified"] is True and loss["drained"] is True
    assert loss["published"] > 0
    assert loss["rows"] == loss["distinct_seqs"] == loss["max_seq"] == loss["published"]
    assert loss["min_seq"] == 1
    latency = e2e["latency_ms"]
    assert e2e["latency_users"] > 0 and "commit timestamp" in e2e["latency_source"]
    assert latency["p50"] <= latency["p99"] <= latency["max"]  # (of the users counted)
    for run in ("processes", "latency_processes"):
        names = {p["process"] for p in e2e[run]}
        assert {"producer", "consumer process 1", "consumer process 2"} <= names
        assert {"nats-server n1", "nats-server n2", "nats-server n3"} <= names
        assert any(n.startswith("postgres backend (userstreamd-consumer") for n in names)
        for proc in e2e[run]:
            assert proc["cpu_s"] >= 0 and proc["peak_rss_kib"] > 0, proc
    assert f"zero loss verified: {loss['published']:,} published" in result.stdout
    assert "2 consumers in 2 processes" in result.stdout


@pytest.mark.cluster
def test_bench_fanout_on_nats_splits_the_clients_over_two_broadcasters(tmp_path: Path) -> None:
    """A producer and two broadcaster processes on a 3-node cluster; 5 clients from two
    harness processes, round-robin over the broadcasters (3 and 2): every client gets
    every user, none is cut off."""
    out = tmp_path / "fanout.json"
    result = _run_bench(
        *("fanout", "--bus", "nats", "--clients", "5", "--rate", "200"),
        *("--duration", "1.5", "--warmup", "0.3", "--harness-procs", "2", "--json", str(out)),
        timeout_s=180,
    )
    report = json.loads(out.read_text())
    assert report["bus"] == "nats" and report["mode"] == "fanout"
    row = report["fanout"]
    assert row["broadcasters"] == 2 and row["clients_by_broadcaster"] == [3, 2]
    assert row["clients_connected"] == row["connected_at_end"] == 5
    assert row["delivered"] > 0 and "delivered_per_s" in row
    assert row["missed"] == 0 and row["dropped"] == 0 and row["slow_closes"] == 0
    assert 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert len(row["broadcaster_cpu_pct"]) == 2 and row["server_processes"] == 2
    assert row["stream_last_seq"] > 0 and row["rss_per_idle_client_kib"] is not None
    assert len(row["nats_server_cpu_pct"]) == 3 and row["harness_processes"] == 2
    names = {p["process"] for p in row["processes"]}
    assert {"producer", "broadcaster 1", "broadcaster 2", "nats-server n1"} <= names
    assert "over 2 broadcaster processes (3/2)" in result.stdout
    assert "0 slow closes, 0 dropped; 5 of 5 clients connected" in result.stdout


def test_each_bus_choice_is_a_topology_of_both_benchmarks() -> None:
    """``--bus`` offers exactly the topologies the two registries hold (the parser names
    them without importing the bench, so that ``bench --help`` needs no extra)."""
    from userstreamd.bench import e2e_topologies, fanout_servers

    modes = next(
        a for a in _commands()["bench"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    for mode in ("e2e", "fanout"):
        bus = next(a for a in modes.choices[mode]._actions if "--bus" in a.option_strings)
        assert set(bus.choices or ()) == set(e2e_topologies.LAUNCHERS)
    assert set(e2e_topologies.LAUNCHERS) == set(fanout_servers.LAUNCHERS)


def test_bench_fanout_compare_is_for_the_embedded_bus(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything starts, naming the combination; exit code 2."""
    assert main(["bench", "fanout", "--bus", "nats", "--compare"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--compare works with --bus embedded only" in err


def test_the_harness_goes_round_robin_over_several_urls() -> None:
    """Two servers, 5 clients over both URLs: clients 1, 3 and 5 on the first, 2 and 4
    on the second; each counts every user its server sent."""
    wire, _ = _stream(users=10)
    servers = [_RawServer(3, wire), _RawServer(2, wire)]
    urls = [f"ws://127.0.0.1:{server.port}/" for server in servers]
    with subprocess.Popen(
        [sys.executable, "-m", "userstreamd.bench.harness", *urls, "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        connected = json.loads(proc.stdout.readline())  # (some may have been closed since)
        assert connected["failed"] == 0 and connected["errors"] == []
        for server in servers:
            server.thread.join(30)
        proc.stdin.write("measure 0.2\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    assert [len(server.replies) for server in servers] == [3, 2]
    assert result["users_total"] == 5 * 15 and result["closes"] == {"3008": 5}
