"""The one stream client: the URL it connects to (resume cursor, group), how a lost
connection is described (the protocol's close-code table), and how it closes."""

from __future__ import annotations

import contextlib
from functools import partial
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed, WebSocketRequest, serve_websocket

from userstreamd.stream import protocol
from userstreamd.stream.client import (
    CLOSE_SENT_S,
    CLOSE_WAIT_S,
    LOST,
    WELCOME_TIMEOUT_S,
    StreamClient,
    closed_with,
    describe_lost,
    open_ws,
)


def test_the_target_resumes_after_the_cursor_in_place_of_the_url_s_own() -> None:
    client = StreamClient("ws://h:1/?batch=10&epoch=old&since=1")
    assert client.target() == "ws://h:1/?batch=10&epoch=old&since=1"  # (no cursor yet)
    client.resume_after("E", 41)
    assert client.target() == "ws://h:1/?batch=10&epoch=E&since=41"
    client.resume_after(None, None)
    assert client.target() == "ws://h:1/?batch=10&epoch=old&since=1"


def test_a_group_member_joins_its_group_and_never_resumes_by_seq() -> None:
    client = StreamClient("ws+unix:///run/b.sock?window=5", group="db")
    client.resume_after("E", 41)
    target = urlsplit(client.target())
    assert (target.scheme, target.path, target.query) == (
        "ws+unix",
        "/run/b.sock",
        "window=5&group=db",
    )


@pytest.mark.parametrize(
    ("code", "reason", "text"),
    [
        (1008, "message rate exceeded", "closed 1008 message rate exceeded: too many messages"),
        (4001, "", "closed 4001: the group fell too far behind"),
        (4999, "odd", "closed 4999 odd: closed"),
    ],
)
def test_a_close_is_described_with_its_code_reason_and_meaning(
    code: int, reason: str, text: str
) -> None:
    exc = ConnectionClosed(CloseReason(code, reason))
    assert describe_lost(exc).startswith(text)
    assert closed_with(exc, code) and not closed_with(exc, code + 1)


def test_every_close_code_the_server_sends_has_a_meaning() -> None:
    codes = {
        value
        for name, value in vars(protocol).items()
        if name.startswith("CLOSE_") and isinstance(value, int)
    }
    assert codes - protocol.CLOSE_NOT_SENDABLE - {protocol.CLOSE_NO_STATUS} <= set(
        protocol.CLOSE_MEANINGS
    )
    assert protocol.close_meaning(4999) == "closed"


async def test_a_cancelled_client_sends_its_close_without_waiting_for_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its reader task is cancelled with it, so no answer could be read: a stopping
    consumer used to wait the whole close timeout (2 s) for one."""
    closes: list[int | None] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            closes.append(exc.reason.code if exc.reason else None)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
        url = f"ws://127.0.0.1:{server.port}/"
        with trio.CancelScope() as scope:
            async with open_ws(url):
                scope.cancel()
                cancelled_at = trio.current_time()
                await trio.sleep_forever()
        closed_s = trio.current_time() - cancelled_at
        with trio.fail_after(5):
            while not closes:  # noqa: ASYNC110 (the server's handler records it)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert closes == [1000]  # (the close was sent)
    assert closed_s <= CLOSE_SENT_S < CLOSE_WAIT_S  # (virtual seconds: which bound applied)


async def test_a_server_silent_after_the_handshake_is_a_lost_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No welcome within WELCOME_TIMEOUT_S: the client gives up on it and reconnects,
    where it used to wait forever (its keepalive starts after the welcome)."""
    accepted = 0

    async def silent(request: WebSocketRequest) -> None:
        nonlocal accepted
        ws = await request.accept()
        accepted += 1
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, silent, "127.0.0.1", 0, None))
        client = StreamClient(f"ws://127.0.0.1:{server.port}/")
        start = trio.current_time()

        async def session(ws: object, welcome: object) -> None:
            raise AssertionError("no welcome was sent")

        with trio.move_on_after(WELCOME_TIMEOUT_S * 3) as guard, pytest.raises(trio.TooSlowError):
            await client.run_once(session)
        assert not guard.cancelled_caught, "still waiting for a welcome"
        assert trio.current_time() - start == pytest.approx(WELCOME_TIMEOUT_S, abs=1.0)
        assert accepted == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "first",
    [
        b"\xff\xfe not json",
        b'{"type":"user","epoch":"e","seq":1}',
        b'{"type":"welcome"}',
        None,  # (closes at once, after the handshake)
    ],
    ids=["garbage", "not-a-welcome", "welcome-missing-fields", "early-close"],
)
async def test_a_hostile_first_frame_is_a_lost_connection_and_the_client_retries(
    first: bytes | None, autojump_clock: trio.testing.MockClock
) -> None:
    """Whatever the server says instead of a welcome: no session starts, the connection
    counts as lost, and the client connects again (with its backoff)."""
    accepted = 0

    async def hostile(request: WebSocketRequest) -> None:
        nonlocal accepted
        ws = await request.accept()
        accepted += 1
        if first is None:
            await ws.aclose(1011)
            return
        await ws.send_message(first)
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()

    lost: list[BaseException] = []

    async def session(ws: object, welcome: object) -> None:
        raise AssertionError("a session started without a welcome")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, hostile, "127.0.0.1", 0, None))
        client = StreamClient(f"ws://127.0.0.1:{server.port}/")
        with trio.move_on_after(30):
            nursery.start_soon(partial(client.run, session, on_lost=lost.append))
            while accepted < 3:  # noqa: ASYNC110 (the server counts the connections)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert accepted >= 3, "the client kept reconnecting"
    assert client.reconnects >= 2
    assert all(isinstance(exc, LOST) for exc in lost)
