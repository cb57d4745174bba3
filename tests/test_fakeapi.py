"""The fake Random User API: real HTTP on 127.0.0.1, real-server quirks, scripted faults."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from userstreamd.sources.synthetic import NATIONALITIES, synthetic_page

from .fakeapi import UH_OH, FakeRandomUserAPI, Fault

TIMEOUT_S = 5.0  # every HTTP call in this module is bounded by this (the httpx client timeout)
TOP_KEYS = {
    "gender", "name", "location", "email", "login", "registered",
    "dob", "phone", "cell", "id", "picture", "nat",
}  # fmt: skip


@pytest.fixture
def api() -> Iterator[FakeRandomUserAPI]:
    with FakeRandomUserAPI() as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT_S) as http:
        yield http


def get(client: httpx.Client, api: FakeRandomUserAPI, **params: object) -> httpx.Response:
    return client.get(api.url, params={k: str(v) for k, v in params.items()})


def uuids(response: httpx.Response) -> list[str]:
    return uuids_of(response.json())


def uuids_of(body: dict[str, Any]) -> list[str]:
    return [u["login"]["uuid"] for u in body["results"]]


# -- normal service ------------------------------------------------------------------------------


def test_normal_response_shape(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/1\.4/", api.url)
    response = get(client, api, results=3, seed="abc")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"results", "info"}
    assert body["info"] == {"seed": "abc", "results": 3, "page": 1, "version": "1.4"}
    assert len(body["results"]) == 3
    assert all(set(user) == TOP_KEYS for user in body["results"])
    [record] = api.requests
    assert (record.path, record.status, record.users) == ("/api/1.4/", 200, 3)
    assert record.params == {"results": "3", "seed": "abc"}
    assert api.users_served == 3


def test_path_without_trailing_slash(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    response = client.get(api.url.rstrip("/"), params={"seed": "x"})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


def test_non_ascii_survives_as_utf8(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    response = get(client, api, results=5, seed="utf", nat="ua,ir")
    assert "charset=utf-8" in response.headers["content-type"]
    text = response.content.decode("utf-8")
    assert re.search(r"[\u0400-\u04FF]|[\u0600-\u06FF]", text)
    names = [u["name"]["first"] for u in response.json()["results"]]
    assert names == [u["name"]["first"] for u in synthetic_page("utf", 1, 5, ["UA", "IR"])]


@pytest.mark.parametrize("value", ["0", "5001", "abc", "-3", "2.5", ""])
def test_results_out_of_range_silently_becomes_one(
    api: FakeRandomUserAPI, client: httpx.Client, value: str
) -> None:
    body = get(client, api, results=value, seed="q").json()
    assert len(body["results"]) == 1
    assert body["info"]["results"] == 1


def test_results_upper_bound_is_served(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    body = get(client, api, results=5000, seed="big").json()
    assert len(body["results"]) == 5000
    assert api.users_served == 5000


@pytest.mark.parametrize(("value", "page"), [("0", 1), ("10001", 1), ("x", 1), ("10000", 10000)])
def test_page_out_of_range_becomes_one(
    api: FakeRandomUserAPI, client: httpx.Client, value: str, page: int
) -> None:
    assert get(client, api, page=value, seed="p").json()["info"]["page"] == page


def test_seed_and_page_are_deterministic(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    first = get(client, api, results=5, seed="det", page=2)
    again = get(client, api, results=5, seed="det", page=2)
    assert uuids(first) == uuids(again)
    expected = [u["login"]["uuid"] for u in synthetic_page("det", 1, 10)[5:]]
    assert uuids(first) == expected  # page 2 of 5 = stream positions 6..10
    assert set(uuids(first)).isdisjoint(uuids(get(client, api, results=5, seed="det", page=3)))


@pytest.mark.parametrize(
    ("suffix", "nat"), [("00", "AU"), ("0a", "IE"), ("14", "US"), ("7~", "FI")]
)
def test_an_18_character_seed_picks_a_nationality(
    api: FakeRandomUserAPI, client: httpx.Client, suffix: str, nat: str
) -> None:
    """As the real server reads it: 16 seed characters, then a hex index into the
    nationality list (JavaScript's parseInt: leading hex digits) that overrides ``nat``."""
    users = get(client, api, results=5, seed="0123456789abcdef" + suffix, nat="gb").json()
    assert {u["nat"] for u in users["results"]} == {nat}
    assert uuids_of(users) == [
        u["login"]["uuid"] for u in synthetic_page("0123456789abcdef", 1, 5, [nat])
    ]


@pytest.mark.parametrize("suffix", ["-1", "15", "ff", "~1", "zz", "0x"])
def test_an_18_character_seed_without_a_nationality_fails(
    api: FakeRandomUserAPI, client: httpx.Client, suffix: str
) -> None:
    response = get(client, api, results=5, seed="0123456789abcdef" + suffix)
    assert response.status_code == 500
    assert response.json() == {"error": UH_OH}
    assert api.requests[-1].params["seed"] == "0123456789abcdef" + suffix  # recorded


def test_missing_seed_gets_a_random_one(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    one = get(client, api, results=2).json()
    two = get(client, api, results=2).json()
    assert re.fullmatch(r"[0-9a-f]{16}", one["info"]["seed"])
    assert one["info"]["seed"] != two["info"]["seed"]
    again = get(client, api, results=2, seed=one["info"]["seed"]).json()
    assert [u["login"]["uuid"] for u in again["results"]] == [
        u["login"]["uuid"] for u in one["results"]
    ]


def test_nat_filter(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    filtered = get(client, api, results=200, seed="n", nat="us,Gb").json()["results"]
    assert {u["nat"] for u in filtered} == {"US", "GB"}
    unfiltered = get(client, api, results=400, seed="n", nat="us,xx").json()["results"]
    assert {u["nat"] for u in unfiltered} == set(NATIONALITIES)  # one bad code drops the filter


def test_inc_exc_noinfo(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    included = get(client, api, results=3, seed="f", inc="name, NAT").json()
    assert all(set(u) == {"name", "nat"} for u in included["results"])
    excluded = get(client, api, results=3, seed="f", exc="login,id").json()
    assert all(set(u) == TOP_KEYS - {"login", "id"} for u in excluded["results"])
    both = get(client, api, seed="f", inc="name,login,email", exc="login").json()
    assert set(both["results"][0]) == {"name", "email"}
    bare = client.get(api.url + "?seed=f&noinfo").json()
    assert set(bare) == {"results"}


@pytest.mark.parametrize("path", ["/api/", "/api/9.9/", "/", "/api/1.4/extra"])
def test_unknown_path_is_plain_404(api: FakeRandomUserAPI, client: httpx.Client, path: str) -> None:
    response = client.get(api.url.removesuffix("/api/1.4/") + path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/plain")
    assert api.requests[-1].status == 404
    assert api.users_served == 0


# -- faults --------------------------------------------------------------------------------------


def test_status_faults_then_normal_service(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    api.push(
        Fault.status(503),
        Fault.status(429, retry_after=2),
        Fault.status(502, retry_after=0.5, body={"error": "custom"}),
    )
    unavailable = get(client, api, seed="s")
    assert unavailable.status_code == 503
    assert unavailable.json()["error"].startswith("Uh oh, something has gone wrong.")
    limited = get(client, api, seed="s")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json()["error"].startswith("Whoa, ease up there cowboy.")
    custom = get(client, api, seed="s")
    assert (custom.status_code, custom.json()) == (502, {"error": "custom"})
    assert custom.headers["retry-after"] == "0.5"
    assert get(client, api, seed="s").status_code == 200
    assert [r.status for r in api.requests] == [503, 429, 502, 200]
    assert api.pending_faults == 0
    assert api.users_served == 1


def test_empty_results_fault(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    api.push(Fault.empty_results())
    response = get(client, api, results=10, seed="e")
    assert response.status_code == 200
    assert response.json()["results"] == []
    assert response.json()["info"]["seed"] == "e"
    assert api.requests[-1].users == 0


def test_html_fault(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    api.push(Fault.html())
    response = get(client, api, results=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<!DOCTYPE html>")
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_truncated_fault(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    api.push(Fault.truncated())
    response = get(client, api, results=10, seed="t")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.text.startswith('{"results": [{')
    with pytest.raises(json.JSONDecodeError):
        response.json()
    full = get(client, api, results=10, seed="t")
    assert len(response.content) < len(full.content)
    assert api.users_served == 10  # only the well-formed response counts


def test_error_json_fault(api: FakeRandomUserAPI, client: httpx.Client) -> None:
    api.push(Fault.error_json("Uh oh, something has gone wrong."))
    response = get(client, api, results=10)
    assert (response.status_code, response.json()) == (
        200,
        {"error": "Uh oh, something has gone wrong."},
    )


async def test_hang_delays_only_its_own_request(api: FakeRandomUserAPI) -> None:
    api.push(Fault.hang(1.5))
    durations: dict[str, float] = {}

    def timed_get(label: str) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=TIMEOUT_S) as http:
            assert http.get(api.url, params={"seed": label}).status_code == 200
        durations[label] = time.monotonic() - started  # (in the order they finish)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, timed_get, "slow")
            taken = await trio.to_thread.run_sync(
                api.wait_until, lambda: api.pending_faults == 0, TIMEOUT_S
            )
            assert taken  # the slow request holds the fault: now a fast one
            nursery.start_soon(trio.to_thread.run_sync, timed_get, "fast")
    assert durations["slow"] >= 1.4  # it did hang (a lower bound: no machine is too slow)
    assert list(durations) == ["fast", "slow"], "the fast one finished first"
    # Recorded (and counted) as they were generated, before the slow one was sent.
    assert [r.params["seed"] for r in api.requests] == ["slow", "fast"]
    print(f"slow {durations['slow']:.2f} s, fast {durations['fast']:.2f} s")


def test_a_reply_the_client_gave_up_on_is_counted(api: FakeRandomUserAPI) -> None:
    """As on the real server: the page is generated and counted before it is sent, so a
    client that times out waiting has spent it all the same."""
    api.push(Fault.hang(2.0))
    with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.get(api.url, params={"results": 30, "seed": "t"})
    assert api.users_served == 30
    assert [(r.status, r.users) for r in api.requests] == [(200, 30)]


async def test_stop_does_not_wait_for_a_hanging_request() -> None:
    api = FakeRandomUserAPI()
    api.start()
    api.push(Fault.hang(60))
    errors: list[Exception] = []

    def hanging_get() -> None:
        with httpx.Client(timeout=TIMEOUT_S) as http:
            try:
                http.get(api.url)
            except httpx.HTTPError as exc:
                errors.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hanging_get)
            assert await trio.to_thread.run_sync(
                api.wait_until, lambda: api.pending_faults == 0, TIMEOUT_S
            )
            started = time.monotonic()
            api.stop()  # (this fail_after's 10 s: not the hang's 60 s)
            print(f"stopped in {time.monotonic() - started:.2f} s")
    assert len(errors) == 1
    assert isinstance(errors[0], httpx.RemoteProtocolError)  # dropped, never answered


def test_down_refuses_then_up_serves_on_the_same_port(
    api: FakeRandomUserAPI, client: httpx.Client
) -> None:
    url = api.url
    assert get(client, api, seed="d").status_code == 200
    api.down()
    with pytest.raises(httpx.ConnectError):
        client.get(url)
    api.up()
    assert api.url == url
    response = client.get(url, params={"seed": "d"})
    assert response.status_code == 200
    assert len(api.requests) == 2


def test_rate_limit_counts_users_per_window(client: httpx.Client) -> None:
    with FakeRandomUserAPI(rate_limit_users=10, rate_limit_window_s=0.5) as api:
        assert get(client, api, results=6).status_code == 200
        assert get(client, api, results=6).status_code == 200  # 6 < 10: allowed, overshoots
        refused = get(client, api, results=1)
        assert refused.status_code == 429
        assert refused.json()["error"].startswith(
            "Whoa, ease up there cowboy. You've requested 12 users"
        )
        time.sleep(0.6)  # the window resets
        assert get(client, api, results=1).status_code == 200
        assert [r.status for r in api.requests] == [200, 200, 429, 200]
        assert api.users_served == 13


def test_corrupt_breaks_the_next_user_response_only(
    api: FakeRandomUserAPI, client: httpx.Client
) -> None:
    api.corrupt(2, "missing_uuid")
    api.corrupt(1, "bad_date")
    api.push(Fault.status(503))  # a failed response does not use up the corruption
    assert get(client, api, results=5, seed="c").status_code == 503
    broken = get(client, api, results=5, seed="c").json()["results"]
    assert ["uuid" in u["login"] for u in broken] == [False, False, True, True, True]
    assert [u["dob"]["date"] for u in broken][:1] == ["not-a-date"]
    assert all(u["dob"]["date"] != "not-a-date" for u in broken[1:])
    clean = get(client, api, results=5, seed="c").json()["results"]
    assert all("uuid" in u["login"] and u["dob"]["date"] != "not-a-date" for u in clean)
    with pytest.raises(ValueError, match="unknown corruption"):
        api.corrupt(1, "garbage")
