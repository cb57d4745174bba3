"""From one `Config` to the pipeline's parts: every constructor call the daemon needs,
so that `daemon.py` is the life cycle only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import httpx
import trio

from .. import __version__
from ..config import BroadcasterConfig, Config
from ..consume.consumer import Consumer, Milestones, make_consumer
from ..ops.app import url_host
from ..ops.metrics import Metrics
from ..produce.deadletters import DeadLetters
from ..produce.producer import Outlet, Producer, Source, page_size_for
from ..serve.admission import Policy
from ..serve.auth import Tokens
from ..sources.randomuser import RandomUserSource, UserBudget
from ..sources.synthetic import SyntheticSource
from ..store.ledger import BudgetLedger
from ..store.postgres import PostgresStore
from ..store.streams import Stream
from ..stream.hub import Hub
from ..topology.nats.bus import Bus
from ..topology.nats.consumer import StreamConsumer
from .supervisor import ComponentFn, Intensity, RestartPolicy, Supervisor
from .workers import run_consumer_process, run_worker_process


def http_client(config: Config) -> httpx.AsyncClient:
    r = config.randomuser
    return httpx.AsyncClient(
        timeout=httpx.Timeout(r.timeout_s, connect=min(5.0, r.timeout_s)),
        follow_redirects=True,
        headers={"user-agent": f"userstreamd/{__version__}"},
    )


def supervisor(
    config: Config, nursery: trio.Nursery, on_escalate: Callable[[str], None]
) -> Supervisor:
    s = config.supervisor
    return Supervisor(
        nursery,
        policy=RestartPolicy(
            "permanent", s.restart_delay_min_s, s.restart_delay_max_s, s.restart_reset_after_s
        ),
        intensity=Intensity(s.max_restarts, s.max_restarts_window_s),
        stop_timeout_s=s.stop_timeout_s,
        on_escalate=on_escalate,
    )


def hub(config: Config, stream: Stream, metrics: Metrics | None = None) -> Hub:
    """The hub; the daemon's own group holds the producer back only when it has consumers
    (a broadcast-only daemon waits for nobody)."""
    b, c = config.broadcaster, config.consumers
    new = Hub(
        stream.epoch,
        first_seq=stream.seq + 1,
        buffer_messages=b.buffer_messages,
        buffer_bytes=b.buffer_bytes,
        client_lag_max=b.client_lag_max,
        group_lag_max=b.group_lag_max,
        window=c.window,
        lead_max=c.max_lead,
        on_committed=metrics.end_to_end if metrics else None,
    )
    if c.count > 0:
        new.declare_group(
            c.group, watermark=stream.seq, position=stream.position, holds_producer=True
        )
    for name in b.groups:
        new.declare_group(name)
    return new


def mirror_hub(settings: BroadcasterConfig, epoch: str, first_seq: int) -> Hub:
    """A fan-out worker's hub: the daemon's stream from `first_seq` on, the same bounds."""
    return Hub(
        epoch,
        first_seq=first_seq,
        buffer_messages=settings.buffer_messages,
        buffer_bytes=settings.buffer_bytes,
        client_lag_max=settings.client_lag_max,
    )


def fanout_workers(
    config: Config, upstream: str, port: int, origins: Sequence[str], running: set[trio.Process]
) -> list[tuple[str, ComponentFn]]:
    """(component name, its run function) per fan-out worker process."""
    arguments = ["--upstream", upstream, "--port", str(port), "--origins", ",".join(origins)]
    return [
        (
            f"fanout-{worker}",
            partial(
                run_worker_process,
                config,
                "fanout",
                worker,
                arguments,
                stop_timeout_s=config.supervisor.stop_timeout_s,
                running=running,
            ),
        )
        for worker in range(1, config.broadcaster.workers + 1)
    ]


def policy(config: Config, tokens: Tokens, page_origins: Sequence[str] = ()) -> Policy:
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


def page_origins(host: str, port: int) -> list[str]:
    """The origins a browser gives the live page served on `host`:`port`: the names of
    loopback for a loopback or wildcard address, else the address itself (any other name
    goes in broadcaster.allowed_origins)."""
    names = {
        "": ["127.0.0.1", "localhost", "[::1]"],
        "0.0.0.0": ["127.0.0.1", "localhost"],
        "::": ["127.0.0.1", "localhost", "[::1]"],
        "127.0.0.1": ["127.0.0.1", "localhost"],
        "::1": ["[::1]", "localhost"],
        "localhost": ["localhost", "127.0.0.1", "[::1]"],
    }.get(host, [url_host(host)])
    return [f"http://{name}:{port}" for name in names]


def producer(
    config: Config,
    hub: Outlet,
    http: httpx.AsyncClient,
    stream: Stream,
    dsn: str,
    resources: contextlib.ExitStack,
    metrics: Metrics | None = None,
) -> Producer:
    """The producer; the budget ledger's store is closed with `resources`."""
    p, ru = config.producer, config.randomuser

    def _store(application_name: str) -> PostgresStore:
        return PostgresStore.from_config(config, dsn, application_name=application_name)

    synthetic = SyntheticSource(seed=stream.seed, nats=p.nat, inc=ru.inc, exc=ru.exc)
    page_size = ru.page_size or min(page_size_for(p.rate_per_s), ru.budget_users)
    primary: Source = synthetic
    fallback: Source | None = None
    if p.source == "randomuser":
        ledger_store = _store("userstreamd-budget")
        resources.callback(ledger_store.close)  # (the dead letters close their own)
        primary = RandomUserSource(
            http,
            ru.url,
            seed=stream.seed,
            page_size=page_size,
            nats=p.nat,
            inc=ru.inc,
            exc=ru.exc,
            budget=UserBudget(
                ru.budget_users,
                ru.budget_window_s,
                ledger=BudgetLedger(ledger_store, ru.url),
            ),
            on_request=metrics.api_request if metrics else None,
        )
        fallback = synthetic if p.fallback == "synthetic" else None
    return Producer(
        hub,
        primary,
        rate_per_s=p.rate_per_s,
        page_size=page_size,
        # (a new rate gets pages its size, unless their size maps positions: the API's)
        page_size_for_rate=page_size_for if p.source == "synthetic" and not ru.page_size else None,
        fallback=fallback,
        failures_before_fallback=ru.failures_before_fallback,
        probe_interval_s=ru.probe_interval_s,
        retry_max_s=ru.retry_max_s,
        keep_credentials=p.keep_credentials,
        log_each_user_below_per_s=p.log_each_user_below_per_s,
        dead_letters=DeadLetters(_store("userstreamd-dead-letters")),
        start_position=stream.position + 1,
        stop_at_position=p.stop_at_position,
    )


