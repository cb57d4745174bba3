"""The pipeline, assembled: database -> broadcaster -> consumers -> producer.

`run_daemon` starts the components in that order under one `Supervisor`, each reporting
readiness, and on SIGINT/SIGTERM stops them in reverse: the producer first, then waits
(bounded) until every consumer has committed and acknowledged the last published user,
then the consumers, the broadcaster and the database. A second signal exits at once.
SIGHUP re-reads the config file and applies the log level and the producer rate.
"""

from __future__ import annotations

import signal
import ssl
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import trio

from . import __version__
from .admission import Policy
from .auth import Tokens, is_loopback
from .broadcaster import Broadcaster
from .config import Config, load_config
from .consumer import Consumer, Milestones, make_consumer
from .deadletters import DeadLetters
from .edge import private_socket_path
from .errors import ConfigError
from .hub import Hub
from .logs import bind, configure_logging, get_logger
from .producer import Producer, Source, page_size_for
from .sources.randomuser import RandomUserSource, UserBudget
from .sources.synthetic import SyntheticSource
from .store.embedded import EmbeddedPostgres
from .store.postgres import PostgresStore
from .supervisor import ComponentFn, Intensity, RestartPolicy, Supervisor
from .systemd import Notifier
from .workers import run_consumer_process


async def run_database(config: Config, *, task_status: trio.TaskStatus[str]) -> None:
    """Provide a migrated database: the configured DSN, or an embedded server we own."""
    bind(component="database")
    log = get_logger()
    dsn = config.database.dsn
    embedded = None if dsn else EmbeddedPostgres(config.state_path / "postgres")
    proc = None
    try:
        if embedded is not None:
            if await trio.to_thread.run_sync(embedded.prepare):
                log.info("database.initialised", data_dir=str(embedded.data_dir))
            proc = await trio.to_thread.run_sync(embedded.start)
            await trio.to_thread.run_sync(embedded.wait_ready, proc)
            dsn = embedded.dsn
            log.info("database.embedded_started", pid=proc.pid, data_dir=str(embedded.data_dir))
        store = PostgresStore(
            dsn, password=config.db_password(), application_name="userstreamd-migrate"
        )
        try:
            applied = await trio.to_thread.run_sync(store.migrate)
        finally:
            store.close()
        log.info("database.ready", migrations_applied=applied, embedded=embedded is not None)
        task_status.started(dsn)
        if proc is None:
            await trio.sleep_forever()
        code = await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        raise RuntimeError(f"embedded postgres exited with code {code}")
    finally:
        if embedded is not None and proc is not None:
            with trio.CancelScope(shield=True):
                code = await trio.to_thread.run_sync(embedded.stop, proc)
                log.info("database.embedded_stopped", exit_code=code)


@dataclass(frozen=True)
class Stream:
    """Where the stream starts: the epoch, the seed that regenerates it, and the last
    (seq, source position) its consumer group committed."""

    epoch: str
    seed: str
    seq: int
    position: int
    resumed: bool


def _client_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def open_stream(config: Config, dsn: str) -> Stream:
    """Resume the stream from the consumer group's last checkpoint, or begin a new epoch.

    Resuming needs the same source and seed (an empty configured seed accepts the stored
    one); the producer then regenerates everything after the checkpoint's position."""
    p = config.producer
    store = PostgresStore(dsn, password=config.db_password(), application_name="userstreamd")
    log = get_logger()
    try:
        found = store.last_checkpoint(config.consumers.group)
        if found is not None:
            checkpoint, seed, source = found
            if source == p.source and p.seed in ("", seed):
                log.info(
                    "daemon.stream_resumed",
                    epoch=checkpoint.epoch,
                    seq=checkpoint.seq,
                    position=checkpoint.position,
                    seed=seed,
                )
                return Stream(
                    checkpoint.epoch, seed, checkpoint.seq, checkpoint.position, resumed=True
                )
            log.info(
                "daemon.stream_not_resumed", epoch=checkpoint.epoch, reason="source or seed changed"
            )
        epoch = uuid.uuid4().hex[:16]
        seed = p.seed or epoch
        store.begin_stream(epoch, seed, p.source)
        log.info("daemon.stream_started", epoch=epoch, seed=seed, source=p.source)
        return Stream(epoch, seed, 0, 0, resumed=False)
    finally:
        store.close()


