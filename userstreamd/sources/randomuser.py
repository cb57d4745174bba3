"""The Random User API (https://randomuser.me/api/1.4/) as a replayable source.

Position p of a stream with seed S is user ``(p - 1) % page_size`` of page index
``(p - 1) // page_size``: the API returns the same users for the same seed, page and
parameters, so any position can be fetched again.

Pages run 1..10000, so page index i is sent as page ``i % 10000 + 1`` of *era*
``i // 10000``, and each era has a seed of its own (`era_seed`):

- era 0 sends S itself (the seed streams have always used);
- era e >= 1 sends ``S-e~``, and ``S-e~~`` when ``S-e~`` would be 18 characters long.

Two rules of the API's server code shape this. It seeds its generator with the string
``seed + str(page)`` (page 1: the seed alone), so two (seed, page) pairs whose strings are
equal give the same users (``ab1`` page 23 is ``ab12`` page 3); and it reads a seed of
exactly 18 characters (counted in UTF-16 units, as JavaScript does) as 16 characters plus a
2-hex-digit nationality index, and throws on an index outside its list. With the mapping,
every string the API hashes is S, then either digits (era 0) or ``-``, the era's digits and
``~`` (one or two): the ``~`` ends the era's digits, so the page digits after it cannot be
confused with them, and no two (era, page) pairs hash the same string. No era >= 1 sends 18
characters; S itself must not have 18 (`reserved_seed_reason`; ``userstreamd check``
rejects it).

Every failure is mapped to `SourceUnavailable` (transport, timeout, 429, 5xx) or
`BadResponse` (200 without users: empty results, HTML, truncated JSON, ``{"error": ...}``).

The API counts the users it serves (per client IP and window, and a restart of this daemon
does not reset it), so `UserBudget` counts every request that may have reached it: the
users a 200 brought, and the full page asked for when the request was sent but failed (a
timeout while reading, a reset connection, a 5xx, a 200 without users) - the server may have
generated and counted it. Only a request that provably never reached it is free: a refused
or failed connection, a DNS failure (`NOT_SENT`), and a 429 (the API checks its limit before
counting). The count can be kept in a `Ledger` (PostgreSQL, see ``store/ledger.py``) that
outlives a restart.
"""

from __future__ import annotations

import email.utils
import math
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import msgspec
import trio

from ..errors import BadResponse, SourceError, SourceUnavailable
from ..logs import get_logger
from .fields import keyed_selection
from .seeds import NAT_SEED_LENGTH, api_length, reserved_seed_reason

MAX_RESULTS = 5000
MAX_PAGE = 10_000
# Failures of a request that provably never reached the API (no connection, no name, no
# free connection in the pool): they cost no budget. Any other failure may have (it was
# sent), and costs the full page asked for.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def era_seed(seed: str, era: int) -> str:
    """The seed sent for pages of `era` (see the module docstring)."""
    if era == 0:
        return seed
    mapped = f"{seed}-{era}~"
    return mapped + "~" if api_length(mapped) == NAT_SEED_LENGTH else mapped


def page_params(seed: str, page_index: int) -> tuple[str, int]:
    """(seed, page) to send for the 0-based `page_index` of a stream with `seed`."""
    era, page = divmod(page_index, MAX_PAGE)
    return era_seed(seed, era), page + 1


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for: delay-seconds or an HTTP date (None when
    absent or unreadable)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class Ledger(Protocol):
    """Where spent budget outlives the process (`userstreamd.store.ledger.BudgetLedger`)."""

    async def load(self, window_s: float) -> list[tuple[float, int]]:
        """(seconds ago, users) of every spend in the last `window_s` seconds, oldest first."""
        ...

    async def record(self, users: int) -> None:
        """Keep one spend of `users` now; never raises for a database failure."""
        ...


class UserBudget:
    """At most `limit` users served in any `window_s` seconds: the API rate-limits users,
    not requests (20,000 per 5 minutes in its server code), then answers 429. What the API
    may have served is counted (see the module docstring); with a `ledger`, also what was
    spent before a restart."""

    def __init__(self, limit: int, window_s: float, *, ledger: Ledger | None = None) -> None:
        self.limit, self.window_s = limit, window_s
        self._spent: deque[tuple[float, int]] = deque()
        self._total = 0
        self._ledger = ledger
        self._loaded = ledger is None

    async def load(self) -> None:
        """Count the ledger's spends inside the window (once; before the first request)."""
        if self._loaded or self._ledger is None:
            return
        self._loaded = True
        now = trio.current_time()
        for age_s, users in await self._ledger.load(self.window_s):
            self.spend(users, now - age_s)
        if self._total:
            get_logger().info("producer.budget_restored", users=self._total, budget=self.limit)

    def delay_for(self, users: int, now: float) -> float:
        """Seconds until `users` more fit in the window (0 if they fit now)."""
        if users > self.limit:
            raise ValueError(f"{users} users can never fit a budget of {self.limit}")
        while self._spent and self._spent[0][0] <= now - self.window_s:
            self._total -= self._spent.popleft()[1]
        over = self._total + users - self.limit
        if over <= 0:
            return 0.0
        freed = 0
        for at, spent in self._spent:
            freed += spent
            if freed >= over:
                return at + self.window_s - now
        raise AssertionError("unreachable: users <= limit")

    def remaining(self, now: float) -> int:
        """Users the API may still serve in the window ending `now`."""
        self.delay_for(0, now)  # (forgets the spends that left the window)
        return max(0, self.limit - self._total)

    def spend(self, users: int, now: float) -> None:
        """Count `users` spent at `now` (in memory only)."""
        self._spent.append((now, users))
        self._total += users

    async def wait_for_room(self, users: int) -> None:
        """Return once `users` more fit in the window (spends nothing). The producer
        asks `RandomUserSource.ready_in_s` first and says why it waits; this is the last
        guard."""
        await self.load()
        while (delay := self.delay_for(users, trio.current_time())) > 0:
            get_logger().debug(
                "producer.budget_guard_wait",
                users=users,
                wait_s=round(delay, 3),
                budget=self.limit,
                window_s=self.window_s,
            )
            await trio.sleep(delay)

    async def record(self, users: int) -> None:
        """The API served `users`: count them, and keep them in the ledger (bounded wait)."""
        self.spend(users, trio.current_time())
        if self._ledger is not None:
            await self._ledger.record(users)


