"""``userstreamd tail``: the readable line (pure), the client against scripted servers on
127.0.0.1 (resume, dedup, gaps, bad frames, acks, refusals), and the real command as a
child process against the real daemon, across a graceful stop and a kill -9."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from userstreamd.commands import tail
from userstreamd.serve.broadcaster import run_broadcaster
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import Gap, UserMessage, Welcome, decode_server, encode

from .conftest import daemon_tables, query
from .helpers import eventually, free_port, wait_until

ROOT = Path(__file__).parent.parent
SEED = "tail-seed"
RATE = 200
PROCESS_TIMEOUT_S = 20


# -- the readable line ----------------------------------------------------------------------


def _message(user: dict[str, Any], seq: int = 42, source: str = "synthetic") -> UserMessage:
    return UserMessage(
        epoch="E", seq=seq, position=seq, produced_at=datetime.now(UTC), source=source, user=user
    )


def test_a_readable_line_has_seq_name_country_age_and_source() -> None:
    user = {
        "name": {"title": "Ms", "first": "Jane", "last": "Doe"},
        "location": {"country": "Norway"},
        "dob": {"age": 31},
    }
    line = tail.format_user(_message(user))
    assert line.split() == ["42", "Ms", "Jane", "Doe", "Norway", "31", "synthetic"]
    assert line.startswith("     42  Ms Jane Doe ")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({}, ["5", "-", "-", "-", "synthetic"]),
        ({"login": {"uuid": "u"}}, ["5", "-", "-", "-", "synthetic"]),  # exc=name,location,dob
        ({"name": None, "location": "Oslo", "dob": []}, ["5", "-", "-", "-", "synthetic"]),
        (
            {"name": {"first": 7}, "location": {"country": {"x": 1}}, "dob": {"age": True}},
            ["5", "7", "-", "-", "synthetic"],
        ),
        ({"name": "Jo", "dob": {"age": "31"}}, ["5", "Jo", "-", "31", "synthetic"]),
    ],
)
def test_missing_or_odd_fields_read_as_a_dash(user: dict[str, Any], expected: list[str]) -> None:
    assert tail.format_user(_message(user, seq=5)).split() == expected


def test_hostile_record_text_cannot_break_or_repaint_the_line() -> None:
    user = {
        "name": {"title": "<img src=x onerror=alert(1)>", "first": "\x1b[2J\nEvil", "last": "\r"},
        "location": {"country": "\x9b31mRed\u202eesrever\u2028next"},
        "dob": {"age": "\x07\x00"},
    }
    line = tail.format_user(_message(user, source="syn\x1b]0;title\x07thetic"))
    assert len(line.splitlines()) == 1
    for raw in ("\x1b", "\n", "\r", "\x9b", "\u202e", "\u2028", "\x07", "\x00"):
        assert raw not in line, repr(raw)
    # shown, escaped, not hidden: the operator sees what the record carried
    assert "<img src=x onerror=alert(1)> \\x1b[2J\\nE…" in line  # long fields are cut
    assert "\\x9b31mRed\\u202eesrever" in line
    assert tail.clean("lone \ud800 surrogate") == "lone \\ud800 surrogate"


def test_a_json_line_is_the_frame_as_received_and_safe_for_a_terminal() -> None:
    frame = _user("E", 7)
    assert tail.json_line(frame) == frame
    hostile = '{"type": "user",\n "user": {"name": "\u009b2J\u202e\u2028x\\u001b"}}'
    line = tail.json_line(hostile)
    assert json.loads(line) == json.loads(hostile)
    assert len(line.splitlines()) == 1
    assert not set(line) & {"\n", "\x9b", "\u202e", "\u2028", "\x1b"}


@given(st.text(max_size=300), st.text(max_size=300), st.text(max_size=50))
def test_any_text_makes_exactly_one_printable_line(first: str, country: str, source: str) -> None:
    user = {"name": {"first": first}, "location": {"country": country}}
    line = tail.format_user(_message(user, source=source))
    assert len(line.splitlines()) == 1
    assert not any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in line)
    assert not set(line) & set(
        "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    )
    assert len(line) < 200
    line.encode("utf-8")  # no lone surrogate


def test_arguments_that_cannot_work_are_refused_before_connecting() -> None:
    def check(url: str = "ws://127.0.0.1:8765/", **kw: Any) -> str | None:
        args: dict[str, Any] = {"since": None, "epoch": None, "group": None, "ca_file": None}
        return tail.check_arguments(url, **{**args, **kw})

    assert check() is None
    assert check("ws+unix:///run/x.sock") is None
    assert check(since=3, epoch="abc") is None
    assert "ws://" in (check("http://127.0.0.1/") or "")
    assert "ws://" in (check("ws://host:port/") or "")
    assert "goes with --since" in (check(epoch="abc") or "")
    assert "--epoch, --since as options" in (check("ws://h/?since=1&epoch=e") or "")
    assert "not for group members" in (check(group="g", since=1) or "")
    assert "1-64" in (check(group="a b") or "")
    assert "No such file" in (check(ca_file="/nonexistent/ca.pem") or "")
    assert check(token="s3cr3t-Token!") is None
    two_lines = check(token="first-line\nsecond-line") or ""
    assert "one line" in two_lines and "first" not in two_lines
    err = io.StringIO()
    assert tail.run("http://x/", out=io.StringIO(), err=err) == 2
    assert err.getvalue().count("\n") == 1


# -- the client against scripted servers ----------------------------------------------------

Script = Callable[[WebSocketRequest], Awaitable[None]]


class ScriptedServer:
    """Each connection is served by the next script; the request targets are recorded."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.targets: list[str] = []
        self.url = ""

    async def handle(self, request: WebSocketRequest) -> None:
        self.targets.append(request.path)
        script = self.scripts[min(len(self.targets), len(self.scripts)) - 1]
        with contextlib.suppress(ConnectionClosed):  # the client left
            await script(request)


