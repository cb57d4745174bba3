"""A topology written for the tests: the stream in a `Hub` in memory (as `embedded`), its
consumers plain trio tasks that are members of the hub's group *in process* (no socket):
they take users with `Hub.next_member_frames`, insert them with `PostgresStore`, then
`Hub.ack` them. It proves the `Topology` seam can be implemented by something other than
the two shipped topologies; the contract tests (test_contract.py) run against it.

Kept deliberately small: a failed insert, or a member the hub ended, ends the consumer's
component (the supervisor restarts it; what it held goes back to the group and is
inserted again, idempotently).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import ClassVar

import msgspec
import trio

from userstreamd.config import Config
from userstreamd.errors import InvalidRecord
from userstreamd.produce.producer import Outlet, Producer
from userstreamd.runtime.supervisor import ComponentFn
from userstreamd.store.history import StoredHistory
from userstreamd.store.postgres import (
    Envelope,
    PostgresStore,
    StreamCheckpoint,
    UserRow,
    row_values,
)
from userstreamd.store.streams import Stream, open_stream, save_checkpoint
from userstreamd.stream.groups import MemberGroups
from userstreamd.stream.history import Pages
from userstreamd.stream.hub import Hub
from userstreamd.stream.protocol import Batch
from userstreamd.stream.records import decode_user
from userstreamd.topology import PARTS, Context, Rule, Start, StreamCounts

OK = "ok"


class _UserFrame(msgspec.Struct, tag="user", kw_only=True):
    """A hub's ``user`` frame, the record left as JSON text."""

    epoch: str
    seq: int
    position: int
    produced_at: datetime
    source: str
    user: msgspec.Raw


_decode = msgspec.json.Decoder(_UserFrame).decode


def _row(frame: bytes, received_at: datetime) -> tuple[int, UserRow | None]:
    """(seq, row); no row for an invalid record (acknowledged as rejected)."""
    message = _decode(frame)
    raw = bytes(message.user)
    try:
        user = decode_user(raw)
    except InvalidRecord:
        return message.seq, None
    env = Envelope(message.seq, message.epoch, message.source, message.produced_at, received_at)
    return message.seq, row_values(user, raw.decode(), env)


class FakeTopology:
    name: ClassVar[str] = "fake"
    roles: ClassVar[frozenset[str]] = frozenset({"all"})

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config
        self.hub: Hub | None = None
        self.members = 0  # consumers joined to the group now

    @classmethod
    def rules(cls, config: Config) -> Iterator[Rule]:
        if config.consumers.count == 0:
            yield ("consumers.count", "expected at least 1 with the fake topology, got 0")

    @classmethod
    def preflight(cls, config: Config) -> None:
        return None

    @property
    def parts(self) -> frozenset[str]:
        return PARTS

    @property
    def uses_database(self) -> bool:
        return True

    async def connect(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    async def open_stream(self, dsn: str) -> Stream:
        # (its rows are the embedded bus's: so is its history)
        self._history = StoredHistory(
            self.config, dsn, lambda: (self._hub().epoch, self.committed_through())
        )
        self._stack.push_async_callback(self._history.aclose)
        return await trio.to_thread.run_sync(open_stream, self.config, dsn)

    def history(self, epoch: str, since: int) -> contextlib.AbstractAsyncContextManager[Pages]:
        return self._history(epoch, since)

    async def open_feed(self, start: Start, stream: Stream) -> Hub:
        c, b = self.config.consumers, self.config.broadcaster
        hub = Hub(
            stream.epoch,
            first_seq=stream.seq + 1,
            buffer_messages=b.buffer_messages,
            client_lag_max=b.client_lag_max,
            window=c.window,
            lead_max=c.max_lead,
            on_committed=self.context.hooks.on_end_to_end,
        )
        hub.declare_group(
            c.group, watermark=stream.seq, position=stream.position, holds_producer=True
        )
        self.hub = hub
        return hub

    def member_groups(self, hub: Hub) -> MemberGroups:
        return hub

    def consumers(self, url: str, dsn: str) -> list[tuple[str, ComponentFn]]:
        # (`url`, the broadcaster's socket, is not used: the members are in process)
        count = self.config.consumers.count
        return [(f"consumer-{w}", partial(self._consume, w, dsn)) for w in range(1, count + 1)]

    async def _consume(
        self,
        worker: int,
        dsn: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        hub, c = self._hub(), self.config.consumers
        store = PostgresStore.from_config(self.config, dsn, application_name=f"fake-{worker}")
        member = hub.join(c.group, f"fake-consumer-{worker}", c.window)
        self.members += 1
        try:
            task_status.started()
            while True:
                try:
                    due = await hub.next_member_frames(member, c.batch_size)
                except trio.EndOfChannel:  # the stream ended: wait to be stopped
                    await trio.sleep_forever()
                received_at = datetime.now(UTC)
                items = [_row(frame, received_at) for frame in due.users]
                if not items:  # (only a checkpoint or a gap)
                    continue
                rows = [row for _, row in items if row is not None]
                seq, position = hub.watermark(c.group)  # (committed already: durable)
                checkpoint = StreamCheckpoint(c.group, hub.epoch, seq, position) if seq else None
                started = trio.current_time()
                inserted = await trio.to_thread.run_sync(store.insert_users, rows, checkpoint)
                if self.context.hooks.on_batch is not None:
                    commit_s = trio.current_time() - started
                    self.context.hooks.on_batch(
                        Batch(rows=len(rows), inserted=inserted, commit_s=commit_s)
                    )
                rejected = [s for s, row in items if row is None]
                hub.ack(member, [s for s, _ in items], rejected)
        finally:
            self.members -= 1
            hub.leave(member)  # (what it held unacknowledged goes back to the group)
            store.close()

    def _hub(self) -> Hub:
        assert self.hub is not None, "open_feed() first"
        return self.hub

    def outlet(self, stream: Stream) -> Outlet:
        return self._hub()

    def producer_component(self, producer: Producer) -> ComponentFn:
        return producer.run

    async def drain(self, dsn: str, timeout_s: float) -> None:
        hub, group = self._hub(), self.config.consumers.group
        with trio.move_on_after(timeout_s):
            await hub.wait_drained()
        seq, position = hub.watermark(group)
        if seq:
            await save_checkpoint(
                self.config, dsn, StreamCheckpoint(group, hub.epoch, seq, position)
            )

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()

    def counts(self) -> StreamCounts:
        hub = self.hub
        if hub is None:
            return StreamCounts({}, {}, {}, 0, 0)
        return StreamCounts(
            dict(hub.published),
            dict(hub.committed),
            dict(hub.rejected),
            hub.last_seq,
            hub.users_committed,
        )

    def committed_through(self) -> int:
        return self.hub.watermark(self.config.consumers.group)[0] if self.hub else 0

    def checks(self, states: Mapping[str, str]) -> dict[str, str]:
        count = self.config.consumers.count
        if self.members == count:
            return {"consumers": OK}
        return {"consumers": f"{self.members} of {count} consumers joined"}


TOPOLOGY = FakeTopology
