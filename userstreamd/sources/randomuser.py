"""The Random User API (https://randomuser.me/api/1.4/) as a replayable source.

Position p of a stream with seed S is user ``(p - 1) % page_size`` of page
``(p - 1) // page_size + 1`` for seed S: the API returns the same users for the same
seed, page and parameters, so any position can be fetched again. Pages run 1..10000;
past that the seed gets a suffix (``S-1``, ``S-2``, ...).

Every failure is mapped to `SourceUnavailable` (transport, timeout, 429, 5xx) or
`BadResponse` (200 without users: empty results, HTML, truncated JSON, ``{"error": ...}``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
import trio

from ..errors import BadResponse, SourceUnavailable
from ..logs import get_logger

MAX_RESULTS = 5000
MAX_PAGE = 10_000


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class UserBudget:
    """At most `limit` users requested in any `window_s` seconds: the API rate-limits users,
    not requests (20,000 per 5 minutes in its server code), then answers 429."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self._spent: deque[tuple[float, int]] = deque()
        self._total = 0

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

    def spend(self, users: int, now: float) -> None:
        self._spent.append((now, users))
        self._total += users

    async def acquire(self, users: int) -> None:
        """Wait until `users` fit in the window, then spend them."""
        while (delay := self.delay_for(users, trio.current_time())) > 0:
            get_logger().info(
                "producer.budget_wait",
                users=users,
                wait_s=round(delay, 3),
                budget=self.limit,
                window_s=self.window_s,
            )
            await trio.sleep(delay)
        self.spend(users, trio.current_time())


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
    ) -> None:
        if not 1 <= page_size <= MAX_RESULTS:
            raise ValueError(f"page_size must be 1..{MAX_RESULTS}, got {page_size}")
        if "login" in exc:
            raise ValueError("login cannot be excluded: login.uuid is the key")
        self.page_size = page_size
        self._client = client
        self._url = url
        self._seed = seed
        self._fixed: dict[str, str] = {}
        if nats:
            self._fixed["nat"] = ",".join(n.upper() for n in nats)
        if inc:  # login (hence login.uuid) is always asked for
            self._fixed["inc"] = ",".join(dict.fromkeys([*inc, "login"]))
        if exc:
            self._fixed["exc"] = ",".join(exc)
        self._budget = budget
        self.requests = 0

    def _params(self, page_index: int) -> dict[str, str | int]:
        era, page = divmod(page_index, MAX_PAGE)
        params: dict[str, str | int] = {
            "results": self.page_size,
            "page": page + 1,
            "seed": self._seed if era == 0 else f"{self._seed}-{era}",
        }
        params.update(self._fixed)
        return params

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        """Users at positions start..start+count-1, stopping early at the end of the page
        that holds `start` (a resumed stream need not start on a page boundary)."""
        page_index, offset = divmod(start - 1, self.page_size)
        count = min(count, self.page_size - offset)
        if self._budget is not None:
            await self._budget.acquire(self.page_size)
        self.requests += 1
        try:
            response = await self._client.get(self._url, params=self._params(page_index))
        except httpx.TimeoutException as exc:
            raise SourceUnavailable(f"timeout: {type(exc).__name__}", kind="timeout") from exc
        except httpx.TransportError as exc:
            raise SourceUnavailable(
                f"connection failed: {type(exc).__name__}: {exc}", kind="connect"
            ) from exc
        if response.status_code == 429:
            raise SourceUnavailable(
                "HTTP 429 rate limited", kind="http_429", retry_after_s=_retry_after(response)
            )
        if response.status_code >= 500:
            raise SourceUnavailable(
                f"HTTP {response.status_code}",
                kind="http_5xx",
                retry_after_s=_retry_after(response),
            )
        if response.status_code != 200:
            raise BadResponse(f"HTTP {response.status_code}", kind="http_other")
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
        if len(results) < offset + count:
            raise BadResponse(
                f"asked for {self.page_size} users, got {len(results)}", kind="short_page"
            )
        return results[offset : offset + count]