async def _serve(nursery: trio.Nursery, scripts: list[Script]) -> ScriptedServer:
    server = ScriptedServer(scripts)
    ws_server = await nursery.start(serve_websocket, server.handle, "127.0.0.1", 0, None)
    server.url = f"ws://127.0.0.1:{ws_server.port}/"
    return server


def _user(epoch: str, seq: int) -> str:
    return encode(
        UserMessage(
            epoch=epoch,
            seq=seq,
            position=seq,
            produced_at=datetime(2026, 1, 1, tzinfo=UTC),
            source="synthetic",
            user={"name": {"first": f"user{seq}"}},
        )
    )


def _welcome(epoch: str, seq: int, group: str | None = None) -> str:
    return encode(Welcome(epoch=epoch, seq=seq, clients=1, group=group))


async def _forever(request: WebSocketRequest) -> None:
    await request.accept()
    await trio.sleep_forever()


def _lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def _seqs(buffer: io.StringIO) -> list[int]:
    return [json.loads(line)["seq"] for line in _lines(buffer)]


async def _follow_until(
    url: str,
    done: Callable[[io.StringIO, io.StringIO], bool],
    out: io.StringIO | None = None,
    **options: Any,
) -> tuple[int, io.StringIO, io.StringIO]:
    """Run the client until `done(out, err)`, then stop it (as a signal would)."""
    out, err = out or io.StringIO(), io.StringIO()
    codes: list[int] = []

    async def follow(task_status: trio.TaskStatus[tail.Tail]) -> None:
        codes.append(
            await tail.follow(
                tail.Tail(url, out, err, **options), handle_signals=False, task_status=task_status
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = await nursery.start(follow)
            await eventually(lambda: bool(codes) or done(out, err), timeout_s=10)
            client.stop()
    return codes[0], out, err


async def test_it_resumes_after_a_disconnect_without_gap_or_duplicate() -> None:
    async def first(request: WebSocketRequest) -> None:
        ws = await request.accept()
        for frame in [
            _welcome("E1", 10),
            _user("E1", 11),
            _user("E1", 12),
            "not json at all",
            '{"type": "surprise", "seq": 13}',
            _user("E1", 12),  # a duplicate
            _user("E1", 13),
        ]:
            await ws.send_message(frame)
        await ws.aclose(1001, "server stopping")

    async def second(request: WebSocketRequest) -> None:
        ws = await request.accept()
        for frame in [
            _welcome("E1", 20),
            encode(Gap(epoch="E1", from_seq=14, to_seq=15, reason="no longer in the buffer")),
            _user("E1", 16),
            _user("E1", 17),
            encode(Gap(epoch="E2", from_seq=None, to_seq=3, reason="a new epoch")),
            _user("E2", 4),
        ]:
            await ws.send_message(frame)
        await ws.aclose(1001, "server stopping")

    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, [first, second, _forever])
        code, out, err = await _follow_until(
            server.url, lambda out, err: len(server.targets) >= 3, json_lines=True
        )
        nursery.cancel_scope.cancel()
    assert code == 0
    assert server.targets == ["/", "/?epoch=E1&since=13", "/?epoch=E2&since=4"]
    assert _seqs(out) == [11, 12, 13, 16, 17, 4]
    assert _lines(out)[0] == _user("E1", 11)  # the frame as received
    notices = _lines(err)
    assert all(line.startswith("userstreamd tail: ") for line in notices)
    text = err.getvalue()
    assert text.count("skipped a bad frame") == 2
    assert "disconnected: the server is stopping (1001: server stopping); reconnecting" in text
    assert "resuming after seq 13 of epoch E1" in text
    # A gap is this client's, not the stream's: never "lost" (item 13 of issue 22).
    assert "lost" not in text
    assert (
        "gap: skipped seqs 14-15 of epoch E1, which this client will not be sent: "
        "no longer in the buffer (skipped for this client only: the daemon's consumers "
        "still store them in PostgreSQL)"
    ) in text
    assert "gap: continuing live in epoch E2 from seq 4: a new epoch" in text


async def test_since_without_epoch_starts_after_that_seq_of_the_current_epoch() -> None:
    async def first(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(_welcome("Ep", 50))
        await ws.send_message(_user("Ep", 51))  # live: must not be printed before 21..50
        await trio.sleep_forever()

    async def second(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(_welcome("Ep", 50))
        for seq in range(21, 53):
            await ws.send_message(_user("Ep", seq))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, [first, second])
        _, out, err = await _follow_until(
            server.url, lambda out, err: len(_lines(out)) >= 32, json_lines=True, since=20
        )
        nursery.cancel_scope.cancel()
    assert server.targets == ["/", "/?epoch=Ep&since=20"]
    assert _seqs(out) == list(range(21, 53))
    assert "starting after seq 20 of epoch Ep (the stream is at seq 50)" in err.getvalue()


async def test_a_group_member_acks_what_it_printed_and_prints_a_redelivery_once() -> None:
    acked: list[int] = []
    printed_when_acked: list[bool] = []
    out = io.StringIO()

    async def read_acks(ws: WebSocketConnection, count: int) -> None:
        while len(acked) < count:
            ack = json.loads(await ws.get_message())
            assert ack["type"] == "ack"
            for seq in ack["seqs"]:
                acked.append(seq)
                printed_when_acked.append(f"user{seq}" in out.getvalue())

    async def member(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(_welcome("G", 4, group="watchers"))
        for seq in (5, 7, 9, 7):  # 7 again: a redelivery (as if its ack was lost)
            await ws.send_message(_user("G", seq))
        await read_acks(ws, 4)
        await ws.send_message(_user("G", 11))  # the client is stopped once it prints this
        await read_acks(ws, 5)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, [member])
        code, out, err = await _follow_until(
            server.url,
            lambda out, err: "user11" in out.getvalue(),
            out,
            group="watchers",
            token="t" * 20,
        )
        await eventually(lambda: len(acked) >= 5, timeout_s=5)
        nursery.cancel_scope.cancel()
    assert code == 0
    assert server.targets == ["/?group=watchers"]
    assert [line.split()[0] for line in _lines(out)] == ["5", "7", "9", "11"]
    assert sorted(acked) == [5, 7, 7, 9, 11] and all(printed_when_acked)
    assert "joined group watchers" in err.getvalue()


async def test_a_refusal_that_retrying_cannot_fix_ends_it_with_one_line() -> None:
    async def busy(request: WebSocketRequest) -> None:
        await request.reject(503, body=b"too many connections\n")

    async def unauthorized(request: WebSocketRequest) -> None:
        await request.reject(401, body=b"a valid token is required\x1b[2J\n")

    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, [busy, unauthorized])
        code, out, err = await _follow_until(server.url, lambda out, err: False, token="x" * 20)
        nursery.cancel_scope.cancel()
    assert code == 1 and out.getvalue() == ""
    assert len(server.targets) == 2  # the 503 was retried, the 401 was not
    assert _lines(err) == [
        f"userstreamd tail: cannot reach the stream at {server.url}: refused with HTTP 503: "
        "too many connections; retrying",
        "userstreamd tail: the server refused the connection: HTTP 401: "
        "a valid token is required\\x1b[2J",
    ]


async def test_an_unreachable_server_is_retried_and_reported_once_not_per_attempt() -> None:
    with socket.socket() as taken:  # a port nobody listens on
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    out, err = io.StringIO(), io.StringIO()
    client = tail.Tail(f"ws://127.0.0.1:{port}/", out, err)
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await eventually(lambda: client.statistics().failed_attempts >= 4, timeout_s=10)
            nursery.cancel_scope.cancel()
    assert client.statistics().failed_attempts >= 4
    assert len(_lines(err)) == 1 and "Connection refused" in err.getvalue()
    assert out.getvalue() == ""


async def test_a_closed_output_ends_it_quietly() -> None:
    async def stream(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(_welcome("E", 0))
        for seq in range(1, 100):
            await ws.send_message(_user("E", seq))
        await trio.sleep_forever()

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            if self.getvalue().count("\n") >= 3:
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    out, err = ClosedPipe(), io.StringIO()
    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, [stream])
        with trio.fail_after(10):
            code = await tail.follow(tail.Tail(server.url, out, err), handle_signals=False)
        nursery.cancel_scope.cancel()
    assert code == 0 and len(_lines(out)) == 3
    assert "Broken" not in err.getvalue() and "Traceback" not in err.getvalue()


async def test_wss_an_untrusted_certificate_ends_it_and_with_its_ca_it_streams(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hub = Hub("tls")
    for n in range(1, 11):
        hub.publish_nowait({"name": {"first": f"user{n}"}}, "synthetic", n)
    async with trio.open_nursery() as nursery:
        serve = partial(run_broadcaster, hub, "127.0.0.1", 0, ssl_context=server_context)
        url = f"wss://127.0.0.1:{await nursery.start(serve)}/"
        code, out, err = await _follow_until(url, lambda out, err: False)
        assert code == 1 and out.getvalue() == ""
        assert _lines(err) == [
            "userstreamd tail: TLS: the server's certificate is not trusted "
            "(unable to get local issuer certificate); pass its CA with --ca-file"
        ]
        code, out, err = await _follow_until(
            url, lambda out, err: len(_lines(out)) >= 7, ca_file=str(ca_file), since=3
        )
        nursery.cancel_scope.cancel()
    assert code == 0
    assert [line.split()[:2] for line in _lines(out)] == [
        [str(n), f"user{n}"] for n in range(4, 11)
    ]
    assert "starting after seq 3 of epoch tls (the stream is at seq 10)" in err.getvalue()


# -- the command against the real daemon ----------------------------------------------------


def _tables(tmp_path: Path, dsn: str, port: int) -> dict[str, dict[str, Any]]:
    tables = daemon_tables(tmp_path, dsn)
    tables["daemon"]["log_level"] = "info"  # 200 users/s: keep the per-user lines out
    tables["producer"] = {"source": "synthetic", "rate_per_s": RATE, "seed": SEED}
    tables["broadcaster"] = {"port": port}
    return tables


class TailProcess:
    """``python -m userstreamd tail ...`` as a child process, its output in files."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "userstreamd", "tail", *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, **env},
            )

    def lines(self) -> list[str]:
        return self.out_path.read_text(encoding="utf-8").split("\n")[:-1]  # complete lines

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def err(self) -> str:
        return self.err_path.read_text(encoding="utf-8")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(PROCESS_TIMEOUT_S)


@pytest.fixture
def tails(tmp_path: Path) -> Iterator[Callable[..., TailProcess]]:
    started: list[TailProcess] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> TailProcess:
        process = TailProcess(tmp_path, name, list(args), env or {})
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def _wait_for_seq(follower: TailProcess, seq: int, daemon: Any) -> None:
    def past() -> bool:
        assert daemon.proc.poll() is None, daemon.log_path.read_text()[-3000:]
        records = follower.records()
        return bool(records) and records[-1]["seq"] >= seq

    wait_until(past, PROCESS_TIMEOUT_S, f"tail printed seq {seq}:\n{follower.err()}")


@pytest.mark.e2e
def test_json_tail_goes_on_without_gap_or_duplicate_across_daemon_restarts(
    tmp_path: Path, dsn: str, daemon_factory: Any, tails: Callable[..., TailProcess]
) -> None:
    """The daemon stopped with SIGINT and started again, then killed -9 and started
    again (the second restart regenerates seqs tail has already printed: the stream
    resumes from the consumers' checkpoint); tail's output is one unbroken run."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    tables = _tables(tmp_path, dsn, port)
    first = daemon_factory(tables, name="first")
    first.wait_for("daemon.ready")
    follower = tails("json", "--url", url, "--json")
    wait_until(lambda: len(follower.lines()) >= 100, PROCESS_TIMEOUT_S, follower.err())

    assert first.stop() == 0
    stopped_at = first.events("daemon.stopped")[0]["last_seq"]
    second = daemon_factory(tables, name="second")
    resumed = second.wait_for("daemon.stream_resumed")
    _wait_for_seq(follower, stopped_at + 100, second)

    # kill -9: the restarted daemon regenerates the stream from the consumers' checkpoint,
    # and the replay buffer is gone with the process. So tail must have everything
    # committed (be at the live end, not catching up): what it had not received by then
    # can no longer be sent to it (the server would say so with a gap).
    committed = "SELECT coalesce(max(seq), 0) FROM incoming_users"
    wait_until(
        lambda: follower.records()[-1]["seq"] > query(dsn, committed)[0][0],
        PROCESS_TIMEOUT_S,
        "tail at the live end",
    )
    second.kill()
    third = daemon_factory(tables, name="third")
    restarted_from = third.wait_for("daemon.stream_resumed")["seq"]
    printed_before_kill = follower.records()[-1]["seq"]
    assert restarted_from <= printed_before_kill, "tail was behind the checkpoint at the kill"
    _wait_for_seq(follower, printed_before_kill + 100, third)
    assert follower.stop(signal.SIGINT) == 0

    records = follower.records()
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a duplicate"
    assert seqs[0] < stopped_at < printed_before_kill < seqs[-1] - 99
    assert {r["epoch"] for r in records} == {resumed["epoch"]}
    uuids = [r["user"]["login"]["uuid"] for r in records]
    assert len(set(uuids)) == len(uuids)
    assert all(
        r["user"]["login"]["uuid"] == synthetic_user(SEED, r["position"])["login"]["uuid"]
        for r in records
    ), "the restarted daemons streamed the same users at the same positions"
    # One line per event, not one per attempt: the connections a stopping daemon closes
    # at once and the refused ones are failed attempts, of which only the first of each
    # outage is told (the next one after RETRY_NOTICE_S).
    notices = follower.err().splitlines()
    kinds = [n.removeprefix("userstreamd tail: ").split(" ")[0] for n in notices]
    assert set(kinds) == {"connected", "disconnected:", "cannot"}, notices
    assert kinds[0] == kinds[-1] == "connected" and kinds.count("disconnected:") >= 2, notices
    assert all(before == "disconnected:" for before, kind in pairwise(kinds) if kind == "cannot")
    assert any(f"resuming after seq {stopped_at} of epoch" in n for n in notices), notices
    assert any(f"resuming after seq {printed_before_kill} of epoch" in n for n in notices)


@pytest.mark.e2e
def test_tail_since_0_prints_the_whole_stored_stream_then_follows(
    tmp_path: Path, dsn: str, daemon_factory: Any, tails: Callable[..., TailProcess]
) -> None:
    """50,000 users stored (the replay buffer holds 1,000 of them): ``tail --since 0``
    prints every one, in order, from seq 1, then the live ones after them."""
    port = free_port()
    tables = _tables(tmp_path, dsn, port)
    tables["producer"]["rate_per_s"] = 5000
    tables["broadcaster"] |= {"buffer_messages": 1000, "client_lag_max": 1000}
    daemon = daemon_factory(tables, name="daemon")
    daemon.wait_for("daemon.ready")
    committed = "SELECT coalesce(max(seq), 0) FROM stream_checkpoints"
    wait_until(lambda: query(dsn, committed)[0][0] >= 50_000, 120, "50,000 users committed")
    stored_then = query(dsn, committed)[0][0]
    follower = tails("json", "--url", f"ws://127.0.0.1:{port}/", "--since", "0", "--json")

    def printed(count: int) -> Callable[[], bool]:
        def enough() -> bool:
            assert daemon.proc.poll() is None and follower.proc.poll() is None, follower.err()
            with follower.out_path.open("rb") as out:
                return (
                    sum(chunk.count(b"\n") for chunk in iter(lambda: out.read(1 << 20), b""))
                    >= count
                )

        return enough

    wait_until(
        printed(stored_then + 2000), 120, f"tail printed the stored stream:\n{follower.err()}"
    )
    assert follower.stop(signal.SIGINT) == 0
    seqs = [r["seq"] for r in follower.records()]
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
    assert len(seqs) >= stored_then + 2000  # (the stored ones, then live ones)
    stored = dict(
        query(dsn, "SELECT seq, raw->'login'->>'uuid' FROM incoming_users WHERE seq <= 50000")
    )
    records = follower.records()[:50_000]
    assert [r["user"]["login"]["uuid"] for r in records] == [stored[s] for s in range(1, 50_001)]
    assert "gap" not in follower.err()


@pytest.mark.e2e
def test_readable_tail_prints_one_line_per_user_matching_the_json_frames(
    tmp_path: Path, dsn: str, daemon_factory: Any, tails: Callable[..., TailProcess]
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    daemon = daemon_factory(_tables(tmp_path, dsn, port))
    daemon.wait_for("daemon.ready")
    readable = tails("readable", "--url", url)
    as_json = tails("json", "--url", url, "--json")
    wait_until(
        lambda: len(readable.lines()) >= 300 and len(as_json.lines()) >= 300,
        PROCESS_TIMEOUT_S,
        readable.err() + as_json.err(),
    )
    # `| head -3`: the pipe closes under it; it ends, quietly.
    with subprocess.Popen(
        [sys.executable, "-m", "userstreamd", "tail", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    ) as piped:
        assert piped.stdout is not None and piped.stderr is not None
        head = [piped.stdout.readline() for _ in range(3)]
        piped.stdout.close()
        try:
            assert piped.wait(PROCESS_TIMEOUT_S) == 0
        finally:
            piped.kill()
        errors = piped.stderr.read().decode()
    assert all(line.endswith(b"\n") for line in head)
    assert errors.startswith("userstreamd tail: connected to ") and errors.count("\n") == 1
    assert readable.stop(signal.SIGTERM) == 0 and as_json.stop(signal.SIGTERM) == 0

    lines = readable.lines()
    seqs = [int(line.split()[0]) for line in lines]
    assert seqs == list(range(seqs[0], seqs[0] + len(lines))), "one line per user, in order"
    frames = {r["seq"]: r for r in as_json.records()}
    common = [(seq, line) for seq, line in zip(seqs, lines, strict=True) if seq in frames]
    assert len(common) >= 200
    for seq, line in common:
        assert line == tail.format_user(decode_server(json.dumps(frames[seq]))), seq
    assert "connected to" in readable.err() and readable.err().count("\n") == 1


def _token_tables(tmp_path: Path, dsn: str, port: int) -> dict[str, dict[str, Any]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "# name  token  permissions\n"
        "watcher  watcher-Zt8uKq3mWp5x  group:watchers\n"
        "reader   reader-Lr4vBn7cXs2d   read\n"
    )
    tables = _tables(tmp_path, dsn, port)
    tables["broadcaster"].update(tokens_file=str(tokens), groups=["watchers"], ack_timeout_s=3.0)
    # A member's window, when it does not ask for one: without acks it would get 20 users.
    tables["consumers"]["window"] = 20
    return tables


@pytest.mark.e2e
def test_a_group_member_acks_each_user_so_the_stream_flows_past_its_window(
    tmp_path: Path, dsn: str, daemon_factory: Any, tails: Callable[..., TailProcess]
) -> None:
    port = free_port()
    daemon = daemon_factory(_token_tables(tmp_path, dsn, port))
    daemon.wait_for("daemon.ready")
    token_file = tmp_path / "watcher.token"
    token_file.write_text("watcher-Zt8uKq3mWp5x\n")
    args = ["--url", f"ws://127.0.0.1:{port}/", "--json", "--group", "watchers"]
    member = tails("member", *args, "--token-file", str(token_file))
    wait_until(lambda: len(member.lines()) >= 400, PROCESS_TIMEOUT_S, member.err())
    assert member.stop(signal.SIGINT) == 0

    seqs = [r["seq"] for r in member.records()]
    # The only member gets every user, in order; 20x its window: each was acked.
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert member.err().count("joined group watchers") == 1, member.err()  # no reconnect
    assert not daemon.events("broadcaster.member_evicted")
    assert not daemon.events("broadcaster.bad_frame")
    ended = [e for e in daemon.events("broadcaster.client_disconnected") if e["who"] == "watcher"]
    assert [e["how"] for e in ended] in ([], ["closed_1000"]), ended
    assert daemon.stop() == 0


@pytest.mark.e2e
def test_a_refused_token_ends_tail_with_a_clear_message(
    tmp_path: Path, dsn: str, daemon_factory: Any, tails: Callable[..., TailProcess]
) -> None:
    port = free_port()
    daemon = daemon_factory(_token_tables(tmp_path, dsn, port))
    daemon.wait_for("daemon.ready")
    url = f"ws://127.0.0.1:{port}/"
    wrong = tails("wrong", "--url", url, env={"USERSTREAMD_TOKEN": "not-a-token-0123456789"})
    none = tails("none", "--url", url, env={"USERSTREAMD_TOKEN": ""})
    reader = tails(
        "reader",
        "--url",
        url,
        "--group",
        "watchers",
        env={"USERSTREAMD_TOKEN": "reader-Lr4vBn7cXs2d"},
    )
    for process in (wrong, none, reader):
        assert process.proc.wait(PROCESS_TIMEOUT_S) == 1
        assert process.lines() == []
    assert wrong.err() == (
        "userstreamd tail: the server refused the connection: HTTP 401: a valid token is required\n"
    )
    assert (
        none.err()
        == "userstreamd tail: the server refused the connection: HTTP 401: token required\n"
    )
    assert reader.err() == (
        "userstreamd tail: the server refused the connection: HTTP 403: "
        "token 'reader' may not join group 'watchers'\n"
    )
    assert "not-a-token" not in daemon.log_path.read_text()
    assert {e["status"] for e in daemon.events("broadcaster.refused")} == {401, 403}
    assert daemon.stop() == 0


async def test_a_server_that_goes_silent_is_left_for_a_new_connection(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A server that completes the handshake, sends its welcome, then neither reads nor
    answers pings (a vanished peer, no FIN): tail notices the missing pong and connects
    again, on its own. (Virtual time: the clock jumps only while everything is idle.)"""
    import base64
    import hashlib

    mock_clock.autojump_threshold = 0.1
    connections: list[trio.SocketStream] = []
    welcome = encode(Welcome(epoch="E", seq=0, clients=1)).encode()

    second = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        connections.append(stream)
        if len(connections) == 2:
            second.set()
        request = b""
        while b"\r\n\r\n" not in request:
            if not (chunk := await stream.receive_some()):
                return
            request += chunk
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept
            + b"\r\n\r\n"
            + bytes([0x81, len(welcome)])
            + welcome
        )
        await trio.sleep_forever()  # reads nothing, answers nothing

    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = tail.Tail(f"ws://127.0.0.1:{port}/", out, err)
        codes: list[int] = []

        async def follow() -> None:
            codes.append(await tail.follow(client, handle_signals=False))

        with trio.fail_after(120):  # virtual seconds
            async with trio.open_nursery() as following:
                following.start_soon(follow)
                await second.wait()
                client.stop()  # then the block ends when follow returns
        nursery.cancel_scope.cancel()
    assert codes == [0] and out.getvalue() == ""
    assert (
        f"disconnected: no pong within {tail.PONG_TIMEOUT_S:g} s; reconnecting\n" in err.getvalue()
    )
