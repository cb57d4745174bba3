"""The public port against real sockets on 127.0.0.x: refusals, limits, timeouts, TLS.

Each test runs the broadcaster in-process with small limits, misbehaves as a stranger
would, and checks both what the stranger got and that a well-behaved client was served.
Peers on 127.0.0.2 and up are distinct client IPs (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import ssl
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected
from wsproto.utilities import LocalProtocolError

from userstreamd import backoff
from userstreamd.backoff import Backoff
from userstreamd.config import BroadcasterConfig
from userstreamd.consume.consumer import Consumer
from userstreamd.serve import auth
from userstreamd.serve.admission import Policy
from userstreamd.serve.auth import FREE_FAILURES, Token, Tokens
from userstreamd.serve.broadcaster import Broadcaster
from userstreamd.serve.edge import Edge, peer_out_of_step, reuse_port_sockets
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.store.postgres import PostgresStore
from userstreamd.stream.client import open_ws
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import (
    CLOSE_ACK_TIMEOUT,
    CLOSE_GROUP_LAGGING,
    CLOSE_RATE,
    CLOSE_TOO_BIG,
)

from . import hostile
from .conftest import query
from .helpers import eventually

READ = Token("viewer", "viewer-token-0123456789", frozenset({"read"}))
AUDIT = Token("auditor", "auditor-token-0123456789", frozenset({"group:audit", "group:db"}))
POLICY = Policy(Tokens((READ, AUDIT), required=True), own_group="db", groups=frozenset({"audit"}))


def _publish(hub: Hub, positions: range) -> None:
    for p in positions:
        hub.publish_nowait(synthetic_user("edge", p), "synthetic", p)


async def _serve(
    nursery: trio.Nursery,
    hub: Hub,
    policy: Policy = POLICY,
    private: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **settings: Any,
) -> tuple[Broadcaster, int]:
    broadcaster = Broadcaster(hub, BroadcasterConfig(**settings), policy, ssl_context=ssl_context)
    port = await nursery.start(partial(broadcaster.run, "127.0.0.1", 0, private))
    return broadcaster, port


async def _tcp(port: int, source_ip: str = "127.0.0.1") -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source_ip, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _raw_status(port: int, target: str, source_ip: str = "127.0.0.1") -> str:
    """Send a WebSocket upgrade for `target` by hand; the status line of the answer."""
    stream = await _tcp(port, source_ip)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send_all(request.encode())
    answer = b""
    while b"\r\n" not in answer and (chunk := await stream.receive_some(4096)):
        answer += chunk
    await stream.aclose()
    return answer.split(b"\r\n")[0].decode()


async def _eof_within(stream: trio.SocketStream, seconds: float) -> bool:
    """True if the server closes the connection within `seconds` (reading what it sends);
    the stream is closed either way."""
    try:
        with trio.move_on_after(seconds):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False
    finally:
        await stream.aclose()


async def _close_code(ws: Any, *messages: str) -> int:
    """Send `messages`, then read until the server closes; its close code."""
    try:
        for message in messages:
            await ws.send_message(message)
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return int(closed.reason.code)


async def test_strangers_get_a_status_at_the_handshake_and_readers_get_the_stream(
    tmp_path: Path,
) -> None:
    hub = Hub("e")
    hub.declare_group("db", holds_producer=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(nursery, hub, private=tmp_path / "p.sock")
            url = f"ws://127.0.0.1:{port}/"
            assert (tmp_path / "p.sock").stat().st_mode & 0o777 == 0o600
            assert (await _raw_status(port, "//[x")).startswith("HTTP/1.1 400")
            assert (await _raw_status(port, "/nowhere")).startswith("HTTP/1.1 404")
            assert (await _raw_status(port, "/?since=x")).startswith("HTTP/1.1 400")
            for kwargs, status in [
                ({}, 401),
                ({"token": "wrong-token-0123456789"}, 401),
                ({"token": READ.secret, "group": "audit"}, 403),
                ({"token": AUDIT.secret, "group": "db"}, 403),  # the daemon's own group
            ]:
                group = kwargs.pop("group", None)
                with pytest.raises(ConnectionRejected) as rejected:
                    async with open_ws(url + (f"?group={group}" if group else ""), **kwargs):
                        pass
                assert rejected.value.status_code == status
            async with (
                open_ws(url, token=READ.secret) as reader,
                open_ws(f"{url}?token={READ.secret}") as browser,
                open_ws(f"{url}?group=audit", token=AUDIT.secret) as auditor,
                open_ws(f"ws+unix://{tmp_path / 'p.sock'}?group=db") as own,
            ):
                welcomes = [
                    json.loads(await ws.get_message()) for ws in (reader, browser, auditor, own)
                ]
                assert [w["group"] for w in welcomes] == [None, None, "audit", "db"]
                _publish(hub, range(1, 3))
                for ws in (reader, browser):
                    assert [json.loads(await ws.get_message())["seq"] for _ in range(2)] == [1, 2]
            stats = broadcaster.statistics().edge
            assert stats.refused == {400: 2, 404: 1, 401: 2, 403: 2}
            assert stats.handler_errors == 0
            nursery.cancel_scope.cancel()
    assert not (tmp_path / "p.sock").exists(), "the private socket goes with the broadcaster"


async def test_connection_limits_per_ip_and_in_total_and_the_handshake_timeout() -> None:
    hub = Hub("e")
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(
                nursery,
                hub,
                open_policy,
                max_connections=6,
                max_connections_per_ip=3,
                handshake_timeout_s=1.0,
            )
            half_open = [await _tcp(port, "127.0.0.2") for _ in range(3)]
            assert (await _raw_status(port, "/", "127.0.0.2")).startswith("HTTP/1.1 429")
            more = [await _tcp(port, "127.0.0.3") for _ in range(3)]  # 6 open: the total
            assert (await _raw_status(port, "/", "127.0.0.4")).startswith("HTTP/1.1 503")
            # The handshake timeout frees every slot; then a real client gets in.
            assert all([await _eof_within(s, 5) for s in half_open + more])
            async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
            stats = broadcaster.statistics().edge
            assert stats.over_limit == 2 and stats.handshake_timeouts == 6
            nursery.cancel_scope.cancel()


async def test_garbage_or_nothing_before_the_upgrade_request_ends_at_once_and_others_carry_on() -> (
    None
):
    """The handler's own task reads the upgrade request: bytes that are no HTTP get a
    400 and the close, a peer gone before (or in the middle of) its request is counted,
    neither waits for the handshake timeout, and none is a handler error."""
    hub = Hub("e")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
            broadcaster, port = await _serve(nursery, hub, open_policy, handshake_timeout_s=30)
            garbage = await _tcp(port)
            await garbage.send_all(b"\x16\x03\x01\x02\x00\x01\x00 not http at all\r\n\r\n")
            answer = b""
            while chunk := await garbage.receive_some(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400")
            await garbage.aclose()
            gone = await _tcp(port)
            await gone.aclose()
            halfway = await _tcp(port)
            await halfway.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr")
            await halfway.aclose()
            await eventually(lambda: broadcaster.statistics().edge.handshakes_failed == 3)
            async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
                _publish(hub, range(1, 4))
                assert [json.loads(await ws.get_message())["seq"] for _ in range(3)] == [1, 2, 3]
            stats = broadcaster.statistics().edge
            assert stats.handler_errors == 0 and stats.handshake_timeouts == 0
            nursery.cancel_scope.cancel()


async def test_abusive_clients_are_closed_with_their_code_and_others_carry_on() -> None:
    hub = Hub("e", window=10)
    hub.declare_group("audit")
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset({"audit"}))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(
                nursery,
                hub,
                open_policy,
                max_message_bytes=65536,
                max_messages_per_s=20,
                ping_interval_s=0.5,
                pong_timeout_s=0.5,
                ack_timeout_s=1.0,
                close_timeout_s=1.0,
            )
            url = f"ws://127.0.0.1:{port}/"
            async with open_ws(url) as good:
                await good.get_message()
                async with open_ws(url) as big:
                    await big.get_message()
                    assert await _close_code(big, "x" * 2**20) == CLOSE_TOO_BIG
                async with open_ws(url) as flood:
                    await flood.get_message()
                    assert await _close_code(flood, *['{"type": "nonsense"}'] * 100) == CLOSE_RATE
                async with open_ws(f"{url}?group=audit") as mute:
                    await mute.get_message()
                    _publish(hub, range(1, 4))
                    assert await _close_code(mute) == CLOSE_ACK_TIMEOUT
                # A socket that completes the handshake and then never reads: no pongs.
                deaf = await _tcp(port)
                await deaf.send_all(
                    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                await eventually(lambda: broadcaster.closed.get("dead_peer", 0) > 0)
                assert await _eof_within(deaf, 2)
                # Meanwhile the good client got every user in order, and pongs in time.
                seqs = []
                while len(seqs) < 3:
                    message = json.loads(await good.get_message())
                    seqs.append(message["seq"])
                assert seqs == [1, 2, 3]
                _publish(hub, range(4, 5))
                assert json.loads(await good.get_message())["seq"] == 4
            stats = broadcaster.statistics()
            assert stats.closed["closed_1009"] >= 1 and stats.closed["closed_1008"] == 1
            assert stats.closed["closed_4000"] == 1 and stats.closed["dead_peer"] == 1
            assert stats.edge.handler_errors == 0
            nursery.cancel_scope.cancel()


async def test_a_public_group_that_falls_behind_is_cut_off_without_holding_the_producer() -> None:
    hub = Hub("e", buffer_messages=50, group_lag_max=20)
    hub.declare_group("db", holds_producer=True)
    hub.declare_group("audit")
    own = hub.join("db", "own", window=1000)
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset({"audit"}))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await _serve(nursery, hub, open_policy)
            async with open_ws(f"ws://127.0.0.1:{port}/?group=audit&window=5") as lazy:
                await lazy.get_message()
                for p in range(1, 31):
                    _publish(hub, range(p, p + 1))
                    while hub.next_member_frame_nowait(own) is not None:
                        pass
                    hub.ack(own, sorted(own.in_flight))
                assert await _close_code(lazy) == CLOSE_GROUP_LAGGING
            assert hub.has_room() and hub.watermark("db")[0] == 30
            async with open_ws(f"ws://127.0.0.1:{port}/?group=audit") as back:
                await back.get_message()
                gap = json.loads(await back.get_message())
                assert gap["type"] == "gap" and gap["from_seq"] == 1
            nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_wss_consumers_verify_the_server_and_the_stream_flows(
    ca: trustme.CA, dsn: str, tmp_path: Path
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    store = PostgresStore(dsn)
    store.migrate()
    hub = Hub("e")
    hub.declare_group("audit")
    consumer = Consumer.websocket(
        "",
        store,
        batch_size=10,
        batch_interval_s=0.05,
        token=AUDIT.secret,
        ca_file=str(ca_file),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(nursery, hub, ssl_context=server_context)
            url = f"wss://127.0.0.1:{port}/"
            with pytest.raises(trio.BrokenResourceError) as untrusted:
                async with open_ws(url, token=READ.secret):
                    pass
            assert isinstance(untrusted.value.__cause__, ssl.SSLCertVerificationError)
            # The server saw the failed handshake, and lives on.
            await eventually(lambda: broadcaster.statistics().edge.handshakes_failed > 0)
            consumer.url = f"{url}?group=audit"
            await nursery.start(consumer.run)
            _publish(hub, range(1, 21))
            await eventually(lambda: hub.watermark("audit")[0] >= 20)
            nursery.cancel_scope.cancel()
    rows = query(dsn, "SELECT count(*) FROM incoming_users")
    assert rows == [(20,)]


def test_a_held_port_is_shared_by_its_workers_and_refused_to_anyone_else() -> None:
    """The daemon holds the port (not listening); workers listen on it with SO_REUSEPORT
    and get every connection; a second daemon asking for it gets EADDRINUSE."""
    held = reuse_port_sockets("127.0.0.1", 0, listen=False)
    port = held[0].getsockname()[1]
    workers = [reuse_port_sockets("127.0.0.1", port, listen=True)[0] for _ in range(2)]
    try:
        with pytest.raises(OSError) as busy:
            reuse_port_sockets("127.0.0.1", port, listen=False)
        assert busy.value.errno == errno.EADDRINUSE
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        accepted = 0
        for worker in workers:
            worker.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    worker.accept()[0].close()
                    accepted += 1
        assert accepted == len(clients)
        for client in clients:
            client.close()
    finally:
        for sock in [*held, *workers]:
            sock.close()


@pytest.mark.parametrize(
    ("breach", "code"),
    [
        pytest.param(b"\x81\x05hello", 1002, id="unmasked"),
        pytest.param(hostile.frame(b"x", opcode=0x3), 1002, id="opcode-3"),
        pytest.param(hostile.frame((999).to_bytes(2, "big"), opcode=0x8), 1002, id="close-999"),
        pytest.param(hostile.frame(b"\xff\xfe not utf-8"), 1007, id="not-utf-8"),
    ],
)
async def test_a_frame_that_breaks_the_protocol_gets_a_close_frame_with_its_code(
    breach: bytes, code: int
) -> None:
    hub = Hub("e")
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(nursery, hub, open_policy, close_timeout_s=2.0)
            stream, rest = await hostile.upgrade(port, "127.0.0.1")
            await stream.send_all(breach)
            assert await hostile.server_close(stream, rest) == code
            await stream.aclose()
            stats = broadcaster.statistics()
            await eventually(lambda: broadcaster.closed.get(f"closed_{code}", 0) == 1)
            assert broadcaster.edge.statistics().peer_faults == {f"protocol_error_{code}": 1}
            assert stats.edge.handler_errors == 0
            nursery.cancel_scope.cancel()


async def test_a_ping_while_we_are_closing_is_no_error_of_ours() -> None:
    """The client answers our close frame (1008 here) with a ping, then its close: no
    error-level line, no handler error; the ping is counted and the close completes."""
    hub = Hub("e")
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(
                nursery, hub, open_policy, max_messages_per_s=5, close_timeout_s=5.0
            )
            with structlog.testing.capture_logs() as logs:
                stream, rest = await hostile.upgrade(port, "127.0.0.1")
                await stream.send_all(hostile.frame(b'{"type":"nonsense"}') * 30)
                assert await hostile.server_close(stream, rest) == CLOSE_RATE
                await stream.send_all(hostile.frame(b"still there?", opcode=0x9))
                await stream.send_all(hostile.frame(CLOSE_RATE.to_bytes(2, "big"), opcode=0x8))
                assert await _eof_within(stream, 5)
                await eventually(lambda: broadcaster.edge.statistics().open_connections == 0)
            assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
            stats = broadcaster.edge.statistics()
            assert stats.handler_errors == 0
            assert stats.peer_faults == {"ping_while_closing": 1}
            nursery.cancel_scope.cancel()


@pytest.fixture
def long_lockouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lockout lasts 60 s (not the real 0.5-1 s of the first one): a test that
    checks a lockout in real time sees it whatever the runner's speed."""
    monkeypatch.setattr(auth, "LOCKOUT", Backoff(min_s=60.0, max_s=60.0))
    no_jitter = SimpleNamespace(uniform=lambda low, high: high)
    monkeypatch.setattr(backoff, "random", no_jitter)


