"""The one backoff: capped exponential delays with equal jitter, for every retry loop.

A `Backoff` is the policy (frozen, shareable, read from config); `Backoff.delays()` makes
the state of one loop. Each `Delays.next_s()` is drawn from ``[d/2, d]`` (equal jitter,
so delays still grow while callers never retry in step), then ``d`` doubles up to
`max_s`. A loop calls `Delays.reset` when an attempt made progress (a connection that
carried users, a component that ran for a while), so one blip is not paid for at the
longest delay. `Delays.sleep` does both halves of a retry: draws and sleeps.

A call retried until it succeeds (a database write, `store.calls`) uses stamina, which
fits that case (exponential delays with jitter, the attempt logged by the caller); the
loops here need more than stamina gives: a reset on progress, the next delay known
before the sleep (to log it), and no end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Backoff:
    """Delays start at `min_s` and double up to `max_s`."""

    min_s: float = 0.1
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.min_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {self.min_s}, {self.max_s}")

    def delays(self) -> Delays:
        return Delays(self)


class Delays:
    """The delays of one retry loop (not shared between tasks)."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.attempts = 0  # since the last reset
        self._ceiling_s = policy.min_s

    @property
    def ceiling_s(self) -> float:
        """The largest delay the next `next_s` can draw (what a log may announce)."""
        return self._ceiling_s

    def next_s(self) -> float:
        wait = self._ceiling_s * random.uniform(0.5, 1.0)
        self._ceiling_s = min(self.policy.max_s, self._ceiling_s * 2)
        self.attempts += 1
        return wait

    def reset(self) -> None:
        self._ceiling_s = self.policy.min_s
        self.attempts = 0

    async def sleep(self) -> float:
        """Wait the next delay; return it."""
        wait = self.next_s()
        await trio.sleep(wait)
        return wait
