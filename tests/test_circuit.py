"""The producer's circuit: backoff, opening, probes and 429s, on trio's autojump clock.

The unit tests drive a `Circuit` the way the fetcher does (fail, sleep until `retry_at`,
try again); the producer tests check what a stream looks like around a 429 without
``Retry-After``, the Random User API's own answer when its rate limit is spent.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import trio
import trio.testing

from userstreamd.errors import SourceUnavailable
from userstreamd.produce.producer import MAX_RETRY_AFTER_S, Circuit, Producer
from userstreamd.sources.synthetic import SyntheticSource
from userstreamd.stream.hub import Hub

from .test_producer import ScriptedSource


def _circuit(*, fallback: bool, failures_to_open: int = 3) -> Circuit:
    return Circuit(
        failures_to_open=failures_to_open, probe_interval_s=30, retry_max_s=2, fallback=fallback
    )


async def _fail(
    circuit: Circuit, *, retry_after_s: float | None = None, rate_limited: bool = False
) -> float:
    """One failed attempt at the primary, as the fetcher makes it: at `retry_at`."""
    await trio.sleep_until(max(circuit.retry_at, trio.current_time()))
    return circuit.failed(
        trio.current_time(), retry_after_s=retry_after_s, rate_limited=rate_limited
    )


async def test_closed_delays_grow_with_jitter_up_to_the_cap(autojump_clock: trio.abc.Clock) -> None:
    circuit = _circuit(fallback=False, failures_to_open=100)
    waits = [await _fail(circuit) for _ in range(8)]
    for wait, base in zip(waits, [0.1, 0.2, 0.4, 0.8, 1.6, 2, 2, 2], strict=True):
        assert base / 2 <= wait <= base
    assert not circuit.is_open
    assert circuit.retry_at == pytest.approx(trio.current_time() + waits[-1])


async def test_opens_after_failures_in_a_row_and_a_success_closes_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    circuit = _circuit(fallback=True)
    assert await _fail(circuit) <= 0.1 and await _fail(circuit) <= 0.2
    assert not circuit.is_open
    assert await _fail(circuit) == 30, "open: the next try is a probe, an interval later"
    assert circuit.is_open and circuit.failures == 3
    assert await _fail(circuit) == 30, "a failed probe waits another interval"
    assert circuit.succeeded() is True
    assert (circuit.is_open, circuit.failures, circuit.retry_at) == (False, 0, float("-inf"))
    assert circuit.succeeded() is False
    assert await _fail(circuit) <= 0.1, "the backoff starts over"


async def test_429_without_retry_after_opens_at_once_and_waits_a_probe_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    for fallback in (True, False):
        circuit = _circuit(fallback=fallback)
        assert await _fail(circuit, rate_limited=True) == 30
        assert circuit.is_open and circuit.failures == 1


async def test_retry_after_is_honoured(autojump_clock: trio.abc.Clock) -> None:
    circuit = _circuit(fallback=True)
    assert await _fail(circuit, retry_after_s=7, rate_limited=True) == 7
    assert not circuit.is_open, "the server said when: no reason to give up on it"
    await _fail(circuit)
    assert await _fail(circuit, retry_after_s=7) == 30, "open: probes keep their interval"
    assert await _fail(circuit, retry_after_s=70) == 70, "and wait longer when asked"
    closed = _circuit(fallback=False)
    await _fail(closed)
    await _fail(closed)
    assert await _fail(closed, retry_after_s=7) == 7, "no fallback: no reason to wait longer"


async def test_postpone_never_brings_a_probe_forward(autojump_clock: trio.abc.Clock) -> None:
    circuit = _circuit(fallback=True, failures_to_open=1)
    await _fail(circuit)
    now = trio.current_time()
    circuit.postpone(now + 100)
    assert circuit.retry_at == now + 100
    circuit.postpone(now + 5)
    assert circuit.retry_at == now + 100


# -- the producer around a 429 without Retry-After -------------------------------------------


async def test_a_huge_retry_after_is_capped_and_the_fallback_serves_meanwhile(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A careless or hostile server asking for 10^9 s must not stall the stream."""
    circuit = _circuit(fallback=True, failures_to_open=100)
    assert await _fail(circuit, retry_after_s=1e9) == MAX_RETRY_AFTER_S
    assert circuit.is_open, "longer than a probe interval: the fallback serves meanwhile"
    closed = _circuit(fallback=False, failures_to_open=100)
    assert await _fail(closed, retry_after_s=1e9) == MAX_RETRY_AFTER_S


async def _stream(producer: Producer, seconds: float) -> list[tuple[float, dict[str, Any]]]:
    got: list[tuple[float, dict[str, Any]]] = []
    sub = producer.hub.subscribe("test")

    async def collect() -> None:
        while True:
            frame = await producer.hub.next_frame(sub)
            got.append((trio.current_time(), json.loads(frame)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        await nursery.start(producer.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return got


def _rate_limited() -> SourceUnavailable:
    return SourceUnavailable("HTTP 429 rate limited", kind="http_429")


async def test_429_switches_to_the_fallback_at_once_and_probes_an_interval_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([_rate_limited(), _rate_limited(), None])
    producer = Producer(
        Hub("e"),
        primary,
        rate_per_s=10,
        page_size=10,
        fallback=SyntheticSource("fb"),
        probe_interval_s=10,
    )
    got = await _stream(producer, 25)
    assert primary.calls[:3] == pytest.approx([0, 10, 20], abs=0.01), "no 0.1 s retry steps"
    first = got[0]
    assert first[1]["source"] == "synthetic" and first[0] < 0.2, "the fallback took over at once"
    assert got[-1][1]["source"] == "randomuser"
    assert [m["seq"] for _, m in got] == list(range(1, len(got) + 1))


async def test_429_without_a_fallback_waits_a_probe_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    primary = ScriptedSource([_rate_limited(), None])
    producer = Producer(Hub("e"), primary, rate_per_s=10, page_size=10, probe_interval_s=10)
    got = await _stream(producer, 12)
    assert primary.calls[:2] == pytest.approx([0, 10], abs=0.01)
    assert got and got[0][0] >= 10 and {m["source"] for _, m in got} == {"randomuser"}
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(got)]
    assert gaps == pytest.approx([0.1] * len(gaps)), "paced, no burst for the time it waited"
    assert not producer.statistics().circuit_open