async def test_repeated_wrong_tokens_from_one_address_are_answered_429_before_the_handshake(
    long_lockouts: None,
) -> None:
    """After FREE_FAILURES wrong tokens, the address is locked out (429 with Retry-After,
    before any handshake, whatever it presents); other addresses go on as before."""
    hub = Hub("e")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(nursery, hub)
            wrong = "/?token=" + "w" * 24

            async def status(target: str, ip: str) -> str:
                return (await _raw_status(port, target, ip)).split()[1]

            statuses = [await status(wrong, "127.0.0.5") for _ in range(FREE_FAILURES)]
            assert statuses == ["401"] * FREE_FAILURES
            assert await status(wrong, "127.0.0.5") == "401"  # the one that locks it out
            right = f"/?token={READ.secret}"
            assert await status(right, "127.0.0.5") == "429", "locked out, whatever it presents"
            assert await status(wrong, "127.0.0.6") == "401"
            assert await status(right, "127.0.0.6") == "101"
            stats = broadcaster.edge.statistics()
            assert stats.token_lockouts == 1 and stats.refused[429] == 1
            nursery.cancel_scope.cancel()


async def _upgrade_head(stream: trio.SocketStream, target: str) -> bytes:
    """Send an upgrade for `target` on an open connection; the answer's head."""
    await stream.send_all(hostile.UPGRADE.format(target=target).encode())
    head = b""
    while b"\r\n\r\n" not in head and (chunk := await stream.receive_some(4096)):
        head += chunk
    await stream.aclose()
    return head


