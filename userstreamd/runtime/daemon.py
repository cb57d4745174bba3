"""The daemon's life cycle: start the pipeline in order, keep it supervised, stop it.

`Daemon.run` starts the components in order under one `Supervisor`, each reporting
readiness: the operations endpoint (`ops`: metrics, health, live page) -> database ->
broadcaster -> fan-out workers (``broadcaster.workers``: then they serve the public port,
see `fanout`) -> consumers -> producer (what each is made of comes from `wiring`). On
SIGINT/SIGTERM, or when the `shutdown_trigger` given to `run` returns, it stops them in
reverse: the producer first, then waits (bounded) until every consumer has committed and
acknowledged the last published user, writes the group's final checkpoint, then stops
the consumers (together), the database probe, the broadcaster, the database and the
endpoint.
A second signal exits at once. When the supervisor gives up on a component, nothing is
drained: everything is stopped at once and the exit code is 1. SIGHUP re-reads the config
file and applies the keys in `config.RELOADABLE`; other changed keys are logged as
needing a restart.

Where the stream lives is the `Topology` the config names (`topology.choose`): the
daemon starts what it gives for this process's role, in the same order on every bus:
after the endpoint, the topology's shared connection, the database (when the role
writes to it), the stream, the broadcaster's feed and the broadcaster, the consumers,
the producer. Observers (ops, metrics, health, systemd, the stats log) read one `Status`
snapshot (`status`), never the daemon.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import msgspec
import trio

from .. import __version__
from ..config import RELOADABLE, Config, changed_keys, is_loopback, load_config, url_host
from ..errors import ConfigError
from ..logs import bind, configure_logging, get_logger, say_on_console
from ..ops.app import OpsApp
from ..ops.health import DatabaseProbe, Readiness, readiness
from ..ops.metrics import Metrics, StatusCollector
from ..ops.report import log_stats, stopped_sentence, summary_line, totals
from ..ops.server import OpsPort
from ..ops.status import FanoutTotals, Status, WebSocketInfo
from ..produce.producer import Producer
from ..serve.auth import Tokens
from ..serve.broadcaster import Broadcaster
from ..serve.edge import private_socket_path
from ..serve.policy import admission_policy
from ..store.bootstrap import run_database
from ..stream.hub import Hub
from ..topology import Context, Hooks, StreamCounts, Topology, choose, config_rules
from . import wiring
from .supervisor import Supervisor
from .systemd import Notifier


def _client_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class Daemon:
    def __init__(
        self,
        config: Config,
        tokens: Tokens | None = None,
        ssl_context: ssl.SSLContext | None = None,
        role: str = "all",
        topology: Callable[[Context], Topology] = choose,
    ) -> None:
        """`topology` makes the topology from its context (default: the one the config
        names; tests pass one of their own)."""
        self.config = config  # as started; a reload changes only the RELOADABLE keys
        self.role = role
        self.tokens = tokens or Tokens((), required=False)
        self.ssl_context = ssl_context
        self.metrics = Metrics()
        self.worker_processes: set[trio.Process] = set()
        hooks = Hooks(on_batch=self.metrics.batch, on_end_to_end=self.metrics.end_to_end)
        self.topology = topology(Context(config, role, hooks, self.worker_processes))
        self.probe = DatabaseProbe(lambda: self.dsn, config.db_password)
        self._probe_scope = trio.CancelScope()
        self._probe_done = trio.Event()
        self._probe_started = False
        self.metrics.watch(StatusCollector(self.status))
        self.broadcaster: Broadcaster | None = None
        self.ops_port: OpsPort | None = None  # (with http.enabled, once started)
        self._consumer_names: list[str] = []
        self.producer: Producer | None = None
        self.notifier = Notifier.from_environ()
        self.supervisor: Supervisor | None = None
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
                self.ops_port = OpsPort(OpsApp(self.status, self.metrics), h)
                http_port = await sup.start("http", partial(self.ops_port.serve, h.host, h.port))
                self.http_url = f"http://{url_host(_client_host(h.host))}:{http_port}/"
                page_origins = wiring.page_origins(h.host, http_port)
                log.info("daemon.http_listening", url=self.http_url)
            root.start_soon(self._run_probe)
            self._probe_started = True
            await self._start(sup, http, resources, connections, page_origins)
            log.info(
                "daemon.ready", url=self.url, http_url=self.http_url, consumers=c.consumers.count
            )
            self.ready.set()
            self.notifier.ready(self._status())
            root.start_soon(log_stats, self.status, c.daemon.stats_interval_s)
            root.start_soon(self._keep_systemd_informed)
        await self._stop.wait()
        await self._shutdown(sup)

    async def _start(
        self,
        sup: Supervisor,
        http: httpx.AsyncClient,
        resources: contextlib.ExitStack,
        connections: contextlib.AsyncExitStack,
        page_origins: list[str],
    ) -> None:
        """The parts the topology gives this role, each ready before the next starts."""
        c, topology = self.config, self.topology
        await topology.connect(connections)
        if topology.uses_database:
            self.dsn = await sup.start("database", partial(run_database, c))
            self.probe.probe_now()
        stream = await topology.open_stream(self.dsn)
        own = ""
        if "broadcaster" in topology.parts:
            hub = await topology.open_feed(sup.start, stream)
            own = await self._start_broadcaster(sup, hub, page_origins)
        if "consumer" in topology.parts:
            for name, run in topology.consumers(own, self.dsn):
                self._consumer_names.append(name)
                await sup.start(name, run)
        if "producer" in topology.parts:
            outlet = topology.outlet(stream)
            self.producer = wiring.producer(
                c, outlet, http, stream, self.dsn, resources, self.metrics
            )
            await sup.start("producer", topology.producer_component(self.producer))

    async def _start_broadcaster(self, sup: Supervisor, hub: Hub, page_origins: list[str]) -> str:
        """The broadcaster over `hub` (and its fan-out workers); its private URL."""
        c, b = self.config, self.config.broadcaster
        if b.auth == "none" and not is_loopback(b.host):
            get_logger().warning("daemon.no_auth", host=b.host, reason='auth = "none"')
        self.broadcaster = Broadcaster(
            hub,
            b,
            admission_policy(c, self.tokens, page_origins),
            ssl_context=self.ssl_context,
            on_batch=self.metrics.batch,
            history=self.topology.history,
            history_settings=c.history,
            groups=self.topology.member_groups(hub),
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
        if not self.giving_up:  # (what cannot drain is not waited for)
            await self.topology.drain(self.dsn, self.config.supervisor.drain_timeout_s)
        self.topology.close()
        await sup.stop(*self._consumer_names)
        await self._stop_probe()  # (before the database: it would see it shutting down)
        await sup.stop_all()
        say_on_console("daemon.stopped", stopped_sentence)
        log.info("daemon.stopped", exit_code=self.exit_code, **totals(self.status()))

    async def _run_probe(self) -> None:
        try:
            with self._probe_scope:
                await self.probe.run()
        finally:
            self._probe_done.set()

    async def _stop_probe(self) -> None:
        self._probe_scope.cancel()
        if self._probe_started:
            await self._probe_done.wait()

    @property
    def hub(self) -> Hub | None:
        """The broadcaster's feed (the topology's hub), once there is one."""
        return self.topology.hub

    def committed_through(self) -> int:
        return self.topology.committed_through()

    def counts(self) -> StreamCounts:
        """Users published, committed and set aside (by source) as this daemon knows them."""
        return self.topology.counts()

    def status(self) -> Status:
        """One snapshot of every part, for the observers."""
        topology, b, c = self.topology, self.broadcaster, self.config
        components = tuple(self.supervisor.snapshot()) if self.supervisor else ()
        hub = topology.hub
        return Status(
            started=self.ready.is_set(),
            stopping=self.stopping,
            components=components,
            database=self.probe.state if topology.uses_database else None,
            serves="broadcaster" in topology.parts,
            broadcasting=b is not None,
            topology_checks=topology.checks({s.name: s.state for s in components}),
            feed=hub.statistics() if hub is not None else None,
            broadcaster=b.statistics() if b else None,
            sent=dict(b.sent) if b else {},
            fanout=FanoutTotals(c.broadcaster.workers, **(b.fanout_totals() if b else {})),
            counts=topology.counts(),
            committed_through=topology.committed_through(),
            producer=self.producer.statistics() if self.producer else None,
            ops_port=self.ops_port.statistics() if self.ops_port else None,
            rows_inserted=self.metrics.rows_inserted,
            websocket=WebSocketInfo(
                self.ws_port, "wss" if self.ssl_context else "ws", self.tokens.required
            ),
        )

    def readiness(self) -> Readiness:
        return readiness(self.status())

    def _status(self) -> str:
        return summary_line(self.status())

    async def _keep_systemd_informed(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while the daemon's own parts are fine
        (`Readiness.alive`, what /healthz answers)."""
        if not self.notifier.enabled:
            return
        interval = min(5.0, self.notifier.watchdog_interval_s or 5.0)
        while True:
            await trio.sleep(interval)
            status = self.status()
            self.notifier.status(summary_line(status))
            if self.notifier.watchdog_interval_s and readiness(status).alive:
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
            new = load_config(self.config.path, rules=config_rules)
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


async def run_daemon(
    config: Config,
    tokens: Tokens | None = None,
    ssl_context: ssl.SSLContext | None = None,
    role: str = "all",
) -> int:
    return await Daemon(config, tokens, ssl_context, role).run()
