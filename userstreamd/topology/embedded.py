"""The embedded topology: the stream is a `Hub` in the daemon's memory.

The producer publishes into the hub; the broadcaster serves it; the consumers (trio
tasks, or child processes with ``consumers.processes``) are members of the daemon's own
group on the broadcaster's private socket, and hold the producer back (``max_lead``).
The stream resumes from the group's checkpoint in PostgreSQL (`store.streams`), and at
a graceful stop `drain` waits until the group has committed everything published, then
stores its final checkpoint. Its history is what the consumers stored
(`store.history`): a client may resume from any seq still in ``incoming_users``. One
process runs every part (``run --role all``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partial
from typing import ClassVar

import trio

from ..config import READER_CREDENTIAL, Config
from ..consume.consumer import Milestones, make_consumer
from ..errors import ConfigError
from ..logs import get_logger
from ..produce.producer import Outlet, Producer
from ..runtime.supervisor import ComponentFn
from ..runtime.workers import run_consumer_process
from ..store.history import StoredHistory
from ..store.postgres import StreamCheckpoint
from ..store.reader import READER_ROLE
from ..store.streams import Stream, open_stream, save_checkpoint
from ..stream.groups import MemberGroups
from ..stream.history import Pages
from ..stream.hub import Hub
from . import PARTS, Context, Rule, Start, StreamCounts

OK = "ok"


def build_hub(config: Config, stream: Stream, context: Context) -> Hub:
    """The hub; the daemon's own group holds the producer back only when it has consumers
    (a broadcast-only daemon waits for nobody)."""
    b, c = config.broadcaster, config.consumers
    hub = Hub(
        stream.epoch,
        first_seq=stream.seq + 1,
        buffer_messages=b.buffer_messages,
        buffer_bytes=b.buffer_bytes,
        client_lag_max=b.client_lag_max,
        group_lag_max=b.group_lag_max,
        window=c.window,
        lead_max=c.max_lead,
        on_committed=context.hooks.on_end_to_end,
    )
    if c.count > 0:
        hub.declare_group(
            c.group, watermark=stream.seq, position=stream.position, holds_producer=True
        )
    for name in b.groups:
        hub.declare_group(name)
    return hub


class EmbeddedTopology:
    name: ClassVar[str] = "embedded"
    roles: ClassVar[frozenset[str]] = frozenset({"all"})

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config
        # (before the stream opens: an empty hub, so observers always have one)
        self.hub = build_hub(self.config, Stream.new(), context)
        self._stored: StoredHistory | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @classmethod
    def rules(cls, config: Config) -> Iterator[Rule]:
        return iter(())

    @classmethod
    def preflight(cls, config: Config) -> None:
        db = config.database
        if db.listen_port and config.reader_password() is None:
            raise ConfigError(
                f"{config.path}: database.listen_port: expected a password for the "
                f"read-only role {READER_ROLE!r} in ${db.reader_password_env} or the "
                f"systemd credential {READER_CREDENTIAL!r} (the listener needs one)"
            )

    @property
    def parts(self) -> frozenset[str]:
        return PARTS

    @property
    def uses_database(self) -> bool:
        return True

    async def connect(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def open_stream(self, dsn: str) -> Stream:
        stream = await trio.to_thread.run_sync(open_stream, self.config, dsn)
        if self._stored is None:
            self._stored = StoredHistory(self.config, dsn, self._live)
            if self._stack is not None:
                self._stack.push_async_callback(self._stored.aclose)
        return stream

    def _live(self) -> tuple[str, int]:
        """The live epoch, and the seq through which the consumers committed it."""
        return self.hub.epoch, self.committed_through()

    def history(self, epoch: str, since: int) -> contextlib.AbstractAsyncContextManager[Pages]:
        assert self._stored is not None, "open_stream() first"
        return self._stored(epoch, since)

    async def open_feed(self, start: Start, stream: Stream) -> Hub:
        self.hub = build_hub(self.config, stream, self.context)
        return self.hub

    def member_groups(self, hub: Hub) -> MemberGroups:
        return hub

    def consumers(self, url: str, dsn: str) -> list[tuple[str, ComponentFn]]:
        c, config = self.config.consumers, self.config
        milestones = Milestones(config.database.milestone_every)
        found: list[tuple[str, ComponentFn]] = []
        for worker in range(1, c.count + 1):
            if config.consumer_processes:
                run: ComponentFn = partial(
                    run_consumer_process,
                    config,
                    worker,
                    url,
                    dsn,
                    stop_timeout_s=config.supervisor.stop_timeout_s,
                    running=self.context.running,
                )
            else:
                run = make_consumer(config, url, dsn, worker, milestones).run
            found.append((f"consumer-{worker}", run))
        return found

    def outlet(self, stream: Stream) -> Outlet:
        return self.hub

    def producer_component(self, producer: Producer) -> ComponentFn:
        return producer.run

    async def drain(self, dsn: str, timeout_s: float) -> None:
        """Wait (bounded) until the group has committed everything published, then store
        its final checkpoint."""
        log = get_logger()
        hub = self.hub
        with trio.move_on_after(timeout_s) as drain:
            await hub.wait_drained()
        log.info(
            "daemon.drained" if not drain.cancelled_caught else "daemon.drain_timeout",
            last_seq=hub.last_seq,
            committed_through=self.committed_through(),
        )
        group = self.config.consumers.group
        if not hub.has_group(group):  # (no consumers)
            return
        seq, position = hub.watermark(group)
        if seq == 0:
            return
        checkpoint = StreamCheckpoint(group, hub.epoch, seq, position)
        with trio.move_on_after(self.config.supervisor.stop_timeout_s):
            try:
                await save_checkpoint(self.config, dsn, checkpoint)
                log.info("daemon.checkpoint_saved", seq=seq, position=position)
            except Exception as exc:  # the consumers' checkpoint stands; nothing is lost
                log.warning("daemon.checkpoint_not_saved", seq=seq, error=str(exc))

    def close(self) -> None:
        self.hub.close()

    def counts(self) -> StreamCounts:
        hub = self.hub
        return StreamCounts(
            hub.published, hub.committed, hub.rejected, hub.last_seq, hub.users_committed
        )

    def committed_through(self) -> int:
        group = self.config.consumers.group
        return self.hub.watermark(group)[0] if self.hub.has_group(group) else 0

    def checks(self, states: Mapping[str, str]) -> dict[str, str]:
        group = self.config.consumers.group
        if self.config.consumers.count == 0:
            return {}
        members = next((g.members for g in self.hub.statistics().groups if g.name == group), 0)
        return {"consumers": OK if members else f"no member of group {group!r} connected"}


TOPOLOGY = EmbeddedTopology
