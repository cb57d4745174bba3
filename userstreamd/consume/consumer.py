"""A consumer: one `Writer` composed with one `Receiver`.

Two tasks per consumer: the *receiver* (`receiver.Receiver`) keeps its source (a
WebSocket group membership through `StreamClient`, or a JetStream durable consumer) and
turns what it gets into rows; the *writer* (`writer.Writer`) stores them in batches and
hands each committed batch back to the receiver to acknowledge. Nothing downstream asks
which receiver it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import trio

from ..backoff import Backoff
from ..config import Config
from ..logs import bind
from ..store.calls import DEFAULT_RETRY, RetryPolicy
from ..store.postgres import PostgresStore, StreamCheckpoint
from ..stream.protocol import MAX_BATCH
from .receiver import Receiver, WebSocketReceiver
from .writer import Item, Milestones, Writer

__all__ = ["Consumer", "ConsumerStatistics", "Item", "Milestones", "make_consumer"]


@dataclass(frozen=True)
class ConsumerStatistics:
    worker: int
    connected: bool
    received: int
    inserted: int
    duplicates: int
    batches: int
    invalid: int
    db_errors: int
    reconnects: int
    last_seq: int
    acked_seq: int


class Consumer:
    """`writer` storing what `receiver` gets; `run` runs both."""

    def __init__(self, writer: Writer, receiver: Receiver, *, worker: int = 1) -> None:
        self.writer, self.receiver, self.worker = writer, receiver, worker

    @classmethod
    def websocket(
        cls,
        url: str,
        store: PostgresStore,
        *,
        worker: int = 1,
        batch_size: int = 500,
        batch_interval_s: float = 0.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        milestones: Milestones | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> Consumer:
        """A member of the group in `url` (``?group=``) on a broadcaster."""
        writer = Writer(
            store,
            batch_size=batch_size,
            batch_interval_s=batch_interval_s,
            milestones=milestones,
            retry=retry,
        )
        receiver = WebSocketReceiver(
            url, backoff=Backoff(reconnect_min_s, reconnect_max_s), token=token, ca_file=ca_file
        )
        return cls(writer, receiver, worker=worker)

    @property
    def url(self) -> str:
        return self.receiver.url

    @url.setter
    def url(self, value: str) -> None:
        self.receiver.url = value

    @property
    def connected(self) -> bool:
        return self.receiver.connected

    @property
    def batch_size(self) -> int:
        return self.writer.batch_size

    @property
    def db_errors(self) -> int:
        return self.writer.db_errors

    @property
    def committed_through(self) -> int:
        """The group's checkpoint, as last received: everything up to it is committed."""
        checkpoint: StreamCheckpoint | None = self.receiver.checkpoint
        return checkpoint.seq if checkpoint else 0

    def statistics(self) -> ConsumerStatistics:
        w, rows = self.writer, self.receiver.rows
        return ConsumerStatistics(
            self.worker,
            self.connected,
            rows.received,
            w.inserted,
            w.duplicates,
            w.batches,
            rows.invalid + w.refused,
            w.db_errors,
            self.receiver.reconnects,
            rows.last_seq,
            w.acked_seq,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bind(component="consumer", worker=self.worker)
        send, receive = self.writer.channel()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.writer.run, receive, self.receiver)
                await self.receiver.receive(send, self.writer, task_status)
        finally:
            await self.writer.aclose()


def make_consumer(
    config: Config, url: str, dsn: str, worker: int, milestones: Milestones
) -> Consumer:
    """A member of the configured consumer group, as the config describes it."""
    c = config.consumers
    store = PostgresStore.from_config(
        config, dsn, application_name=f"userstreamd-consumer-{worker}"
    )
    query = {"group": c.group, "window": c.window, "batch": min(c.batch_size, MAX_BATCH)}
    return Consumer.websocket(
        f"{url}?{urlencode(query)}",
        store,
        worker=worker,
        batch_size=c.batch_size,
        batch_interval_s=c.batch_interval_s,
        reconnect_min_s=c.reconnect_min_s,
        reconnect_max_s=c.reconnect_max_s,
        milestones=milestones,
    )
