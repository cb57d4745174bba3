"""A hub that mirrors a stream kept elsewhere (a fan-out worker's copy of the daemon's,
a broadcaster's copy of a JetStream stream): the same bounds as the broadcaster's own."""

from __future__ import annotations

from ..config import BroadcasterConfig
from .hub import Hub


def mirror_hub(settings: BroadcasterConfig, epoch: str, first_seq: int) -> Hub:
    """The stream from `first_seq` on, held to the broadcaster's buffer and lag bounds."""
    return Hub(
        epoch,
        first_seq=first_seq,
        buffer_messages=settings.buffer_messages,
        buffer_bytes=settings.buffer_bytes,
        client_lag_max=settings.client_lag_max,
    )
