"""The daemon in words: systemd's STATUS= line, the periodic ``daemon.stats`` log event
and the totals logged at the stop, each made from a `Status` snapshot."""

from __future__ import annotations

from typing import Any

import trio

from ..logs import get_logger
from .health import readiness
from .status import Status, StatusFn


def summary_line(status: Status) -> str:
    """The one-line summary systemd shows (STATUS=): what /readyz says is wrong, if
    anything, then the stream."""
    producer = status.producer
    source = producer.active_source if producer else "-"
    rate = producer.rate_per_s if producer else 0
    clients = status.feed.clients if status.feed else 0
    summary = (
        f"{status.counts.last_seq} users streamed at {rate:g}/s from {source}, "
        f"{clients} clients, committed through seq {status.committed_through}"
    )
    problems = readiness(status).problems
    if not problems:
        return summary
    return "not ready: " + ", ".join(f"{k}: {v}" for k, v in problems.items()) + "; " + summary


def totals(status: Status) -> dict[str, Any]:
    """What the stream has done since the daemon started."""
    producer, counts = status.producer, status.counts
    return {
        "published": producer.published if producer else 0,
        "invalid": producer.invalid if producer else 0,
        "fetch_failures": dict(producer.failures_by_kind) if producer else {},
        "backpressure_waits": producer.backpressure_waits if producer else 0,
        "last_seq": counts.last_seq,
        "committed_through": status.committed_through,
        "committed": counts.committed_total,  # by every consumer, process or not
        "rows_inserted": status.rows_inserted,
    }


def stats(status: Status, rate_per_s: float) -> dict[str, Any]:
    """The fields of one ``daemon.stats`` event."""
    return {
        "broadcaster": status.broadcaster,
        "users_streamed": status.counts.last_seq,
        "rate_per_s": round(rate_per_s, 2),
        "active_clients": status.feed.clients if status.feed else 0,
        "source": status.producer.active_source if status.producer else None,
        "components": {
            c.name: {"state": c.state, "restarts": c.restarts, "last_exit": c.last_exit}
            for c in status.components
        },
        **totals(status),
    }


async def log_stats(status: StatusFn, interval_s: float) -> None:
    """``daemon.stats`` every `interval_s`, until cancelled."""
    log = get_logger().bind(component="daemon")
    last_seq, last_time = status().counts.last_seq, trio.current_time()
    while True:
        await trio.sleep(interval_s)
        now, current = trio.current_time(), status()
        streamed = current.counts.last_seq
        rate = (streamed - last_seq) / (now - last_time)
        last_seq, last_time = streamed, now
        log.info("daemon.stats", **stats(current, rate))
