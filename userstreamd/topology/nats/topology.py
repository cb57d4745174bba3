"""The NATS topology: the stream is a JetStream stream (see `bus`), shared by any
number of producers (one publishes, holding the lease: `lease`, `outlet`),
broadcasters (each mirrors the stream into a hub of its own: `mirror`) and consumers
(members of one durable JetStream consumer: `consumer`), each on any machine, each
role a process (``run --role``) or all of them in one.

After the ops endpoint the daemon connects to the cluster, then starts the database
(producer, consumer), the stream's mirror and the broadcaster, the consumers, the
producer. Nothing is drained at a stop: the stream keeps what the group has not
acknowledged.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import partial
from typing import ClassVar

import trio

from ...config import Config
from ...consume.consumer import Milestones
from ...logs import get_logger
from ...produce.producer import Outlet as ProducerOutlet
from ...produce.producer import Producer
from ...runtime.supervisor import ComponentFn
from ...store.postgres import PostgresStore
from ...store.streams import Stream, record_stream
from ...stream.groups import MemberGroups
from ...stream.history import Pages
from ...stream.hub import Hub
from .. import PARTS, Context, Rule, Start, StreamCounts
from .bus import Bus, checked_options, open_bus
from .consumer import JetStreamReceiver, stream_consumer
from .groups import NatsGroups, declare_groups
from .history import open_history
from .mirror import StreamMirror
from .outlet import Outlet, Publisher, run_producer

OK = "ok"


class NatsTopology:
    name: ClassVar[str] = "nats"
    roles: ClassVar[frozenset[str]] = frozenset({"all", *PARTS})

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config
        self.role = context.role
        self.bus: Bus | None = None
        self.hub: Hub | None = None  # (the mirror's, once it runs)
        self.producer: Producer | None = None
        self.receivers: list[JetStreamReceiver] = []  # (this node's consumers')

    @classmethod
    def rules(cls, config: Config) -> Iterator[Rule]:
        """What the NATS bus cannot do that the embedded one can. (A WebSocket group's
        name is mapped to its consumer's: `groups.consumer_name`.)"""
        if "." in config.consumers.group:
            yield (
                "consumers.group",
                f"expected no '.' with cluster.bus = \"nats\" (it names a JetStream consumer), "
                f"got {config.consumers.group!r}",
            )

    @classmethod
    def preflight(cls, config: Config) -> None:
        checked_options(config)

    @property
    def parts(self) -> frozenset[str]:
        return PARTS if self.role == "all" else frozenset({self.role})

    @property
    def uses_database(self) -> bool:
        return bool(self.parts & {"producer", "consumer"})

    def _bus(self) -> Bus:
        assert self.bus is not None, "connect() first"
        return self.bus

    async def connect(self, stack: contextlib.AsyncExitStack) -> None:
        if self.uses_database and self.role != "all" and not self.config.database.dsn:
            get_logger().warning(
                "daemon.embedded_database_alone",
                role=self.role,
                reason="database.dsn is empty: this process writes to a PostgreSQL of "
                "its own; roles on other machines do not see it",
            )
        self.bus = await stack.enter_async_context(
            open_bus(self.config, f"userstreamd-{self.role}")
        )

    async def open_stream(self, dsn: str) -> Stream:
        bus, p = self._bus(), self.config.producer
        seed = p.seed or bus.epoch
        if self.uses_database:
            await trio.to_thread.run_sync(
                record_stream, self.config, dsn, bus.epoch, seed, p.source
            )
        return Stream(bus.epoch, seed, 0, 0, resumed=True)

    async def open_feed(self, start: Start, stream: Stream) -> Hub:
        mirror = StreamMirror(self._bus(), self.config.broadcaster)
        hub: Hub = await start("mirror", mirror.run)
        self.hub = hub
        await declare_groups(self._bus(), self.config)
        return hub

    def history(self, epoch: str, since: int) -> contextlib.AbstractAsyncContextManager[Pages]:
        """The JetStream stream from `since` + 1 (`history`)."""
        return open_history(self._bus(), epoch, since)

    def member_groups(self, hub: Hub) -> MemberGroups:
        """Each group a durable consumer of the stream (`groups`)."""
        return NatsGroups(self._bus(), self.config, hub)

    def consumers(self, url: str, dsn: str) -> list[tuple[str, ComponentFn]]:
        config, hooks = self.config, self.context.hooks
        milestones = Milestones(config.database.milestone_every)
        found: list[tuple[str, ComponentFn]] = []
        for worker in range(1, config.consumers.count + 1):
            store = PostgresStore.from_config(
                config, dsn, application_name=f"userstreamd-consumer-{worker}"
            )
            consumer, receiver = stream_consumer(
                self._bus(), store, config, worker, milestones, hooks.on_batch, hooks.on_end_to_end
            )
            self.receivers.append(receiver)
            found.append((f"consumer-{worker}", consumer.run))
        return found

    def outlet(self, stream: Stream) -> ProducerOutlet:
        bus = self._bus()
        return Outlet(bus, 0, Publisher(bus))  # (each session makes its own)

    def producer_component(self, producer: Producer) -> ComponentFn:
        self.producer = producer
        return partial(run_producer, self._bus(), producer)

    async def drain(self, dsn: str, timeout_s: float) -> None:
        return None  # (the stream keeps what the group has not acknowledged)

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()

    def _published(self) -> tuple[Mapping[str, int], int]:
        """This node's producer's (each session gives it an outlet of its own)."""
        outlet = self.producer.hub if self.producer is not None else None
        if isinstance(outlet, Outlet):
            return outlet.published, outlet.last_seq
        hub = self.hub
        return (hub.published, hub.last_seq) if hub is not None else ({}, 0)

    def counts(self) -> StreamCounts:
        published, last_seq = self._published()
        committed: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        for receiver in self.receivers:
            committed.update(receiver.committed)
            rejected.update(receiver.rejected)
        total = sum(committed.values()) + sum(rejected.values())
        return StreamCounts(published, committed, rejected, last_seq, total)

    def committed_through(self) -> int:
        """The group's ack floor, as this node's consumers saw it."""
        return max((r.committed_through for r in self.receivers), default=0)

    def checks(self, states: Mapping[str, str]) -> dict[str, str]:
        """The connection, and the role's own parts."""
        parts = self.parts
        checks = {"nats": OK if self.bus is not None and self.bus.connected else "not connected"}
        if "producer" in parts and (state := states.get("producer", "not started")) != "running":
            checks["producer"] = state
        if "consumer" in parts and self.config.consumers.count > 0:
            connected = any(r.connected for r in self.receivers)
            checks["consumers"] = OK if connected else "no consumer bound to the stream"
        return checks


TOPOLOGY = NatsTopology
