"""The ops port's listener against real sockets on 127.0.0.x: connection caps in total and
per address, the read and write timeouts (none while an answer is computed or written),
no answer to a peer that is gone, every answer to one that half-closed, and accept
errors (EMFILE) logged once with a count; the descriptor budgets of the ops port and the
stream, which never overlap; and `check`'s warning when the port is not on loopback.

Each test serves a small counting ASGI app with `OpsPort` in-process; peers on
127.0.0.2 and up are distinct client IPs (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.events import Event, Updated
from hypercorn.trio.tcp_server import TCPServer
from structlog.testing import capture_logs

from userstreamd import gate
from userstreamd.commands.cli import main
from userstreamd.config import HttpConfig
from userstreamd.ops.server import OpsPort

from .helpers import eventually
from .hostile import tcp

GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


class Counting:
    """An ASGI app that answers every request with `size` bytes after `delay_s` and
    counts them."""

    def __init__(self, size: int = 100, delay_s: float = 0.0) -> None:
        self.size = size
        self.delay_s = delay_s  # (how long each answer takes to compute)
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await trio.sleep(self.delay_s)
        body = b"x" * self.size
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(app: Counting, **settings: Any) -> AsyncIterator[tuple[OpsPort, int]]:
    ops = OpsPort(app, HttpConfig(**settings))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(ops.serve, "127.0.0.1", 0))
        yield ops, port
        nursery.cancel_scope.cancel()


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (EOF or reset)."""
    received = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def status_of(port: int, source_ip: str = "127.0.0.1") -> int:
    stream = await tcp(port, source_ip)
    async with stream:
        await stream.send_all(GET)
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some()
            assert chunk, head
            head += chunk
    return int(head.split()[1])


async def test_connections_over_the_caps_are_told_429_or_503_at_once() -> None:
    app = Counting()
    async with serving(app, max_connections=4, max_connections_per_ip=2, read_timeout_s=60) as (
        ops,
        port,
    ):
        with trio.fail_after(20):
            held = [await tcp(port, "127.0.0.2") for _ in range(2)]
            await eventually(lambda: ops.statistics().open_connections == 2)
            assert await status_of(port, "127.0.0.2") == 429  # (that address has its 2)
            assert await status_of(port, "127.0.0.3") == 200  # (another has room)
            await eventually(lambda: ops.statistics().open_connections == 2)
            held += [await tcp(port, "127.0.0.3") for _ in range(2)]
            await eventually(lambda: ops.statistics().open_connections == 4)
            assert await status_of(port, "127.0.0.4") == 503  # (4 in all)
            await held.pop().aclose()
            await eventually(lambda: ops.statistics().open_connections == 3)
            assert await status_of(port, "127.0.0.4") == 200
            for stream in held:
                await stream.aclose()
    found = ops.statistics()
    assert found.over_limit == {429: 1, 503: 1}
    assert app.calls == 2


async def test_a_request_not_sent_whole_within_read_timeout_is_dropped() -> None:
    async with serving(Counting(), read_timeout_s=0.5) as (ops, port):
        with trio.fail_after(20):
            silent = await tcp(port)
            assert await read_all(silent) == b""  # (closed, nothing answered)
            await silent.aclose()
            dripping = await tcp(port)
            closed_after = None
            for i, byte in enumerate(GET):  # a byte every 0.1 s: 3.4 s for the request
                try:
                    await dripping.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    closed_after = i
                    break
                await trio.sleep(0.1)
            assert closed_after is not None and closed_after < len(GET) - 1
            await dripping.aclose()
            assert await status_of(port) == 200  # (and the others are served)
            await eventually(lambda: ops.statistics().open_connections == 0)