def _users(response: httpx.Response) -> list[Any]:
    """The users of a 200 response; BadResponse when it holds none."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        kind = response.headers.get("content-type", "?").split(";")[0]
        raise BadResponse(
            f"body is not JSON ({kind}, {len(response.content)} bytes)", kind="not_json"
        ) from None
    if not isinstance(body, dict):
        raise BadResponse("body is not a JSON object", kind="not_json")
    if "error" in body:
        raise BadResponse(f"API error: {str(body['error'])[:200]}", kind="api_error")
    results = body.get("results")
    if not isinstance(results, list) or not results:
        raise BadResponse("no users in results", kind="empty_results")
    return results


class RandomUserSource:
    name = "randomuser"

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        seed: str,
        page_size: int,
        nats: Sequence[str] = (),
        inc: Sequence[str] = (),
        exc: Sequence[str] = (),
        budget: UserBudget | None = None,
        on_request: Callable[[str, float], None] | None = None,
    ) -> None:
        """`on_request` gets each request's outcome ("ok" or the failure's kind) and
        its seconds."""
        if not 1 <= page_size <= MAX_RESULTS:
            raise ValueError(f"page_size must be 1..{MAX_RESULTS}, got {page_size}")
        if (reason := reserved_seed_reason(seed)) is not None:
            raise ValueError(f"seed {seed!r} cannot be used: {reason}")
        inc, exc = keyed_selection(inc, exc)
        self.page_size = page_size
        self._client = client
        self._url = url
        self._seed = seed
        self._fixed: dict[str, str] = {}
        if nats:
            self._fixed["nat"] = ",".join(n.upper() for n in nats)
        if inc:
            self._fixed["inc"] = ",".join(inc)
        if exc:
            self._fixed["exc"] = ",".join(exc)
        self.budget = budget
        self.on_request = on_request
        self.requests = 0

    def _params(self, page_index: int) -> dict[str, str | int]:
        seed, page = page_params(self._seed, page_index)
        params: dict[str, str | int] = {"results": self.page_size, "page": page, "seed": seed}
        params.update(self._fixed)
        return params

    async def ready_in_s(self) -> float:
        """Seconds until a request fits the budget (0: now); the first call reads the
        ledger (what was spent before a restart)."""
        if self.budget is None:
            return 0.0
        await self.budget.load()
        return self.budget.delay_for(self.page_size, trio.current_time())

    async def _served(self, users: int) -> None:
        if self.budget is not None and users:
            await self.budget.record(users)

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        """Users at positions start..start+count-1, stopping early at the end of the page
        that holds `start` (a resumed stream need not start on a page boundary)."""
        page_index, offset = divmod(start - 1, self.page_size)
        count = min(count, self.page_size - offset)
        if self.budget is not None:
            await self.budget.wait_for_room(self.page_size)
        self.requests += 1
        started = trio.current_time()
        try:
            users = await self._request(page_index, offset, count)
        except SourceError as exc:
            self._report(exc.kind, started)
            raise
        self._report("ok", started)
        return users

    def _report(self, outcome: str, started: float) -> None:
        if self.on_request is not None:
            self.on_request(outcome, trio.current_time() - started)

    async def _request(self, page_index: int, offset: int, count: int) -> list[dict[str, Any]]:
        try:
            response = await self._client.get(self._url, params=self._params(page_index))
        except httpx.TransportError as exc:
            if not isinstance(exc, NOT_SENT):  # sent, no answer: the API may have counted
                await self._served(self.page_size)
            if isinstance(exc, httpx.TimeoutException):
                raise SourceUnavailable(f"timeout: {type(exc).__name__}", kind="timeout") from exc
            raise SourceUnavailable(
                f"connection failed: {type(exc).__name__}: {exc}", kind="connect"
            ) from exc
        retry_after = retry_after_s(response.headers.get("retry-after"))
        if response.status_code == 429:  # refused before counting: free
            raise SourceUnavailable(
                "HTTP 429 rate limited", kind="http_429", retry_after_s=retry_after
            )
        try:
            if response.status_code >= 500:
                raise SourceUnavailable(
                    f"HTTP {response.status_code}", kind="http_5xx", retry_after_s=retry_after
                )
            if response.status_code != 200:
                raise BadResponse(f"HTTP {response.status_code}", kind="http_other")
            results = _users(response)
        except SourceError:  # it reached the API, which may have counted a full page
            await self._served(self.page_size)
            raise
        await self._served(len(results))
        if len(results) < offset + count:
            raise BadResponse(
                f"asked for {self.page_size} users, got {len(results)}", kind="short_page"
            )
        return results[offset : offset + count]