async def test_connections_in_flight_when_an_address_is_locked_out_get_no_guess(
    long_lockouts: None,
) -> None:
    """The lockout is checked at accept and again just before the token is: connections
    an address opened before it was locked out (up to max_connections_per_ip) are each
    answered 429 with Retry-After, not a free guess each."""
    hub = Hub("e")
    in_flight = 8
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broadcaster, port = await _serve(nursery, hub, max_connections_per_ip=32)
            wrong = "/?token=" + "w" * 24
            early = [await _tcp(port, "127.0.0.7") for _ in range(in_flight)]
            await eventually(lambda: broadcaster.edge.statistics().open_connections == in_flight)
            statuses = [
                (await _raw_status(port, wrong, "127.0.0.7")).split()[1]
                for _ in range(FREE_FAILURES + 1)
            ]
            assert statuses == ["401"] * (FREE_FAILURES + 1)  # (the last one locks it out)
            heads = [await _upgrade_head(stream, wrong) for stream in early]
            assert [h.split(b" ", 2)[1] for h in heads] == [b"429"] * in_flight
            for head in heads:
                assert b"\r\nretry-after: " in head.lower()
                retry_after = int(head.lower().split(b"retry-after: ")[1].split(b"\r\n")[0])
                assert 59 <= retry_after <= 60
            stats = broadcaster.edge.statistics()
            assert stats.refused == {401: FREE_FAILURES + 1, 429: in_flight}
            assert stats.token_lockouts == 1, "no token checked after the lockout"
            nursery.cancel_scope.cancel()


