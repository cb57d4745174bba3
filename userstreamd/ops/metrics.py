"""The daemon's metrics, in Prometheus' format (prometheus-client), every name prefixed
``userstreamd_``.

Durations and sizes are histograms, observed as they happen. Every count and state is
read from the daemon's `Status` snapshot when ``/metrics`` is scraped (`StatusCollector`):
the hot paths keep plain integers, and nothing is counted twice. The consumers, in-process or child
processes, report through their acks (`protocol.Batch`, ``rejected``) and the hub counts
each stream seq once, so a worker killed and restarted loses nothing from the counts:
``userstreamd_users_committed_total`` is the number of users the consumer group has
committed since this daemon started, whoever committed them. Like every counter it
starts at 0 with the daemon (``rate()`` it); ``userstreamd_stream_committed_seq`` is
where the stream stands, kept across restarts (the group's checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..produce.producer import ProducerStatistics
from ..serve.replayer import ReplayStatistics
from ..stream.protocol import Batch
from .health import readiness
from .server import OpsPortStatistics
from .status import Status, StatusFn

PREFIX = "userstreamd_"
STATES = ("starting", "running", "backoff", "stopping", "stopped", "failed")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)


class Metrics:
    """One daemon's registry: the histograms, and whatever `watch` adds."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_requests = Counter(
            f"{PREFIX}api_requests",
            "Requests to the Random User API, by outcome (ok, or the failure's kind)",
            ["outcome"],
            registry=r,
        )
        self.api_request_seconds = Histogram(
            f"{PREFIX}api_request_duration_seconds",
            "Duration of requests to the Random User API, by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}consumer_batch_size",
            "Rows per batch the consumers committed",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            f"{PREFIX}consumer_commit_duration_seconds",
            "Time to insert and commit one batch (retries through outages included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            f"{PREFIX}end_to_end_latency_seconds",
            "From a user's production to its acknowledged commit in PostgreSQL",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows_inserted = 0  # new rows, as the consumers report them

    def api_request(self, outcome: str, seconds: float) -> None:
        self.api_requests.labels(outcome).inc()
        self.api_request_seconds.labels(outcome).observe(seconds)

    def batch(self, report: Batch) -> None:
        self.batch_size.observe(report.rows)
        self.commit_seconds.observe(report.commit_s)
        self.rows_inserted += report.inserted

    def end_to_end(self, seconds: float) -> None:
        self.end_to_end_seconds.observe(max(0.0, seconds))

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape's body and its content type (OpenMetrics when `accept` asks)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def _counter(name: str, doc: str, labels: list[str], values: Mapping[Any, int]) -> Metric:
    family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(f"{PREFIX}{name}", doc, value=value)


class StatusCollector(Collector):
    """Counts and states read from the daemon's `Status` at each scrape."""

    def __init__(self, status: StatusFn) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        stats = status.feed
        producer = status.producer
        invalid = dict(producer.invalid_by_source) if producer else {}
        counts = status.counts
        published = counts.published
        # (each series exists from its source's first user; on the NATS bus a consumer
        # node publishes nothing and commits what other nodes published)
        sources = {*published, *invalid, *counts.committed, *counts.rejected}
        produced = {(s,): published.get(s, 0) + invalid.get(s, 0) for s in sources}
        yield _counter(
            "users_produced",
            "Users the sources gave (valid or not), by source",
            ["source"],
            produced,
        )
        yield _counter(
            "users_broadcast",
            "Users published into the stream, by source",
            ["source"],
            {(s,): n for s, n in published.items()},
        )
        yield _counter(
            "users_committed",
            "Users the consumer group committed to PostgreSQL since this daemon started (each "
            "stream seq once), by source",
            ["source"],
            {(s,): counts.committed.get(s, 0) for s in sources},
        )
        dead = {(s, stage): 0 for s in sources for stage in ("producer", "consumer")}
        dead.update({(s, "producer"): n for s, n in invalid.items()})
        dead.update({(s, "consumer"): n for s, n in counts.rejected.items()})
        yield _counter(
            "users_dead_lettered",
            "Users set aside instead of stored: invalid (producer), or invalid or refused by "
            "the database (consumer)",
            ["source", "stage"],
            dead,
        )
        fanout = status.fanout
        sent = {(k,): n for k, n in status.sent.items()}
        if fanout.workers:
            sent[("fanout",)] = fanout.sent
        yield _counter(
            "websocket_messages_sent",
            "Messages sent to WebSocket clients after their welcome (each user, also in a users "
            "frame, gap and checkpoint), by kind of client (fanout: the fan-out workers' plain "
            "clients)",
            ["kind"],
            sent,
        )
        yield CounterMetricFamily(
            f"{PREFIX}websocket_slow_closes",
            "Plain clients cut off (closed with 3008) for falling too far behind",
            value=(stats.slow_disconnects if stats else 0) + fanout.slow_closes,
        )
        yield CounterMetricFamily(
            f"{PREFIX}websocket_write_timeouts",
            "WebSocket clients dropped because a write to them took longer than "
            "broadcaster.write_timeout_s (closed with 3008 between two frames, else "
            "without a close frame)",
            value=(status.broadcaster.write_timeouts if status.broadcaster else 0)
            + fanout.write_timeouts,
        )
        yield from _replays(status.broadcaster.replays if status.broadcaster else None)
        clients = GaugeMetricFamily(
            f"{PREFIX}websocket_clients", "Connected WebSocket clients, by kind", labels=["kind"]
        )
        clients.add_metric(["plain"], stats.clients if stats else 0)
        clients.add_metric(["member"], stats.members if stats else 0)
        if fanout.workers:
            clients.add_metric(["fanout"], fanout.clients)
        yield clients
        buffered, buffered_bytes = (stats.buffered, stats.buffered_bytes) if stats else (0, 0)
        yield _gauge("buffer_messages", "Users held in the replay buffer", buffered)
        yield _gauge("buffer_bytes", "Bytes held in the replay buffer", buffered_bytes)
        last_seq = stats.last_seq if stats else counts.last_seq
        yield _gauge("stream_last_seq", "The seq of the latest published user", last_seq)
        yield _gauge(
            "stream_committed_seq",
            "The seq through which the daemon's consumer group has committed every user of "
            "the stream's epoch (its checkpoint: kept across restarts, unlike "
            "users_committed_total)",
            status.committed_through,
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}oldest_unacknowledged_seq",
            "The lowest seq a consumer group has not acknowledged, by group",
            labels=["group"],
        )
        for g in stats.groups if stats else ():
            oldest.add_metric([g.name], g.watermark + 1)
        yield oldest
        yield from _producer(producer)
        yield from _ops_port(status.ops_port)
        yield from _components(status)
        yield _gauge("ready", "1 while /readyz answers 200", float(readiness(status).ready))


