"""The Random User API source over real HTTP against the local fake server."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from userstreamd.commands.cli import main
from userstreamd.config import load_config
from userstreamd.errors import BadResponse, SourceError, SourceUnavailable
from userstreamd.sources.randomuser import (
    MAX_PAGE,
    RandomUserSource,
    UserBudget,
    api_length,
    era_seed,
    page_params,
    retry_after_s,
)
from userstreamd.sources.synthetic import SyntheticSource, synthetic_user
from userstreamd.stream.records import parse_user

from ..fakeapi import FakeRandomUserAPI, Fault


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


async def test_each_request_reports_its_outcome_and_duration(fake_api: FakeRandomUserAPI) -> None:
    reported: list[tuple[str, float]] = []
    fake_api.push(Fault.status(503))
    fake_api.push(Fault.html())
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            source = _source(client, fake_api, on_request=lambda *r: reported.append(r))
            for _ in range(2):
                with pytest.raises(SourceError):
                    await source.fetch(1, 20)
            await source.fetch(1, 20)
    assert [outcome for outcome, _ in reported] == ["http_5xx", "not_json", "ok"]
    assert all(seconds >= 0 for _, seconds in reported)


def test_the_budget_says_what_remains_in_its_window() -> None:
    budget = UserBudget(100, 60.0)
    budget.spend(30, now=10.0)
    budget.spend(50, now=40.0)
    assert budget.remaining(45.0) == 20
    assert budget.remaining(75.0) == 50  # the first spend left the window
    assert budget.remaining(200.0) == 100


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


# -- the era/page-to-seed mapping ----------------------------------------------------------------


def _hashed(seed: str, page: int) -> str:
    """What the API's server code seeds its generator with."""
    return seed if page == 1 else f"{seed}{page}"


def test_the_api_hashes_seed_and_page_together() -> None:
    # Why the old mapping (S-1, S-2, ...) was wrong: era 1 page 23 was era 12 page 3.
    assert _hashed("S-1", 23) == _hashed("S-12", 3)
    assert _hashed(era_seed("S", 1), 23) != _hashed(era_seed("S", 12), 3)


@pytest.mark.parametrize(
    ("seed", "era", "sent"),
    [
        ("0123456789abcdef", 0, "0123456789abcdef"),  # era 0: the seed as always
        ("0123456789abcdef", 1, "0123456789abcdef-1~"),  # the default seed: 19, not 18
        ("0123456789abcde", 1, "0123456789abcde-1~~"),  # 18 with one "~": one more
        ("0123456789abcd", 12, "0123456789abcd-12~~"),
        ("0123456789abcd", 123, "0123456789abcd-123~"),
        ("😀" * 6 + "abc", 1, "😀" * 6 + "abc-1~~"),  # JavaScript counts UTF-16 units
    ],
)
def test_era_seeds(seed: str, era: int, sent: str) -> None:
    assert era_seed(seed, era) == sent
    assert api_length(sent) != 18


@pytest.mark.parametrize("seed", ["0123456789abcdef", "0123456789abcde", "s", ""])
def test_no_two_pages_of_the_first_eras_hash_alike(seed: str) -> None:
    hashed = {_hashed(*page_params(seed, i)) for i in range(21 * MAX_PAGE)}
    assert len(hashed) == 21 * MAX_PAGE
    assert all(api_length(page_params(seed, i * MAX_PAGE)[0]) != 18 for i in range(1, 1000))


@settings(max_examples=500, deadline=None)
@given(
    seed=st.text(max_size=24).filter(lambda s: api_length(s) != 18),
    eras=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
    pages=st.tuples(st.integers(0, MAX_PAGE - 1), st.integers(0, MAX_PAGE - 1)),
)
def test_property_no_18_character_seed_and_no_collision(
    seed: str, eras: tuple[int, int], pages: tuple[int, int]
) -> None:
    (era_a, era_b), (page_a, page_b) = eras, pages
    sent_a, number_a = page_params(seed, era_a * MAX_PAGE + page_a)
    sent_b, number_b = page_params(seed, era_b * MAX_PAGE + page_b)
    assert api_length(sent_a) != 18 and api_length(sent_b) != 18
    if (era_a, page_a) != (era_b, page_b):
        assert _hashed(sent_a, number_a) != _hashed(sent_b, number_b)


def test_an_18_character_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="nationality index"):
        RandomUserSource(
            httpx.AsyncClient(), "http://127.0.0.1:1/api/1.4/", seed="x" * 18, page_size=1
        )


