"""The one backoff policy: growth, cap, jitter bounds, reset (virtual clock)."""

from __future__ import annotations

import pytest
import trio

from userstreamd.backoff import Backoff


def test_delays_double_up_to_the_cap_with_equal_jitter() -> None:
    delays = Backoff(min_s=0.1, max_s=1.0).delays()
    ceilings = []
    for _ in range(8):
        ceiling = delays.ceiling_s
        wait = delays.next_s()
        assert ceiling / 2 <= wait <= ceiling
        ceilings.append(ceiling)
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert delays.attempts == 8


def test_reset_starts_over_at_the_minimum() -> None:
    delays = Backoff(min_s=0.5, max_s=8.0).delays()
    for _ in range(5):
        delays.next_s()
    delays.reset()
    assert delays.ceiling_s == 0.5
    assert delays.attempts == 0


def test_each_loop_has_its_own_state() -> None:
    policy = Backoff(min_s=0.1, max_s=1.0)
    first, second = policy.delays(), policy.delays()
    first.next_s()
    first.next_s()
    assert second.ceiling_s == 0.1


@pytest.mark.parametrize(("min_s", "max_s"), [(0, 1), (-1, 1), (2, 1)])
def test_a_policy_that_cannot_work_is_refused(min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="min_s <= max_s"):
        Backoff(min_s=min_s, max_s=max_s)


async def test_sleep_waits_the_drawn_delay(autojump_clock: trio.testing.MockClock) -> None:
    delays = Backoff(min_s=1.0, max_s=4.0).delays()
    start = trio.current_time()
    waited = [await delays.sleep() for _ in range(3)]
    assert trio.current_time() - start == pytest.approx(sum(waited))
    assert 0.5 <= waited[0] <= 1.0 and 1.0 <= waited[1] <= 2.0 and 2.0 <= waited[2] <= 4.0