def _replays(stats: ReplayStatistics | None) -> Iterator[Metric]:
    stats = stats or ReplayStatistics()
    yield _gauge(
        "history_replays_active",
        "Clients being replayed from storage now (resumed from before the replay buffer)",
        stats.replaying,
    )
    yield _gauge(
        "history_replays_waiting",
        "Clients waiting for a replay slot (history.max_replays)",
        stats.waiting,
    )
    yield CounterMetricFamily(
        f"{PREFIX}history_replays", "Replays from storage begun", value=stats.replays
    )
    yield _counter(
        "history_users_replayed",
        "Users sent to resuming clients by their replays, by where they were read: "
        "stored (PostgreSQL or the JetStream stream) or buffered (the replay buffer)",
        ["source"],
        {("stored",): stats.stored, ("buffered",): stats.buffered},
    )
    yield CounterMetricFamily(
        f"{PREFIX}history_gaps",
        "Gap frames replays sent: seqs that exist nowhere (dead-lettered, purged, not stored)",
        value=stats.gaps,
    )
    yield CounterMetricFamily(
        f"{PREFIX}history_unavailable",
        "Replays ended (closed 1011) because the store could not be read",
        value=stats.unavailable,
    )


def _producer(stats: ProducerStatistics | None) -> Iterator[Metric]:
    yield _gauge(
        "upstream_circuit_open",
        "1 while the Random User API's circuit is open",
        float(stats is not None and stats.circuit_open),
    )
    yield _gauge(
        "producer_fallback_active",
        "1 while the fallback source serves",
        float(stats is not None and stats.fallback_active),
    )
    if stats is not None and stats.budget_remaining_users is not None:
        yield _gauge(
            "upstream_budget_remaining_users",
            "Users the Random User API may still serve in the budget's window",
            stats.budget_remaining_users,
        )


def _ops_port(stats: OpsPortStatistics | None) -> Iterator[Metric]:
    """The operations port's own listener (none with ``http.enabled = false``)."""
    if stats is None:
        return
    yield _counter(
        "http_connections_refused",
        "Connections to the operations port turned away at once, by HTTP status (503: "
        "http.max_connections, or the port's eighth of the open-file limit; 429: "
        "http.max_connections_per_ip)",
        ["status"],
        {(str(s),): stats.over_limit.get(s, 0) for s in (429, 503)},
    )
    yield CounterMetricFamily(
        f"{PREFIX}http_accept_errors",
        "Accepts on the operations port that failed for want of descriptors or memory "
        "(EMFILE, ENFILE, ENOBUFS, ENOMEM)",
        value=stats.accept_errors,
    )
    yield _counter(
        "http_dropped",
        "Operations-port connections cut off, by reason (peer_gone: reset by the client, or "
        "a write to it refused; write_timeout: it took nothing for http.write_timeout_s); "
        "what it had pipelined is never answered",
        ["reason"],
        {("peer_gone",): stats.peers_gone, ("write_timeout",): stats.write_timeouts},
    )


def _components(status: Status) -> Iterator[Metric]:
    snapshot = status.components
    restarts = CounterMetricFamily(
        f"{PREFIX}component_restarts",
        "Restarts of each supervised component",
        labels=["component"],
    )
    state = GaugeMetricFamily(
        f"{PREFIX}component_state",
        "1 for each component's current state",
        labels=["component", "state"],
    )
    for c in snapshot:
        restarts.add_metric([c.name], c.restarts)
        for s in STATES:
            state.add_metric([c.name, s], float(c.state == s))
    yield restarts
    yield state