async def test_an_answer_slower_than_read_timeout_is_delivered_whole() -> None:
    """No read timeout runs while an answer is computed (1 s here) or written (a client
    reading 1 MiB slowly, for more than read_timeout_s); the next request on the
    connection has read_timeout_s from the end of the answer."""
    size = 2**20
    async with serving(Counting(size, delay_s=1.0), read_timeout_s=0.3) as (ops, port):
        with trio.fail_after(20):
            client = await tcp(port, rcvbuf=16384)
            await client.send_all(GET)
            received = b""
            start = trio.current_time()
            while not received.endswith(b"x" * 100) or len(received) < size:
                chunk = await client.receive_some(16384)
                assert chunk, len(received)  # (never cut off)
                received += chunk
                await trio.sleep(0.01)  # (a slow reader: 64 chunks at least, 0.64 s)
            assert trio.current_time() - start > 1.6  # (1 s to compute, 0.64 s to read)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == b"x" * size
            await client.send_all(GET)  # (kept alive: a second slow answer)
            received = b""
            while len(received) < size:
                chunk = await client.receive_some()
                assert chunk, len(received)
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
            assert await read_all(client) == b""  # (then idle: closed after read_timeout_s)
            await client.aclose()
            await eventually(lambda: ops.statistics().open_connections == 0)
    assert ops.statistics().write_timeouts == ops.statistics().peers_gone == 0


async def test_a_peer_that_does_not_read_its_answer_is_dropped() -> None:
    size = 4 * 2**20
    async with serving(Counting(size), write_timeout_s=0.5) as (ops, port):
        with trio.fail_after(20):
            stalled = await tcp(port, rcvbuf=4096)
            await stalled.send_all(GET)
            await eventually(lambda: ops.statistics().write_timeouts == 1)
            await eventually(lambda: ops.statistics().open_connections == 0)
            assert len(await read_all(stalled)) < size  # (cut off: it never had it all)
            await stalled.aclose()
            assert await status_of(port) == 200


async def test_the_pipelined_requests_of_a_peer_that_is_gone_are_not_computed() -> None:
    app = Counting(256 * 1024)
    async with serving(app) as (ops, port):
        with trio.fail_after(20):
            attacker = await tcp(port, "127.0.0.2", rcvbuf=4096)
            await attacker.send_all(GET * 20)
            await eventually(lambda: app.calls >= 1)
            await attacker.aclose()  # (with unread answers: a reset)
            await eventually(lambda: ops.statistics().open_connections == 0)
            assert app.calls == 1
            assert ops.statistics().peers_gone == 1
            # A peer that reads gets every pipelined answer.
            reader = await tcp(port)
            await reader.send_all(
                GET * 3 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            answers = await read_all(reader)
            assert answers.count(b"HTTP/1.1 200") == 4
            await reader.aclose()
            assert app.calls == 5


async def test_a_client_that_half_closes_after_its_request_gets_its_answer() -> None:
    async with serving(Counting(256 * 1024)) as (ops, port):
        with trio.fail_after(20):
            client = await tcp(port)
            await client.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await client.send_eof()  # (as `nc -N` does)
            answer = await read_all(client)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"x" * 1000)
            await client.aclose()
            await eventually(lambda: ops.statistics().open_connections == 0)


