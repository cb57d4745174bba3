"""The daemon's life cycle: start the pipeline in order, keep it supervised, stop it.

`Daemon.run` starts the components in order under one `Supervisor`, each reporting
readiness: the operations endpoint (`ops`: metrics, health, live page) -> database ->
broadcaster -> fan-out workers (``broadcaster.workers``: then they serve the public port,
see `fanout`) -> consumers -> producer (what each is made of comes from `wiring`). On
SIGINT/SIGTERM, or when the `shutdown_trigger` given to `run` returns, it stops them in
reverse: the producer first, then waits (bounded) until every consumer has committed and
acknowledged the last published user, writes the group's final checkpoint, then stops
the consumers (together), the broadcaster, the database and the endpoint.
A second signal exits at once. When the supervisor gives up on a component, nothing is
drained: everything is stopped at once and the exit code is 1. SIGHUP re-reads the config
file and applies the keys in `config.RELOADABLE`; other changed keys are logged as
needing a restart.

With ``cluster.bus = "nats"`` the stream lives on a JetStream cluster (`jetstream`) and
the daemon runs the parts of its `role` (``run --role``): after the endpoint, the
connection to NATS, then the database (producer, consumer), the stream's mirror and the
broadcaster, the consumers, the producer. Nothing is drained at a stop: the stream keeps
what the group has not acknowledged.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import msgspec
import trio

from .. import __version__
from ..config import RELOADABLE, Config, changed_keys, load_config
from ..consume.consumer import Consumer
from ..errors import ConfigError
from ..logs import bind, configure_logging, get_logger
from ..ops.app import OpsApp, serve_ops, url_host
from ..ops.health import Health
from ..ops.metrics import DaemonCollector, Metrics
from ..produce.producer import Producer
from ..serve.auth import Tokens, is_loopback
from ..serve.broadcaster import Broadcaster
from ..serve.edge import private_socket_path
from ..store.bootstrap import run_database
from ..store.postgres import StreamCheckpoint
from ..store.streams import Stream, open_stream, record_stream, save_checkpoint
from ..topology.nats.bus import Bus, open_bus
from ..topology.nats.consumer import StreamConsumer
from ..topology.nats.mirror import StreamMirror
from ..topology.nats.outlet import Outlet, Publisher, run_producer
from . import wiring
from .supervisor import Supervisor
from .systemd import Notifier


@dataclass(frozen=True)
class StreamCounts:
    published: Mapping[str, int]  # by source
    committed: Mapping[str, int]
    rejected: Mapping[str, int]
    last_seq: int
    committed_total: int  # each seq once (on the NATS bus: each acknowledgement)


def _client_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class Daemon:
    def __init__(
        self,
        config: Config,
        tokens: Tokens | None = None,
        ssl_context: ssl.SSLContext | None = None,
        role: str = "all",
    ) -> None:
        self.config = config  # as started; a reload changes only the RELOADABLE keys
        self.role = role
        self.bus: Bus | None = None  # (cluster.bus = "nats")
        self.tokens = tokens or Tokens((), required=False)
        self.ssl_context = ssl_context
        self.metrics = Metrics()
        self.metrics.watch(DaemonCollector(self))
        self.health = Health(self)
        self.hub = wiring.hub(config, Stream.new(), self.metrics)
        self.broadcaster: Broadcaster | None = None
        self.consumers: list[Consumer] = []  # in-process ones
        self._consumer_names: list[str] = []
        self.producer: Producer | None = None
        self.notifier = Notifier.from_environ()
        self.supervisor: Supervisor | None = None
        self.worker_processes: set[trio.Process] = set()
        self.dsn = ""
        self.url = ""
        self.ws_port: int | None = None
        self.http_url = ""
        self.exit_code = 0
        self.giving_up = False
        self.ready = trio.Event()
        self._stop = trio.Event()
        self._startup = trio.CancelScope()

    async def run(self, shutdown_trigger: Callable[[], Awaitable[Any]] | None = None) -> int:
        """Run until SIGINT/SIGTERM, or until `shutdown_trigger` returns (then no signal
        handlers are installed: for running the daemon inside another program or test)."""
        bind(component="daemon")
        with contextlib.ExitStack() as resources:
            async with (
                contextlib.AsyncExitStack() as connections,  # (closed after the components)
                wiring.http_client(self.config) as http,
                trio.open_nursery() as root,
            ):
                await self._run(root, http, resources, connections, shutdown_trigger)
                root.cancel_scope.cancel()  # the stats and systemd tasks
        return self.exit_code

    async def _run(
        self,
        root: trio.Nursery,
        http: httpx.AsyncClient,
        resources: contextlib.ExitStack,
        connections: contextlib.AsyncExitStack,
        shutdown_trigger: Callable[[], Awaitable[Any]] | None,
    ) -> None:
        c = self.config
        log = get_logger()
        sup = self.supervisor = wiring.supervisor(c, root, self._escalate)
        if shutdown_trigger is None:
            root.start_soon(self._watch_signals, root.cancel_scope)
        else:
            root.start_soon(self._stop_after, shutdown_trigger)
        log.info(
            "daemon.starting",
            version=__version__,
            config=c.path,
            source=c.producer.source,
            rate_per_s=c.producer.rate_per_s,
            consumer_processes=c.consumer_processes,
            bus=c.cluster.bus,
            role=self.role,
        )
        with self._startup:
            page_origins: list[str] = []
            if c.http.enabled:
                h = c.http
                http_port = await sup.start(
                    "http", partial(serve_ops, OpsApp(self), h.host, h.port)
                )
                self.http_url = f"http://{url_host(_client_host(h.host))}:{http_port}/"
                page_origins = wiring.page_origins(h.host, http_port)
                log.info("daemon.http_listening", url=self.http_url)
            root.start_soon(self.health.probe_database)
            if c.cluster.bus == "nats":
                await self._start_on_nats(sup, http, resources, connections, page_origins)
            else:
                await self._start_embedded(sup, http, resources, page_origins)
            log.info(
                "daemon.ready", url=self.url, http_url=self.http_url, consumers=c.consumers.count
            )
            self.ready.set()
            self.notifier.ready(self._status())
            root.start_soon(self._log_stats)
            root.start_soon(self._keep_systemd_informed)
        await self._stop.wait()
        await self._shutdown(sup)

    async def _start_embedded(
        self,
        sup: Supervisor,
        http: httpx.AsyncClient,
        resources: contextlib.ExitStack,
        page_origins: list[str],
    ) -> None:
        c = self.config
        self.dsn = await sup.start("database", partial(run_database, c))
        self.health.probe_now()
        stream = await trio.to_thread.run_sync(open_stream, c, self.dsn)
        self.hub = wiring.hub(c, stream, self.metrics)
        own = await self._start_broadcaster(sup, page_origins)
        for name, run, consumer in wiring.consumers(c, own, self.dsn, self.worker_processes):
            if consumer is not None:
                self.consumers.append(consumer)
            self._consumer_names.append(name)
            await sup.start(name, run)
        self.producer = wiring.producer(
            c, self.hub, http, stream, self.dsn, resources, self.metrics
        )
        await sup.start("producer", self.producer.run)

    async def _start_broadcaster(self, sup: Supervisor, page_origins: list[str]) -> str:
        """The broadcaster over `self.hub` (and its fan-out workers); its private URL."""
        c, b = self.config, self.config.broadcaster
        if b.auth == "none" and not is_loopback(b.host):
            get_logger().warning("daemon.no_auth", host=b.host, reason='auth = "none"')
        self.broadcaster = Broadcaster(
            self.hub,
            b,
            wiring.policy(c, self.tokens, page_origins),
            ssl_context=self.ssl_context,
            on_batch=self.metrics.batch,
        )
        private = private_socket_path(c.state_path)
        public = b.workers == 0  # else the fan-out workers serve the port
        port = self.ws_port = await sup.start(
            "broadcaster",
            partial(self.broadcaster.run, b.host, b.port, private, public=public),
        )
        scheme = "wss" if self.ssl_context else "ws"
        self.url = f"{scheme}://{url_host(_client_host(b.host))}:{port}/"
        own = f"ws+unix://{private}"
        for name, run in wiring.fanout_workers(c, own, port, page_origins, self.worker_processes):
            await sup.start(name, run)
        return own

    async def _start_on_nats(
        self,
        sup: Supervisor,
        http: httpx.AsyncClient,
        resources: contextlib.ExitStack,
        connections: contextlib.AsyncExitStack,
        page_origins: list[str],
    ) -> None:
        """The parts of `self.role` over the NATS bus (see `jetstream`): the stream is
        the hub, so each part may run on any machine, as many times as wanted."""
        c = self.config
        roles = {"producer", "broadcaster", "consumer"} if self.role == "all" else {self.role}
        bus = self.bus = await connections.enter_async_context(
            open_bus(c, f"userstreamd-{self.role}")
        )
        if roles & {"producer", "consumer"}:
            if self.role != "all" and not c.database.dsn:
                get_logger().warning(
                    "daemon.embedded_database_alone",
                    role=self.role,
                    reason="database.dsn is empty: this process writes to a PostgreSQL of "
                    "its own; roles on other machines do not see it",
                )
            self.dsn = await sup.start("database", partial(run_database, c))
            self.health.probe_now()
            source = c.producer.source
            seed = c.producer.seed or bus.epoch
            await trio.to_thread.run_sync(record_stream, c, self.dsn, bus.epoch, seed, source)
        if "broadcaster" in roles:
            mirror = StreamMirror(bus, c.broadcaster)
            self.hub = await sup.start("mirror", mirror.run)
            await self._start_broadcaster(sup, page_origins)
        if "consumer" in roles:
            for name, consumer in wiring.stream_consumers(c, bus, self.dsn, self.metrics):
                self.consumers.append(consumer)
                self._consumer_names.append(name)
                await sup.start(name, consumer.run)
        if "producer" in roles:
            stream = Stream(bus.epoch, seed, 0, 0, resumed=True)
            outlet = Outlet(bus, 0, Publisher(bus))  # (each session makes its own)
            self.producer = wiring.producer(
                c, outlet, http, stream, self.dsn, resources, self.metrics
            )
            await sup.start("producer", partial(run_producer, bus, self.producer))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Begin a graceful stop (as SIGTERM does)."""
        self._stop.set()
        self._startup.cancel()

    async def _stop_after(self, trigger: Callable[[], Awaitable[Any]]) -> None:
        await trigger()
        get_logger().info("daemon.shutdown_triggered")
        self.stop()

    def _escalate(self, reason: str) -> None:
        """The supervisor gave up on a component: stop everything, exit non-zero."""
        get_logger().error("daemon.giving_up", reason=reason)
        self.exit_code = 1
        self.giving_up = True
        self.notifier.status(f"failed: {reason}")
        self.stop()

    async def _shutdown(self, sup: Supervisor) -> None:
        log = get_logger()
        log.info("daemon.stopping", giving_up=self.giving_up)
        self.notifier.stopping("stopping" if self.giving_up else "stopping: draining consumers")
        await sup.stop("producer")
        # (what cannot drain is not waited for; on the NATS bus the stream keeps it)
        if not self.giving_up and self.config.cluster.bus == "embedded":
            await self._drain()
        self.hub.close()
        await sup.stop(*self._consumer_names)
        await sup.stop_all()
        log.info("daemon.stopped", exit_code=self.exit_code, **self._totals())

    async def _drain(self) -> None:
        """Wait (bounded) until the group has committed everything published, then store
        its final checkpoint."""
        log = get_logger()
        with trio.move_on_after(self.config.supervisor.drain_timeout_s) as drain:
            await self.hub.wait_drained()
        log.info(
            "daemon.drained" if not drain.cancelled_caught else "daemon.drain_timeout",
            last_seq=self.hub.last_seq,
            committed_through=self.committed_through(),
        )
        group = self.config.consumers.group
        if not self.hub.has_group(group):  # (no consumers)
            return
        seq, position = self.hub.watermark(group)
        if seq == 0:
            return
        checkpoint = StreamCheckpoint(group, self.hub.epoch, seq, position)
        with trio.move_on_after(self.config.supervisor.stop_timeout_s):
            try:
                await save_checkpoint(self.config, self.dsn, checkpoint)
                log.info("daemon.checkpoint_saved", seq=seq, position=position)
            except Exception as exc:  # the consumers' checkpoint stands; nothing is lost
                log.warning("daemon.checkpoint_not_saved", seq=seq, error=str(exc))

    def _totals(self) -> dict[str, Any]:
        producer = self.producer.statistics() if self.producer else None
        counts = self.counts()
        totals: dict[str, Any] = {
            "published": producer.published if producer else 0,
            "invalid": producer.invalid if producer else 0,
            "fetch_failures": dict(producer.failures_by_kind) if producer else {},
            "backpressure_waits": producer.backpressure_waits if producer else 0,
            "last_seq": counts.last_seq,
            "committed_through": self.committed_through(),
            "committed": counts.committed_total,  # by every consumer, process or not
            "rows_inserted": self.metrics.rows_inserted,
        }
        return totals

    def committed_through(self) -> int:
        if self.bus is not None:  # (the group's ack floor, as this node's consumers saw it)
            return max((c.committed_through for c in self._stream_consumers()), default=0)
        group = self.config.consumers.group
        return self.hub.watermark(group)[0] if self.hub.has_group(group) else 0

    def _stream_consumers(self) -> list[StreamConsumer]:
        return [c for c in self.consumers if isinstance(c, StreamConsumer)]

    def counts(self) -> StreamCounts:
        """Users published, committed and set aside (by source) as this daemon knows them:
        its hub's; on the NATS bus, its own producer's and consumers'."""
        hub = self.hub
        if self.bus is None:
            return StreamCounts(
                hub.published, hub.committed, hub.rejected, hub.last_seq, hub.users_committed
            )
        outlet = self.producer.hub if self.producer else None
        published = outlet.published if isinstance(outlet, Outlet) else hub.published
        last_seq = outlet.last_seq if isinstance(outlet, Outlet) else hub.last_seq
        committed: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        for consumer in self._stream_consumers():
            committed.update(consumer.committed)
            rejected.update(consumer.rejected)
        total = sum(committed.values()) + sum(rejected.values())
        return StreamCounts(published, committed, rejected, last_seq, total)

    def _status(self) -> str:
        """The one-line summary systemd shows (STATUS=): what /readyz says is wrong, if
        anything, then the stream."""
        producer = self.producer.statistics() if self.producer else None
        source = producer.active_source if producer else "-"
        rate = producer.rate_per_s if producer else 0
        problems = self.health.readiness().problems
        summary = (
            f"{self.counts().last_seq} users streamed at {rate:g}/s from {source}, "
            f"{self.hub.clients} clients, committed through seq {self.committed_through()}"
        )
        if not problems:
            return summary
        return "not ready: " + ", ".join(f"{k}: {v}" for k, v in problems.items()) + "; " + summary

    async def _keep_systemd_informed(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while the daemon's own parts are fine
        (`Readiness.alive`, what /healthz answers)."""
        if not self.notifier.enabled:
            return
        interval = min(5.0, self.notifier.watchdog_interval_s or 5.0)
        while True:
            await trio.sleep(interval)
            self.notifier.status(self._status())
            if self.notifier.watchdog_interval_s and self.health.readiness().alive:
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
        """Apply the RELOADABLE keys of the file as it is now; never fails."""
        log = get_logger()
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("daemon.reload_rejected", error=str(exc))
            self.notifier.ready(self._status())
            return
        changed = changed_keys(self.config, new)
        applied = [key for key in changed if key in RELOADABLE]
        ignored = [key for key in changed if key not in RELOADABLE]
        d = new.daemon
        configure_logging(d.log_level, d.log_format)
        if self.producer is not None:
            self.producer.set_rate(new.producer.rate_per_s)
        self.config = msgspec.structs.replace(
            self.config,
            daemon=msgspec.structs.replace(
                self.config.daemon, log_level=d.log_level, log_format=d.log_format
            ),
            producer=msgspec.structs.replace(
                self.config.producer, rate_per_s=new.producer.rate_per_s
            ),
        )
        log.info(
            "daemon.reloaded",
            applied=applied,
            log_level=d.log_level,
            rate_per_s=new.producer.rate_per_s,
        )
        if ignored:
            log.warning("daemon.reload_needs_restart", keys=ignored)
        self.notifier.ready(self._status())

    async def _log_stats(self) -> None:
        log = get_logger().bind(component="daemon")
        interval = self.config.daemon.stats_interval_s
        last_seq, last_time = self.counts().last_seq, trio.current_time()
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            streamed = self.counts().last_seq
            rate = (streamed - last_seq) / (now - last_time)
            last_seq, last_time = streamed, now
            source = self.producer.statistics().active_source if self.producer else None
            components = {
                s.name: {"state": s.state, "restarts": s.restarts, "last_exit": s.last_exit}
                for s in (self.supervisor.snapshot() if self.supervisor else [])
            }
            edge = self.broadcaster.statistics() if self.broadcaster else None
            log.info(
                "daemon.stats",
                broadcaster=edge,
                users_streamed=streamed,
                rate_per_s=round(rate, 2),
                active_clients=self.hub.clients,
                source=source,
                components=components,
                **self._totals(),
            )


async def run_daemon(
    config: Config,
    tokens: Tokens | None = None,
    ssl_context: ssl.SSLContext | None = None,
    role: str = "all",
) -> int:
    return await Daemon(config, tokens, ssl_context, role).run()
