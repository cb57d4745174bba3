"""From one `Config` to the pipeline's parts: every constructor call the daemon needs,
so that `daemon.py` is the life cycle only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import httpx
import trio

from .. import __version__
from ..config import Config, url_host
from ..ops.metrics import Metrics
from ..produce.deadletters import DeadLetters
from ..produce.producer import Outlet, Producer, Source, page_size_for
from ..sources.randomuser import RandomUserSource, UserBudget
from ..sources.synthetic import SyntheticSource
from ..store.ledger import BudgetLedger
from ..store.postgres import PostgresStore
from ..store.streams import Stream
from .supervisor import ComponentFn, Intensity, RestartPolicy, Supervisor
from .workers import run_worker_process


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
