"""The Random User API (https://randomuser.me/api/1.4/) as a replayable source.

Position p of a stream with seed S is user ``(p - 1) % page_size`` of page
``(p - 1) // page_size + 1`` for seed S: the API returns the same users for the same
seed, page and parameters, so any position can be fetched again. Pages run 1..10000;
past that the seed gets a suffix (``S-1``, ``S-2``, ...).

Every failure is mapped to `SourceUnavailable` (transport, timeout, 429, 5xx) or
`BadResponse` (200 without users: empty results, HTML, truncated JSON, ``{"error": ...}``).
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from ..errors import BadResponse, SourceUnavailable

MAX_RESULTS = 5000
MAX_PAGE = 10_000


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class RandomUserSource:
    name = "randomuser"

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        seed: str,
        page_size: int,
        nats: list[str] | tuple[str, ...] = (),
    ) -> None:
        if not 1 <= page_size <= MAX_RESULTS:
            raise ValueError(f"page_size must be 1..{MAX_RESULTS}, got {page_size}")
        self.page_size = page_size
        self._client = client
        self._url = url
        self._seed = seed
        self._nat = ",".join(n.upper() for n in nats)
        self.requests = 0

    def _params(self, page_index: int) -> dict[str, str | int]:
        era, page = divmod(page_index, MAX_PAGE)
        params: dict[str, str | int] = {
            "results": self.page_size,
            "page": page + 1,
            "seed": self._seed if era == 0 else f"{self._seed}-{era}",
        }
        if self._nat:
            params["nat"] = self._nat
        return params

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        """Users at positions start..start+count-1 (within one page)."""
        page_index, offset = divmod(start - 1, self.page_size)
        if offset + count > self.page_size:
            raise ValueError("a fetch must stay within one page")
        self.requests += 1
        try:
            response = await self._client.get(self._url, params=self._params(page_index))
        except httpx.TimeoutException as exc:
            raise SourceUnavailable(f"timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise SourceUnavailable(f"connection failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 429:
            raise SourceUnavailable("HTTP 429 rate limited", retry_after_s=_retry_after(response))
        if response.status_code >= 500:
            raise SourceUnavailable(
                f"HTTP {response.status_code}", retry_after_s=_retry_after(response)
            )
        if response.status_code != 200:
            raise BadResponse(f"HTTP {response.status_code}")
        try:
            body = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            kind = response.headers.get("content-type", "?").split(";")[0]
            raise BadResponse(f"body is not JSON ({kind}, {len(response.content)} bytes)") from None
        if not isinstance(body, dict):
            raise BadResponse("body is not a JSON object")
        if "error" in body:
            raise BadResponse(f"API error: {str(body['error'])[:200]}")
        results = body.get("results")
        if not isinstance(results, list) or not results:
            raise BadResponse("no users in results")
        if len(results) < offset + count:
            raise BadResponse(f"asked for {self.page_size} users, got {len(results)}")
        return results[offset : offset + count]
