"""Who may connect to a broadcaster, from the config: the admission `Policy`."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config
from .admission import Policy
from .auth import Tokens


def admission_policy(config: Config, tokens: Tokens, page_origins: Sequence[str] = ()) -> Policy:
    """Who may connect; the live page's own origins (`page_origins`) may too."""
    b = config.broadcaster
    return Policy(
        tokens,
        own_group=config.consumers.group,
        groups=frozenset(b.groups),
        allow_ad_hoc_groups=b.allow_ad_hoc_groups,
        allowed_origins=frozenset(o.lower() for o in [*b.allowed_origins, *page_origins]),
        default_window=config.consumers.window,
    )
