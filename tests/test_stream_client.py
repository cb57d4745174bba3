"""The one stream client's pure parts: the URL it connects to (resume cursor, group) and
how a lost connection is described (the protocol's close-code table)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from trio_websocket import CloseReason, ConnectionClosed

from userstreamd.stream import protocol
from userstreamd.stream.client import StreamClient, closed_with, describe_lost


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