def _make_producer(
    config: Config, hub: Hub, http: httpx.AsyncClient, stream: Stream, dsn: str
) -> Producer:
    p, ru = config.producer, config.randomuser
    seed = stream.seed
    synthetic = SyntheticSource(seed=seed, nats=p.nat)
    page_size = ru.page_size or min(page_size_for(p.rate_per_s), ru.budget_users)
    primary: Source = synthetic
    fallback: Source | None = None
    if p.source == "randomuser":
        primary = RandomUserSource(
            http,
            ru.url,
            seed=seed,
            page_size=page_size,
            nats=p.nat,
            inc=ru.inc,
            exc=ru.exc,
            budget=UserBudget(ru.budget_users, ru.budget_window_s),
        )
        fallback = synthetic if p.fallback == "synthetic" else None
    store = PostgresStore(
        dsn, password=config.db_password(), application_name="userstreamd-dead-letters"
    )
    return Producer(
        hub,
        primary,
        rate_per_s=p.rate_per_s,
        page_size=page_size,
        fallback=fallback,
        failures_before_fallback=ru.failures_before_fallback,
        probe_interval_s=ru.probe_interval_s,
        retry_max_s=ru.retry_max_s,
        keep_credentials=p.keep_credentials,
        log_each_user_below_per_s=p.log_each_user_below_per_s,
        dead_letters=DeadLetters(store),
        start_position=stream.position + 1,
        stop_at_position=p.stop_at_position,
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        tokens: Tokens | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens or Tokens((), required=False)
        self.ssl_context = ssl_context
        self.hub = self._new_hub(Stream(uuid.uuid4().hex[:16], "", 0, 0, resumed=False))
        self.broadcaster: Broadcaster | None = None
        self.consumers: list[Consumer] = []
        self.producer: Producer | None = None
        self.notifier = Notifier.from_environ()
        self.supervisor: Supervisor | None = None
        self.worker_processes: set[trio.Process] = set()
        self.exit_code = 0
        self._stop = trio.Event()
        self._startup = trio.CancelScope()

    async def run(self) -> int:
        c = self.config
        bind(component="daemon")
        log = get_logger()
        timeout = httpx.Timeout(c.randomuser.timeout_s, connect=min(5.0, c.randomuser.timeout_s))
        sc = c.supervisor
        async with (
            httpx.AsyncClient(
                timeout=timeout,
                follow_redirects=True,
                headers={"user-agent": f"userstreamd/{__version__}"},
            ) as http,
            trio.open_nursery() as root,
        ):
            sup = self.supervisor = Supervisor(
                root,
                policy=RestartPolicy(
                    "permanent",
                    sc.restart_delay_min_s,
                    sc.restart_delay_max_s,
                    sc.restart_reset_after_s,
                ),
                intensity=Intensity(sc.max_restarts, sc.max_restarts_window_s),
                stop_timeout_s=sc.stop_timeout_s,
                on_escalate=self._escalate,
            )
            root.start_soon(self._watch_signals, root.cancel_scope)
            log.info(
                "daemon.starting",
                version=__version__,
                config=c.path,
                source=c.producer.source,
                rate_per_s=c.producer.rate_per_s,
                consumer_processes=c.consumer_processes,
            )
            with self._startup:
                dsn = await sup.start("database", partial(run_database, c))
                stream = await trio.to_thread.run_sync(open_stream, c, dsn)
                self.hub = self._new_hub(stream)
                b = c.broadcaster
                if b.auth == "none" and not is_loopback(b.host):
                    log.warning("daemon.no_auth", host=b.host, reason='auth = "none"')
                self.broadcaster = Broadcaster(
                    self.hub, b, self._policy(), ssl_context=self.ssl_context
                )
                private = private_socket_path(c.state_path)
                port = await sup.start(
                    "broadcaster", partial(self.broadcaster.run, b.host, b.port, private)
                )
                scheme = "wss" if self.ssl_context else "ws"
                url = f"{scheme}://{_client_host(b.host)}:{port}/"
                await self._start_consumers(sup, f"ws+unix://{private}", dsn)
                self.producer = _make_producer(c, self.hub, http, stream, dsn)
                await sup.start("producer", self.producer.run)
                log.info("daemon.ready", url=url, consumers=c.consumers.count)
                self.notifier.ready(self._status())
                root.start_soon(self._log_stats)
                root.start_soon(self._keep_systemd_informed)
            await self._stop.wait()
            await self._shutdown(sup)
            root.cancel_scope.cancel()
        return self.exit_code

    async def _start_consumers(self, sup: Supervisor, url: str, dsn: str) -> None:
        c = self.config
        milestones = Milestones(c.database.milestone_every)
        for worker in range(1, c.consumers.count + 1):
            run: ComponentFn
            if c.consumer_processes:
                run = partial(
                    run_consumer_process,
                    c,
                    worker,
                    url,
                    dsn,
                    stop_timeout_s=c.supervisor.stop_timeout_s,
                    running=self.worker_processes,
                )
            else:
                consumer = make_consumer(c, url, dsn, worker, milestones)
                self.consumers.append(consumer)
                run = consumer.run
            await sup.start(f"consumer-{worker}", run)

    def _new_hub(self, stream: Stream) -> Hub:
        b = self.config.broadcaster
        hub = Hub(
            stream.epoch,
            first_seq=stream.seq + 1,
            buffer_messages=b.buffer_messages,
            buffer_bytes=b.buffer_bytes,
            client_lag_max=b.client_lag_max,
            group_lag_max=b.group_lag_max,
            window=self.config.consumers.window,
        )
        hub.declare_group(
            self.config.consumers.group,
            watermark=stream.seq,
            position=stream.position,
            holds_producer=True,
        )
        for name in b.groups:
            hub.declare_group(name)
        return hub

    def _policy(self) -> Policy:
        b = self.config.broadcaster
        return Policy(
            self.tokens,
            own_group=self.config.consumers.group,
            groups=frozenset(b.groups),
            allow_ad_hoc_groups=b.allow_ad_hoc_groups,
            allowed_origins=frozenset(o.lower() for o in b.allowed_origins),
            default_window=self.config.consumers.window,
        )

    def _escalate(self, reason: str) -> None:
        """The supervisor gave up on a component: stop everything, exit non-zero."""
        get_logger().error("daemon.giving_up", reason=reason)
        self.exit_code = 1
        self.notifier.status(f"failed: {reason}")
        self._stop.set()
        self._startup.cancel()

    async def _shutdown(self, sup: Supervisor) -> None:
        log = get_logger()
        log.info("daemon.stopping")
        self.notifier.stopping("stopping: draining consumers")
        if self.producer is not None:
            await sup.stop("producer")
        with trio.move_on_after(self.config.supervisor.drain_timeout_s) as drain:
            await self.hub.wait_drained()
        log.info(
            "daemon.drained" if not drain.cancelled_caught else "daemon.drain_timeout",
            last_seq=self.hub.last_seq,
            committed_through=self._committed_through(),
        )
        self.hub.close()
        await sup.stop_all()
        log.info("daemon.stopped", exit_code=self.exit_code, **self._totals())

    def _totals(self) -> dict[str, Any]:
        producer = self.producer.statistics() if self.producer else None
        totals: dict[str, Any] = {
            "published": producer.published if producer else 0,
            "invalid": producer.invalid if producer else 0,
            "fetch_failures": dict(producer.failures_by_kind) if producer else {},
            "backpressure_waits": producer.backpressure_waits if producer else 0,
            "last_seq": self.hub.last_seq,
            "committed_through": self._committed_through(),
        }
        if self.consumers:  # in-process consumers: their counts are ours to report
            totals["rows_inserted"] = sum(c.inserted for c in self.consumers)
        return totals

    def _committed_through(self) -> int:
        return self.hub.watermark(self.config.consumers.group)[0]

    def _status(self) -> str:
        """The one-line summary systemd shows (STATUS=)."""
        producer = self.producer.statistics() if self.producer else None
        source = producer.active_source if producer else "-"
        rate = producer.rate_per_s if producer else 0
        return (
            f"{self.hub.last_seq} users streamed at {rate:g}/s from {source}, "
            f"{self.hub.clients} clients, committed through seq {self._committed_through()}"
        )

    async def _keep_systemd_informed(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while every component is running."""
        if not self.notifier.enabled:
            return
        interval = min(5.0, self.notifier.watchdog_interval_s or 5.0)
        while True:
            await trio.sleep(interval)
            self.notifier.status(self._status())
            if self.notifier.watchdog_interval_s and self.supervisor and self.supervisor.healthy():
                self.notifier.watchdog()

    async def _watch_signals(self, root: trio.CancelScope) -> None:
        log = get_logger()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self._reload()
                elif not self._stop.is_set():
                    log.info("daemon.signal", signal=name, action="graceful stop")
                    self._stop.set()
                    self._startup.cancel()
                else:
                    log.warning("daemon.signal", signal=name, action="immediate exit")
                    self.exit_code = 1  # the drain was cut short
                    for proc in self.worker_processes:
                        proc.kill()
                    root.cancel()

    def _reload(self) -> None:
        log = get_logger()
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("daemon.reload_rejected", error=str(exc))
            self.notifier.ready(self._status())
            return
        configure_logging(new.daemon.log_level, new.daemon.log_format)
        if self.producer is not None:
            self.producer.set_rate(new.producer.rate_per_s)
        self.config = new
        log.info(
            "daemon.reloaded", log_level=new.daemon.log_level, rate_per_s=new.producer.rate_per_s
        )
        self.notifier.ready(self._status())

    async def _log_stats(self) -> None:
        log = get_logger().bind(component="daemon")
        interval = self.config.daemon.stats_interval_s
        last_seq, last_time = self.hub.last_seq, trio.current_time()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            rate = (self.hub.last_seq - last_seq) / (now - last_time)
            last_seq, last_time = self.hub.last_seq, now
            source = self.producer.statistics().active_source if self.producer else None
            components = {
                s.name: {"state": s.state, "restarts": s.restarts, "last_exit": s.last_exit}
                for s in (self.supervisor.snapshot() if self.supervisor else [])
            }
            edge = self.broadcaster.statistics() if self.broadcaster else None
            log.info(
                "daemon.stats",
                broadcaster=edge,
                users_streamed=self.hub.last_seq,
                rate_per_s=round(rate, 2),
                active_clients=self.hub.clients,
                source=source,
                components=components,
                **self._totals(),
            )


async def run_daemon(
    config: Config, tokens: Tokens | None = None, ssl_context: ssl.SSLContext | None = None
) -> int:
    return await Daemon(config, tokens, ssl_context).run()