async def test_a_client_that_pipelines_then_half_closes_gets_every_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn tells the connection it is idle again (``Updated(idle=True)``) between
    two pipelined requests, and what it does with that may let the next request start,
    and the peer's EOF be read, before it returns (here: its keep-alive timer takes
    0.05 s to restart). The EOF must not end the connection while answers are due."""
    original = TCPServer.protocol_send

    async def slow_idle_timer(self: TCPServer, event: Event) -> None:
        if isinstance(event, Updated) and event.idle:
            await trio.sleep(0.05)
        await original(self, event)

    monkeypatch.setattr(TCPServer, "protocol_send", slow_idle_timer)
    app = Counting(1000, delay_s=0.2)
    async with serving(app) as (ops, port):
        with trio.fail_after(20):
            client = await tcp(port)
            await client.send_all(GET * 3)
            await client.send_eof()  # (as `nc -N` does)
            answers = await read_all(client)
            await client.aclose()
            assert answers.count(b"HTTP/1.1 200") == 3 and answers.endswith(b"x" * 1000)
            assert app.calls == 3
            await eventually(lambda: ops.statistics().open_connections == 0)


@pytest.mark.parametrize("limit", [256, 1024, 4096, 8192, 65536])
@pytest.mark.parametrize("stream_first", [False, True])
def test_the_ops_port_and_the_stream_share_the_descriptors_without_overlap(
    monkeypatch: pytest.MonkeyPatch, limit: int, stream_first: bool
) -> None:
    """Each asks for more than the limit holds: the ops port gets an eighth, the stream
    the rest less `STREAM_FD_RESERVE`, and the two never add up to more than the limit
    less that reserve, whichever asks first, even when the first raised the soft limit
    from below."""
    rlimit = [limit // 4, limit]  # (soft, hard)
    monkeypatch.setattr(gate.resource, "getrlimit", lambda _: tuple(rlimit))
    monkeypatch.setattr(
        gate.resource, "setrlimit", lambda _, value: rlimit.__setitem__(0, value[0])
    )
    if stream_first:
        stream = gate.stream_room(100_000)
        ops = gate.ops_room(100_000)
    else:
        ops = gate.ops_room(100_000)
        stream = gate.stream_room(100_000)
    assert rlimit[0] == limit  # (raised to the hard limit)
    assert ops <= limit // 8
    assert ops + stream + gate.STREAM_FD_RESERVE <= limit
    assert stream == limit - gate.STREAM_FD_RESERVE - limit // 8  # (all the rest)
    if limit == 1024:  # (the unit's LimitNOFILE=1024 case: 128 + 768 + 128 reserved)
        assert (ops, stream) == (128, 768)


def test_each_budget_raises_the_soft_limit_only_as_far_as_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rlimit = [1024, 65536]
    monkeypatch.setattr(gate.resource, "getrlimit", lambda _: tuple(rlimit))
    monkeypatch.setattr(
        gate.resource, "setrlimit", lambda _, value: rlimit.__setitem__(0, value[0])
    )
    assert gate.ops_room(256) == 256 and rlimit[0] == 2048  # (256 is an eighth of it)
    assert gate.stream_room(4096) == 4096
    soft = rlimit[0]
    assert soft - gate.STREAM_FD_RESERVE - soft // 8 >= 4096  # (with the ops port's eighth)
    assert soft - 1 - gate.STREAM_FD_RESERVE - (soft - 1) // 8 < 4096  # (and no more)


async def test_accept_errors_are_logged_once_with_a_count_and_accepting_resumes() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with serving(Counting()) as (ops, port):
        with trio.fail_after(20), capture_logs() as logs:
            clients = [trio.socket.socket() for _ in range(3)]
            in_use = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))  # (no descriptor left)
            try:
                for sock in clients:
                    await sock.connect(("127.0.0.1", port))  # (in the backlog: not accepted)
                await eventually(lambda: ops.statistics().accept_errors >= 5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in clients:
                stream = trio.SocketStream(sock)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (await read_all(stream)).startswith(b"HTTP/1.1 200")
                await stream.aclose()
    failed = [e for e in logs if e["event"] == "http.accept_failed"]
    assert len(failed) == 1, failed  # (once per 10 s; the next line counts the rest)
    assert failed[0]["error"] == "EMFILE" and failed[0]["log_level"] == "error"
    assert failed[0]["accept_errors"] == 1 and failed[0]["suppressed"] == 0
    assert ops.statistics().accept_errors >= 5


@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.0.2.1", "::"])
def test_check_warns_when_the_ops_port_is_not_on_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[http]\nhost = "{host}"\n')
    assert main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok\n"
    assert captured.err == (
        f"{path}: warning: http.host: {host!r} is not loopback: /metrics, "
        "/healthz, /readyz, /status.json and the live page have no authentication; keep "
        "that port behind a firewall or a proxy\n"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_check_is_quiet_about_an_ops_port_on_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[http]\nhost = "{host}"\n')
    assert main(["check", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""
