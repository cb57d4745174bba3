"""The Random User API source over real HTTP against the local fake server."""

from __future__ import annotations

import httpx
import pytest
import trio

from userstreamd.errors import BadResponse, SourceUnavailable
from userstreamd.records import parse_user
from userstreamd.sources.randomuser import RandomUserSource
from userstreamd.sources.synthetic import synthetic_user

from .fakeapi import FakeRandomUserAPI, Fault


def _source(client: httpx.AsyncClient, api: FakeRandomUserAPI, **kw: object) -> RandomUserSource:
    options: dict[str, object] = {"seed": "s1", "page_size": 20}
    options.update(kw)
    return RandomUserSource(client, api.url, **options)  # type: ignore[arg-type]


async def test_positions_map_to_seeded_pages(fake_api: FakeRandomUserAPI) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            source = _source(client, fake_api)
            first = await source.fetch(1, 20)
            second = await source.fetch(21, 20)
            again = await source.fetch(21, 20)
    assert second == again, "same seed and page: same users"
    assert [u["login"]["uuid"] for u in first + second] == [
        synthetic_user("s1", p)["login"]["uuid"] for p in range(1, 41)
    ]
    params = [r.params for r in fake_api.requests]
    assert params[0] == {"results": "20", "page": "1", "seed": "s1"}
    assert params[1]["page"] == "2"
    assert all(r.path.startswith("/api/1.4/") for r in fake_api.requests)


async def test_schema_traps_arrive_and_validate(fake_api: FakeRandomUserAPI) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            users = await _source(
                client, fake_api, page_size=500, nats=["gb", "US", "IR", "UA"]
            ).fetch(1, 500)
    assert len(users) == 500
    assert {type(u["location"]["postcode"]) for u in users} == {int, str}
    assert any(u["id"]["value"] is None for u in users)
    assert any(not u["name"]["first"].isascii() for u in users)
    assert {u["nat"] for u in users} == {"GB", "US", "IR", "UA"}
    assert fake_api.requests[0].params["nat"] == "GB,US,IR,UA"
    for user in users:
        parsed = parse_user(user)
        assert isinstance(parsed.latitude, float)


def test_page_size_is_never_one_the_api_would_turn_into_one() -> None:
    for bad in (0, 5001):
        with pytest.raises(ValueError, match=r"1\.\.5000"):
            RandomUserSource(
                httpx.AsyncClient(), "http://127.0.0.1:1/api/1.4/", seed="s", page_size=bad
            )


@pytest.mark.parametrize(
    ("fault", "error", "retry_after"),
    [
        (Fault.status(429, retry_after=7), SourceUnavailable, 7.0),
        (Fault.status(429), SourceUnavailable, None),
        (Fault.status(500), SourceUnavailable, None),
        (Fault.status(502), SourceUnavailable, None),
        (Fault.status(503, retry_after=2), SourceUnavailable, 2.0),
        (Fault.status(504), SourceUnavailable, None),
        (Fault.empty_results(), BadResponse, None),
        (Fault.html(), BadResponse, None),
        (Fault.truncated(), BadResponse, None),
        (Fault.error_json("Uh oh, something has gone wrong."), BadResponse, None),
    ],
)
async def test_failures_are_classified(
    fake_api: FakeRandomUserAPI, fault: Fault, error: type[Exception], retry_after: float | None
) -> None:
    fake_api.push(fault)
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            source = _source(client, fake_api)
            with pytest.raises(error) as caught:
                await source.fetch(1, 20)
            assert len(await source.fetch(1, 20)) == 20  # the next request is served
    if error is SourceUnavailable:
        assert caught.value.retry_after_s == retry_after  # type: ignore[attr-defined]


async def test_hanging_response_times_out(fake_api: FakeRandomUserAPI) -> None:
    fake_api.push(Fault.hang(5))
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=0.3) as client:
            with pytest.raises(SourceUnavailable, match="timeout"):
                await _source(client, fake_api).fetch(1, 20)


async def test_connection_refused_then_back(fake_api: FakeRandomUserAPI) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=2) as client:
            source = _source(client, fake_api)
            fake_api.down()
            with pytest.raises(SourceUnavailable, match="connection failed"):
                await source.fetch(1, 20)
            fake_api.up()
            assert len(await source.fetch(1, 20)) == 20