async def test_a_peer_out_of_step_is_info_and_our_own_protocol_mistake_is_an_error() -> None:
    """A LocalProtocolError from a send the peer's close made impossible is the peer's
    timing (``peer_faults['state_error']``, info); any other is a handler error, logged
    with its traceback."""
    open_policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    raised: list[LocalProtocolError] = [
        LocalProtocolError(
            "Event Pong(payload=b'') cannot be sent in state ConnectionState.LOCAL_CLOSING."
        ),
        LocalProtocolError("Event Message cannot be sent during the handshake"),
    ]

    async def session(*_: object) -> None:
        raise raised.pop(0)

    edge = Edge(BroadcasterConfig(), open_policy, session)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(edge.serve_tcp, "127.0.0.1", 0)
            with structlog.testing.capture_logs() as logs:
                for _ in range(2):
                    with contextlib.suppress(ConnectionClosed):
                        async with open_ws(f"ws://127.0.0.1:{port}/") as ws:
                            await ws.get_message()
                await eventually(lambda: edge.statistics().open_connections == 0)
            nursery.cancel_scope.cancel()
    stats = edge.statistics()
    assert stats.peer_faults == {"state_error": 1} and stats.handler_errors == 1
    levels = {e["event"]: e for e in logs if e["event"].startswith("broadcaster.")}
    assert levels["broadcaster.peer_out_of_step"]["log_level"] == "info"
    failed = levels["broadcaster.connection_failed"]
    assert failed["log_level"] == "error" and failed["exc_info"] is not None
    assert "during the handshake" in failed["error"]


def test_only_a_send_on_a_closing_connection_is_the_peers_timing() -> None:
    assert peer_out_of_step(
        LocalProtocolError(
            "Event Pong(payload=b'') cannot be sent in state ConnectionState.CLOSED."
        )
    )
    assert peer_out_of_step(LocalProtocolError("Connection already closed."))
    assert not peer_out_of_step(
        LocalProtocolError("Event Message cannot be sent in state ConnectionState.CONNECTING.")
    )
    assert not peer_out_of_step(LocalProtocolError("Cannot initiate an upgrade connection"))
    assert not peer_out_of_step(ValueError("cannot be sent in state ConnectionState.CLOSED."))