def stream_consumers(
    config: Config, bus: Bus, dsn: str, metrics: Metrics
) -> list[tuple[str, StreamConsumer]]:
    """(component name, consumer) per consumer on the NATS bus (trio tasks, always)."""
    milestones = Milestones(config.database.milestone_every)
    found = []
    for worker in range(1, config.consumers.count + 1):
        store = PostgresStore.from_config(
            config, dsn, application_name=f"userstreamd-consumer-{worker}"
        )
        consumer = StreamConsumer(
            bus, store, config, worker, milestones, metrics.batch, metrics.end_to_end
        )
        found.append((f"consumer-{worker}", consumer))
    return found


def consumers(
    config: Config, url: str, dsn: str, running: set[trio.Process]
) -> list[tuple[str, ComponentFn, Consumer | None]]:
    """(component name, its run function, the in-process Consumer or None) per consumer."""
    c = config.consumers
    milestones = Milestones(config.database.milestone_every)
    found: list[tuple[str, ComponentFn, Consumer | None]] = []
    for worker in range(1, c.count + 1):
        if config.consumer_processes:
            run = partial(
                run_consumer_process,
                config,
                worker,
                url,
                dsn,
                stop_timeout_s=config.supervisor.stop_timeout_s,
                running=running,
            )
            found.append((f"consumer-{worker}", run, None))
        else:
            consumer = make_consumer(config, url, dsn, worker, milestones)
            found.append((f"consumer-{worker}", consumer.run, consumer))
    return found
