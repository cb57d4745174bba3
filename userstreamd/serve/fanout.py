"""Fan-out workers: the public WebSocket port served by several processes.

With ``broadcaster.workers = N`` the daemon holds the public port (bound with
SO_REUSEPORT, not listening) and starts N ``fanout-worker`` processes (`workers`), each
listening on that same port with SO_REUSEPORT: the kernel spreads new connections over
them, and each process writes to its own clients on its own core.

A worker is fed once, from the daemon's private socket: a `Mirror` reads the stream in
``users`` frames and appends each user's encoded frame, as the daemon numbered it, to a
local `Hub` (the same replay buffer and bounds), so plain clients see exactly what the
daemon would have sent them: the same welcome fields, epoch, seqs, resume and gaps. A
worker that (re)starts first takes up to half ``client_lag_max`` users of history from
the daemon, and serves nobody before it has them, so a client that resumes on it finds
what it missed; one that resumes from further back is replayed from the daemon's
history, through a connection of its own (`relayed`). Group members are admitted
by the worker (token, Origin, permission, rate) and relayed to the daemon, which holds
the groups (`Broadcaster` with ``relay``). When the daemon's stream ends (it stops), the
worker's clients get everything, then 1001.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Sequence
from functools import partial
from urllib.parse import urlencode

import msgspec
import trio
from trio_websocket import WebSocketConnection

from ..backoff import Backoff
from ..config import BroadcasterConfig, Config
from ..logs import bind, get_logger
from ..runtime import lifeline
from ..runtime.workers import READY, stop_on_signal
from ..stream.client import StreamClient, closed_with, describe_lost
from ..stream.hub import Hub
from ..stream.mirrors import mirror_hub
from ..stream.protocol import (
    CLOSE_GOING_AWAY,
    MAX_BATCH,
    FanoutReport,
    Welcome,
    decode_head,
    decode_kind,
    encode,
)
from .auth import Tokens
from .broadcaster import Broadcaster
from .policy import admission_policy
from .relayed import relayed_history

FEED_BATCH = MAX_BATCH  # users per frame from the daemon, at most
RECONNECT = Backoff(0.05, 2.0)
REPORT_INTERVAL_S = 1.0


class _Ended(Exception):
    """The daemon's stream ended (it closed with 1001): so does the mirror's."""


class Mirror:
    """A local hub fed from the daemon's private socket (`upstream`, a ``ws+unix://`` URL)."""

    def __init__(self, upstream: str, settings: BroadcasterConfig) -> None:
        self.upstream = upstream
        self.settings = settings
        self.hub: Hub | None = None
        self.client = StreamClient(
            f"{upstream}?{urlencode({'batch': FEED_BATCH})}", backoff=RECONNECT
        )
        self.report: Callable[[], FanoutReport] | None = None  # sent upstream every second

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    async def run(self, *, task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the hub until the daemon's stream ends (then the hub is closed). Reports
        the hub once it holds the history up to where the stream stood at the start."""
        client = self.client
        welcomes: list[Welcome] = []

        async def where_it_stands(ws: WebSocketConnection, welcome: Welcome) -> None:
            welcomes.append(welcome)

        await client.run_once(where_it_stands)
        welcome = welcomes[0]
        # (half the lag a client may have: a reader further behind than client_lag_max
        # would be told of a gap and moved to half of it)
        start = max(0, welcome.seq - self.settings.client_lag_max // 2)
        hub = self.hub = mirror_hub(self.settings, welcome.epoch, first_seq=start + 1)
        if start < welcome.seq:

            async def history(ws: WebSocketConnection, _: Welcome) -> None:
                while hub.last_seq < welcome.seq:
                    self._append(await ws.get_message(), hub)

            client.resume_after(hub.epoch, start)
            await client.run_once(history)
        task_status.started(hub)
        client.resume_after(hub.epoch, hub.last_seq)
        try:
            await client.run(partial(self._follow, hub), partial(self._lost, hub))
        except _Ended:
            get_logger().info("fanout.upstream_ended")
            hub.close()

    async def _follow(self, hub: Hub, ws: WebSocketConnection, welcome: Welcome) -> None:
        self.client.progressed()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report, ws)
            while True:
                self._append(await ws.get_message(), hub)

    def _lost(self, hub: Hub, exc: BaseException) -> None:
        if closed_with(exc, CLOSE_GOING_AWAY):
            raise _Ended from None
        get_logger().warning("fanout.upstream_lost", error=describe_lost(exc))
        self.client.resume_after(hub.epoch, hub.last_seq)

    async def _report(self, ws: WebSocketConnection) -> None:
        while True:
            if self.report is not None:
                await ws.send_message(encode(self.report()))
            await trio.sleep(REPORT_INTERVAL_S)

    @staticmethod
    def _append(message: str | bytes, hub: Hub) -> None:
        """One frame from the daemon into the hub (a gap needs nothing: the next user's
        seq starts the buffer over)."""
        frame = message.encode() if isinstance(message, str) else message
        parsed = decode_kind(frame)
        if parsed.type == "users":
            for item in parsed.items:
                raw = bytes(item)
                head = decode_head(raw)
                hub.append(head.seq, raw, head.source, head.position)
        elif parsed.type == "user":
            head = decode_head(frame)
            hub.append(head.seq, frame, head.source, head.position)
        elif parsed.type == "gap" and parsed.from_seq == parsed.to_seq == hub.last_seq + 1:
            hub.append(parsed.to_seq, frame, "", 0)  # a hole in a mirrored stream, kept


def _report(worker: int, hub: Hub, broadcaster: Broadcaster) -> FanoutReport:
    stats, edge = hub.statistics(), broadcaster.edge.statistics()
    return FanoutReport(
        worker=worker,
        pid=os.getpid(),
        clients=stats.clients,
        sent=broadcaster.sent["plain"],
        slow_closes=stats.slow_disconnects,
        write_timeouts=broadcaster.write_timeouts,
        token_lockouts=edge.token_lockouts,
        peer_faults=sum(edge.peer_faults.values()),
    )


async def run_fanout_worker(
    config: Config,
    worker: int,
    upstream: str,
    port: int,
    origins: Sequence[str],
    tokens: Tokens,
    ssl_context: ssl.SSLContext | None,
    ready_fd: int,
) -> int:
    """The child process's main: serve the public port until told to stop."""
    bind(component="fanout", worker=worker, pid=os.getpid())
    # Each worker takes its share of the connection limits (the kernel spreads
    # connections evenly), so that the totals hold as configured.
    b, n = config.broadcaster, config.broadcaster.workers
    b = msgspec.structs.replace(
        b,
        max_connections=math.ceil(b.max_connections / n),
        max_connections_per_ip=math.ceil(b.max_connections_per_ip / n),
    )
    mirror = Mirror(upstream, b)
    broadcaster = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifeline.watch, nursery.cancel_scope)
        nursery.start_soon(stop_on_signal, nursery.cancel_scope)
        hub = await nursery.start(mirror.run)
        broadcaster = Broadcaster(
            hub,
            b,
            admission_policy(config, tokens, origins),
            ssl_context=ssl_context,
            relay=upstream,
            history=relayed_history(upstream),
            history_settings=config.history,
        )
        mirror.report = partial(_report, worker, hub, broadcaster)
        await nursery.start(partial(broadcaster.run, b.host, port, reuse_port=True))
        os.write(ready_fd, READY)
        os.close(ready_fd)
    get_logger().info(
        "worker.stopped",
        last_seq=mirror.hub and mirror.hub.last_seq,
        sent=broadcaster and dict(broadcaster.sent),
        upstream_reconnects=mirror.reconnects,
    )
    return 0
