"""Which seeds the Random User API can be sent unchanged (no I/O: the config checks
them too)."""

from __future__ import annotations

NAT_SEED_LENGTH = 18  # the API reads such a seed as 16 characters + a nationality index


def api_length(text: str) -> int:
    """The length of `text` as the API's JavaScript counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le", errors="surrogatepass")) // 2


def reserved_seed_reason(seed: str) -> str | None:
    """Why the API cannot be sent `seed` unchanged, or None when it can."""
    if api_length(seed) != NAT_SEED_LENGTH:
        return None
    return (
        f"the API reads an {NAT_SEED_LENGTH}-character seed as a 16-character seed plus a"
        " 2-hex-digit nationality index, and its server fails on most of them"
    )
