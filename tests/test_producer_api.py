"""The producer against the fake Random User API over real HTTP, misbehaving on cue."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
import trio

from userstreamd.produce.producer import Producer
from userstreamd.sources.randomuser import RandomUserSource, UserBudget, era_seed
from userstreamd.sources.synthetic import SyntheticSource, synthetic_page, synthetic_user
from userstreamd.stream.hub import Hub
from userstreamd.stream.records import parse_user

from .fakeapi import FakeRandomUserAPI, Fault


class Run:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.messages: list[dict[str, Any]] = []

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():  # noqa: ASYNC110 (bounded by the caller's fail_after)
            await trio.sleep(0.01)


@asynccontextmanager
async def producing(
    api: FakeRandomUserAPI,
    *,
    rate_per_s: float = 50,
    page_size: int = 10,
    timeout_s: float = 2.0,
    fallback: bool = False,
    budget: UserBudget | None = None,
    seed: str = "api",
    **kw: Any,
) -> AsyncIterator[Run]:
    hub = Hub("e")
    sub = hub.subscribe("test")
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        source = RandomUserSource(client, api.url, seed=seed, page_size=page_size, budget=budget)
        producer = Producer(
            hub,
            source,
            rate_per_s=rate_per_s,
            page_size=page_size,
            fallback=SyntheticSource(seed) if fallback else None,
            **kw,
        )
        run = Run(producer)

        async def collect() -> None:
            while True:
                run.messages.append(json.loads(await hub.next_frame(sub)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            await nursery.start(producer.run)
            yield run
            nursery.cancel_scope.cancel()


def _gaps(api: FakeRandomUserAPI) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(api.requests)]


async def test_every_trap_arrives_typed(fake_api: FakeRandomUserAPI) -> None:
    with trio.fail_after(30):
        async with producing(fake_api, rate_per_s=500, page_size=100) as run:
            await run.wait_until(lambda: len(run.messages) >= 300)
    users = [m["user"] for m in run.messages[:300]]
    assert [u["login"]["uuid"] for u in users] == [
        synthetic_user("api", p)["login"]["uuid"] for p in range(1, 301)
    ]
    parsed = [parse_user(u) for u in users]
    assert {type(u.location.postcode) for u in parsed if u.location} == {int, str}
    assert any(u.id and u.id.value is None for u in parsed)
    assert all(
        isinstance(u.latitude, float) and isinstance(u.dob.date, datetime) for u in parsed if u.dob
    )
    assert all("password" not in u["login"] for u in users)


@pytest.mark.parametrize("retry_after", [1.5, None])
async def test_429_waits_before_the_next_request(
    fake_api: FakeRandomUserAPI, retry_after: float | None
) -> None:
    """With Retry-After as long as it says; without (the API's own 429), a probe interval."""
    fake_api.push(Fault.status(429, retry_after=retry_after))
    with trio.fail_after(30):
        async with producing(fake_api, probe_interval_s=1.0) as run:
            await run.wait_until(lambda: len(run.messages) >= 20)
    assert fake_api.requests[0].status == 429
    gap = _gaps(fake_api)[0]
    assert gap >= (retry_after if retry_after is not None else 1.0)
    assert run.producer.statistics().failures_by_kind == {"http_429": 1}
    assert [m["seq"] for m in run.messages[:20]] == list(range(1, 21))


async def test_server_errors_timeouts_and_refusals_retry_with_growing_delays(
    fake_api: FakeRandomUserAPI,
) -> None:
    fake_api.push(
        Fault.status(500), Fault.status(502), Fault.status(503), Fault.status(504), Fault.hang(3)
    )
    with trio.fail_after(30):
        async with producing(fake_api, timeout_s=0.5, failures_before_fallback=100) as run:
            await run.wait_until(lambda: len(run.messages) >= 5)
            fake_api.down()
            await run.wait_until(lambda: run.producer.fetch_failures >= 7)
            fake_api.up()
            count = len(run.messages)
            await run.wait_until(lambda: len(run.messages) >= count + 30)
    kinds = run.producer.statistics().failures_by_kind
    assert kinds["http_5xx"] == 4 and kinds["timeout"] == 1 and kinds["connect"] >= 2
    gaps = _gaps(fake_api)[:4]
    # Each delay is at least the lower end of its jitter range, [d/2, d] with d doubling
    # from 0.1 s (a sleep never ends early; how much later it ends is the machine's).
    for n, gap in enumerate(gaps):
        assert gap >= 0.05 * 2**n, f"delays must grow: {gaps}"
    seqs = [m["seq"] for m in run.messages]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.parametrize(
    "fault",
    [
        Fault.empty_results(),
        Fault.html(),
        Fault.truncated(),
        Fault.error_json("Uh oh, something has gone wrong."),
    ],
)
async def test_200_without_users_is_a_failure_not_zero_users(
    fake_api: FakeRandomUserAPI, fault: Fault
) -> None:
    fake_api.push(fault, fault)
    with trio.fail_after(30):
        async with producing(fake_api) as run:
            await run.wait_until(lambda: len(run.messages) >= 15)
    assert run.producer.fetch_failures == 2
    # Nothing invented: the stream is exactly the API's users, positions 1, 2, ...
    assert [m["user"]["login"]["uuid"] for m in run.messages[:15]] == [
        synthetic_user("api", p)["login"]["uuid"] for p in range(1, 16)
    ]


async def test_budget_is_never_exceeded(fake_api: FakeRandomUserAPI) -> None:
    """Test scale: 100 users/s wanted, 1,000 users per 5 s allowed, 500 per request."""
    budget = UserBudget(1000, 5.0)
    with trio.fail_after(60):
        async with producing(fake_api, rate_per_s=100, page_size=500, budget=budget) as run:
            # The budget used, not just respected: over two windows' worth served.
            await run.wait_until(
                lambda: sum(r.users for r in fake_api.requests) >= 2000 and len(run.messages) >= 900
            )
    served = [(r.at, r.users) for r in fake_api.requests]
    assert sum(n for _, n in served) >= 2000, "the budget was used, not just respected"
    for start, _ in served:
        window = sum(n for at, n in served if start <= at < start + 5.0)
        assert window <= 1000, f"{window} users within 5 s from t={start}"
    assert len(run.messages) >= 900


async def test_fallback_flows_then_the_api_returns(fake_api: FakeRandomUserAPI) -> None:
    fake_api.down()
    with trio.fail_after(30):
        async with producing(
            fake_api, rate_per_s=50, fallback=True, failures_before_fallback=2, probe_interval_s=1.0
        ) as run:
            await run.wait_until(lambda: any(m["source"] == "synthetic" for m in run.messages))
            # At the second failure (not after a probe's wait, nor more failures).
            assert run.producer.statistics().fetch_failures == 2
            assert run.producer.statistics().fallback_active
            fake_api.up()
            await run.wait_until(lambda: run.messages[-1]["source"] == "randomuser")
            assert not run.producer.statistics().fallback_active
    seqs = [m["seq"] for m in run.messages]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_the_stream_crosses_page_10000_and_keeps_the_api(
    fake_api: FakeRandomUserAPI,
) -> None:
    """One user per page from just before page 10,000: past it the seed changes era, and no
    seed the API would read as seed + nationality index (18 characters) is ever sent."""
    seed = "0123456789abcdef"  # the daemon's default: a 16-hex epoch
    with trio.fail_after(60):
        async with producing(
            fake_api, seed=seed, rate_per_s=100, page_size=1, fallback=True, start_position=9_990
        ) as run:
            await run.wait_until(lambda: len(run.messages) >= 30)
    seeds = [r.params["seed"] for r in fake_api.requests]
    assert all(len(s) != 18 for s in seeds), sorted(set(seeds))
    assert all(r.status == 200 for r in fake_api.requests)
    assert run.producer.fetch_failures == 0
    messages = run.messages[:30]
    assert [m["position"] for m in messages] == list(range(9_990, 10_020))
    assert {m["source"] for m in messages} == {"randomuser"}
    # Each user is the API's user for the (seed, page) the mapping names.
    assert [m["user"]["login"]["uuid"] for m in messages] == [
        synthetic_page(era_seed(seed, (p - 1) // 10_000), (p - 1) % 10_000 + 1, 1)[0]["login"][
            "uuid"
        ]
        for p in range(9_990, 10_020)
    ]
    assert {r.params["page"] for r in fake_api.requests} >= {"10000", "1", "19"}


async def test_a_probe_waiting_for_the_budget_never_stops_the_fallback(
    fake_api: FakeRandomUserAPI,
) -> None:
    """Two unreadable 200s (HTML from a proxy, which the API may have counted) spend the
    whole budget; the probes that follow must not hold up the fallback stream."""
    fake_api.push(Fault.html(), Fault.html())
    budget = UserBudget(20, 300.0)
    with trio.fail_after(30):
        async with producing(
            fake_api,
            budget=budget,
            fallback=True,
            failures_before_fallback=2,
            probe_interval_s=0.2,
        ) as run:
            await run.wait_until(lambda: len(run.messages) >= 100)
            assert run.producer.statistics().fallback_active
    assert {m["source"] for m in run.messages} == {"synthetic"}
    assert len(fake_api.requests) == 2, "no request beyond the budget"