def test_check_rejects_an_18_character_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[producer]\nseed = "0123456789abcdef-1"\n')
    assert main(["--config", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: producer.seed: expected any length but 18 characters" in err
    assert "nationality index" in err
    path.write_text('[producer]\nseed = "0123456789abcdef-1~"\n')
    assert load_config(path).producer.seed == "0123456789abcdef-1~"


@pytest.mark.parametrize(
    ("fallback", "then"),
    [("synthetic", "the synthetic fallback serves"), ("none", "the stream stops")],
)
def test_check_warns_when_the_rate_is_more_than_the_budget_allows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fallback: str, then: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[producer]\nrate_per_s = 400\nfallback = "{fallback}"\n')
    assert main(["--config", str(path), "check"]) == 0, "a warning, not an error"
    err = capsys.readouterr().err
    assert f"{path}: warning: producer.rate_per_s: 400 users/s is more than" in err
    assert "(randomuser.budget_users 20000 per budget_window_s 300 = 66.7 users/s)" in err
    assert f"spent 50 s into each window, then {then}" in err
    path.write_text("[producer]\nrate_per_s = 60\n")  # within the budget
    assert main(["--config", str(path), "check"]) == 0
    assert "warning" not in capsys.readouterr().err
    path.write_text('[producer]\nrate_per_s = 400\nsource = "synthetic"\n')  # no budget
    assert main(["--config", str(path), "check"]) == 0
    assert "warning" not in capsys.readouterr().err


# -- the budget counts what the API may have served ---------------------------------------------


async def test_requests_that_never_reached_the_api_spend_no_budget(
    fake_api: FakeRandomUserAPI,
) -> None:
    budget = UserBudget(40, 300.0)
    fake_api.push(Fault.status(429))  # refused before the API counts
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            source = _source(client, fake_api, budget=budget)
            with pytest.raises(SourceUnavailable, match="429"):
                await source.fetch(1, 20)
            fake_api.down()
            with pytest.raises(SourceUnavailable, match="connection failed: ConnectError"):
                await source.fetch(1, 20)
            fake_api.up()
            assert await source.ready_in_s() == 0
            assert len(await source.fetch(1, 20)) == 20
            assert len(await source.fetch(21, 20)) == 20
            assert await source.ready_in_s() > 290, "what the API served is counted"


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status(503),
        Fault.status(500),
        Fault.empty_results(),
        Fault.error_json("Uh oh"),
        Fault.html(),
        Fault.hang(3.0),  # sent, then no answer in time
    ],
)
async def test_a_request_that_may_have_reached_the_api_spends_its_whole_page(
    fake_api: FakeRandomUserAPI, fault: Fault
) -> None:
    budget = UserBudget(40, 300.0)
    fake_api.push(fault)
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=1.0) as client:
            source = _source(client, fake_api, budget=budget)
            with pytest.raises(SourceError):
                await source.fetch(1, 20)
            assert budget.remaining(trio.current_time()) == 20, "the page asked for is spent"
            assert len(await source.fetch(1, 20)) == 20
            assert await source.ready_in_s() > 290


# -- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = datetime(2026, 10, 21, 7, 28, tzinfo=UTC)
    assert retry_after_s("120", now) == 120
    assert retry_after_s("1.5", now) == 1.5
    assert retry_after_s("Wed, 21 Oct 2026 07:30:00 GMT", now) == 120
    assert retry_after_s("Wed, 21 Oct 2026 07:30:00 -0000", now) == 120
    assert retry_after_s("Wed, 21 Oct 2026 09:30:00 +0200", now) == 120
    assert retry_after_s("Wed, 21 Oct 2026 07:00:00 GMT", now) == 0, "past: at once"
    assert retry_after_s("-5", now) == 0
    for unreadable in (None, "", "soon", "inf", "nan", "Wed, 99 Oct 2026"):
        assert retry_after_s(unreadable, now) is None, unreadable


async def test_retry_after_as_an_http_date(fake_api: FakeRandomUserAPI) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    fake_api.push(Fault.status(429, retry_after=when))
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(SourceUnavailable) as caught:
                await _source(client, fake_api).fetch(1, 20)
    assert 100 < (caught.value.retry_after_s or 0) <= 120


# -- both sources select the same fields ----------------------------------------------------------


@pytest.mark.parametrize(
    ("inc", "exc"),
    [(["name", "email"], []), ([], ["picture", "location"]), (["name", "nat", "id"], ["nat"])],
)
async def test_both_sources_give_the_same_fields(
    fake_api: FakeRandomUserAPI, inc: list[str], exc: list[str]
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            api_users = await _source(client, fake_api, inc=inc, exc=exc).fetch(1, 20)
    synthetic_users = await SyntheticSource("s1", inc=inc, exc=exc).fetch(1, 20)
    shapes = {frozenset(u) for u in api_users}
    assert shapes == {frozenset(u) for u in synthetic_users}
    assert all("login" in shape for shape in shapes), "login.uuid is the key"
    assert api_users == synthetic_users  # the fake API serves the synthetic users
