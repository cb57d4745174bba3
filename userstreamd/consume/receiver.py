"""Receivers: where a consumer's rows come from. `Receiver` is the seam; `WebSocketReceiver`
(a group member on the broadcaster, through the one `StreamClient`) is one, the
JetStream consumer (`topology.nats.consumer`) another.

Frames: a member asks for ``users`` frames (``?batch=N``, N its batch size up to 1000)
and takes ``user`` frames as well. Each record stays the JSON text it came as: decoded
straight into typed structs (`records.decode_user`, the checks of `parse_user`, no dicts
built), then stored as that text. An invalid record is one rejection, acknowledged as
such; it never spoils the frame it came in.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..backoff import Backoff
from ..errors import InvalidRecord, ProtocolError
from ..logs import get_logger
from ..store.postgres import Envelope, StreamCheckpoint, UserRow, row_values
from ..stream.client import StreamClient, closed_with, describe_lost
from ..stream.protocol import (
    CLOSE_GOING_AWAY,
    Ack,
    Batch,
    Checkpoint,
    RawUser,
    RawUsers,
    Welcome,
    decode_server_raw,
    encode,
)
from ..stream.records import decode_user
from .writer import Item, Writer

ACK_CHUNK = 4096
RECONNECT = Backoff(0.1, 5.0)


class Rows:
    """Records into rows, counted: what every receiver does with a user it received."""

    def __init__(self) -> None:
        self.received = self.invalid = self.last_seq = 0

    def row(self, message: RawUser, received_at: datetime) -> UserRow | None:
        """The row for `message`; None (logged, counted) when its record is invalid."""
        self.received += 1
        self.last_seq = message.seq
        raw = bytes(message.user)
        try:
            user = decode_user(raw)
        except InvalidRecord as exc:
            self.invalid += 1
            get_logger().warning("consumer.invalid_record", seq=message.seq, error=str(exc))
            return None
        env = Envelope(
            message.seq,
            message.epoch,
            message.source,
            message.produced_at,
            received_at,
            message.position,
        )
        return row_values(user, raw.decode(), env)


class Receiver(Protocol):
    """Feeds a `Writer` and acknowledges what it committed."""

    url: str  # where it reads from, for logs
    rows: Rows

    @property
    def connected(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def checkpoint(self) -> StreamCheckpoint | None:
        """The group's checkpoint, written with the next batch."""
        ...

    async def receive(
        self,
        send: trio.MemorySendChannel[Item],
        writer: Writer,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Send rows to `send` until cancelled; `task_status.started()` once it reads."""
        ...

    async def acknowledge(self, seqs: list[int], rejected: list[int], report: Batch) -> None:
        """These seqs are committed (`rejected`: set aside instead: invalid or refused)."""
        ...


async def send_item(send: trio.MemorySendChannel[Item], item: Item) -> None:
    try:  # a frame's users in one go while the channel has room
        send.send_nowait(item)
    except trio.WouldBlock:
        await send.send(item)


class WebSocketReceiver:
    """A group member on the broadcaster (its URL carries ``?group=``): reconnects through
    `StreamClient`, acks each batch after its commit."""

    def __init__(
        self,
        url: str,
        *,
        backoff: Backoff = RECONNECT,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.client = StreamClient(url, token=token, ca_file=ca_file, backoff=backoff)
        self.rows = Rows()
        self._checkpoint: StreamCheckpoint | None = None

    @property
    def url(self) -> str:
        return self.client.url

    @url.setter
    def url(self, value: str) -> None:
        self.client.url = value

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    @property
    def checkpoint(self) -> StreamCheckpoint | None:
        return self._checkpoint

    async def receive(
        self,
        send: trio.MemorySendChannel[Item],
        writer: Writer,
        task_status: trio.TaskStatus[None],
    ) -> None:
        async def session(ws: WebSocketConnection, welcome: Welcome) -> None:
            nonlocal task_status
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            get_logger().info(
                "consumer.connected",
                epoch=welcome.epoch,
                seq=welcome.seq,
                clients=welcome.clients,
                group=welcome.group,
            )
            await self._receive(ws, send)

        await self.client.run(session, self._lost)

    def _lost(self, exc: BaseException) -> None:
        log = get_logger()
        (log.info if closed_with(exc, CLOSE_GOING_AWAY) else log.warning)(
            "consumer.disconnected",
            url=self.url,
            error=describe_lost(exc),
            retry_in_s=round(self.client.retry_in_s, 3),
        )

    async def _receive(self, ws: WebSocketConnection, send: trio.MemorySendChannel[Item]) -> None:
        log = get_logger()
        while True:
            frame = await ws.get_message()
            try:
                message = decode_server_raw(frame)
            except ProtocolError as exc:
                log.warning("consumer.bad_frame", error=str(exc))
                continue
            if isinstance(message, RawUser | RawUsers):
                self.client.progressed()  # it carries users: the backoff starts over
                received_at = datetime.now(UTC)
                for user in message.items if isinstance(message, RawUsers) else (message,):
                    await send_item(send, (user.seq, self.rows.row(user, received_at)))
            elif isinstance(message, Checkpoint):
                self._checkpoint = StreamCheckpoint(
                    message.group, message.epoch, message.seq, message.position
                )
            else:
                log.warning("consumer.unexpected_message", type=type(message).__name__)

    async def acknowledge(self, seqs: list[int], rejected: list[int], report: Batch) -> None:
        """Tell the broadcaster these seqs are committed (or set aside: `rejected`)."""
        ws = self.client.ws
        if ws is not None:
            # A closed connection: the broadcaster redelivers these seqs to the group, and
            # the uuid key absorbs the second insert.
            with contextlib.suppress(ConnectionClosed):
                for start in range(0, len(seqs), ACK_CHUNK):  # frames stay well under 64 KiB
                    chunk = seqs[start : start + ACK_CHUNK]
                    ack = Ack(
                        seqs=chunk,
                        rejected=sorted(set(chunk).intersection(rejected)) if rejected else [],
                        batch=report if start == 0 else None,
                    )
                    await ws.send_message(encode(ack))
