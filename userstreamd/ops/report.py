"""The daemon in words: systemd's STATUS= line, the periodic ``daemon.stats`` log event
and the totals logged at the stop, each made from a `Status` snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from ..logs import get_logger, say_on_console
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
    fanout = {"fanout": status.fanout} if status.fanout.workers else {}
    return {
        "broadcaster": status.broadcaster,
        **fanout,  # (the workers' own edges: their token lockouts and peer faults)
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


def _stored(f: Mapping[str, Any]) -> str:
    return (
        f"PostgreSQL holds every seq through {f['committed_through']} "
        f"({f['committed']} committed since start, {f['rows_inserted']} of them new rows)"
    )


def _troubles(f: Mapping[str, Any]) -> list[str]:
    """What went wrong since the start, in words; nothing when nothing did."""
    said = []
    if f["invalid"]:
        said.append(f"{f['invalid']} invalid records set aside as dead letters")
    if failures := f["fetch_failures"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(failures.items()))
        said.append(f"source fetches failed: {kinds}")
    if f["backpressure_waits"]:
        said.append(f"the producer waited for the consumers {f['backpressure_waits']} times")
    return said


def stats_sentence(f: Mapping[str, Any]) -> str:
    """A ``daemon.stats`` event's fields as the console shows them: what each count is,
    in words (docs/operations.md has the glossary), instead of reprs side by side."""
    said = [
        f"stream at seq {f['users_streamed']} ({f['published']} published since start, "
        f"{f['rate_per_s']:.3g}/s, from {f['source'] or 'no source'}), "
        f"{f['active_clients']} clients",
        _stored(f),
    ]
    components = f["components"]
    unwell = [
        f"{name} {c['state']}"
        + (
            f" after {c['restarts']} restarts (last exit: {str(c['last_exit'])[:80]})"
            if c["restarts"]
            else ""
        )
        for name, c in components.items()
        if c["state"] != "running" or c["restarts"]
    ]
    running = sum(c["state"] == "running" for c in components.values())
    said.append(f"all {running} components running" if not unwell else ", ".join(unwell))
    said += _troubles(f)
    if (broadcaster := f.get("broadcaster")) is not None:
        edge = broadcaster.edge
        refused = sum(edge.refused.values())  # (turned away at the gate included)
        if refused:
            said.append(f"{refused} connections turned away")
        if edge.accept_errors:
            said.append(f"{edge.accept_errors} accept errors (descriptors short?)")
    return "; ".join(said)


def stopped_sentence(f: Mapping[str, Any]) -> str:
    """``daemon.stopped`` on the console."""
    said = [
        f"exit code {f['exit_code']}, stream at seq {f['last_seq']} "
        f"({f['published']} published since start)",
        _stored(f),
        *_troubles(f),
    ]
    return "; ".join(said)


async def log_stats(status: StatusFn, interval_s: float) -> None:
    """``daemon.stats`` every `interval_s`, until cancelled."""
    say_on_console("daemon.stats", stats_sentence)
    log = get_logger().bind(component="daemon")
    last_seq, last_time = status().counts.last_seq, trio.current_time()
    while True:
        await trio.sleep(interval_s)
        now, current = trio.current_time(), status()
        streamed = current.counts.last_seq
        rate = (streamed - last_seq) / (now - last_time)
        last_seq, last_time = streamed, now
        log.info("daemon.stats", **stats(current, rate))
