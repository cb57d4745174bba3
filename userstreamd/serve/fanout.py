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
what it missed. Group members are admitted
by the worker (token, Origin, permission, rate) and relayed to the daemon, which holds
the groups (`Broadcaster` with ``relay``). When the daemon's stream ends (it stops), the
worker's clients get everything, then 1001.
"""

from __future__ import annotations

import math
import os
import random
import ssl
from collections.abc import Callable, Sequence
from functools import partial
from urllib.parse import urlencode

import msgspec
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from ..config import BroadcasterConfig, Config
from ..logs import bind, get_logger
from ..runtime import lifeline
from ..runtime.supervisor import describe
from ..runtime.workers import READY, stop_on_signal
from ..stream.client import open_ws
from ..stream.hub import Hub
from ..stream.mirrors import mirror_hub
from ..stream.protocol import FanoutReport, encode
from .auth import Tokens
from .broadcaster import CLOSE_GOING_AWAY, Broadcaster
from .policy import admission_policy

FEED_BATCH = 1000  # users per frame from the daemon, at most
RECONNECT_MAX_S = 2.0
REPORT_INTERVAL_S = 1.0


class _Head(msgspec.Struct):
    """What the mirror reads of a ``user`` message (the rest is kept as it came)."""

    seq: int
    position: int
    source: str


class _Welcome(msgspec.Struct):
    epoch: str
    seq: int


class _Frame(msgspec.Struct):
    type: str
    items: list[msgspec.Raw] = []
    from_seq: int | None = None  # (a gap)
    to_seq: int = 0


_frame = msgspec.json.Decoder(_Frame)
_head = msgspec.json.Decoder(_Head)
_welcome = msgspec.json.Decoder(_Welcome)


class Mirror:
    """A local hub fed from the daemon's private socket (`upstream`, a ``ws+unix://`` URL)."""

    def __init__(self, upstream: str, settings: BroadcasterConfig) -> None:
        self.upstream = upstream
        self.settings = settings
        self.hub: Hub | None = None
        self.reconnects = 0
        self.report: Callable[[], FanoutReport] | None = None  # sent upstream every second

    def _url(self, since: tuple[str, int] | None) -> str:
        query: dict[str, str | int] = {"batch": FEED_BATCH}
        if since is not None:
            query.update(epoch=since[0], since=since[1])
        return f"{self.upstream}?{urlencode(query)}"

    async def run(self, *, task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the hub until the daemon's stream ends (then the hub is closed). Reports
        the hub once it holds the history up to where the stream stood at the start."""
        log = get_logger()
        async with open_ws(self._url(None)) as ws:  # where the stream stands
            welcome = _welcome.decode(await ws.get_message())
        # (half the lag a client may have: a reader further behind than client_lag_max
        # would be told of a gap and moved to half of it)
        start = max(0, welcome.seq - self.settings.client_lag_max // 2)
        hub = self.hub = mirror_hub(self.settings, welcome.epoch, first_seq=start + 1)
        if start < welcome.seq:
            async with open_ws(self._url((hub.epoch, start))) as ws:
                await ws.get_message()  # its welcome
                while hub.last_seq < welcome.seq:
                    self._append(await ws.get_message(), hub)
        task_status.started(hub)
        delay = 0.05
        while True:
            ended = False
            try:
                async with (
                    open_ws(self._url((hub.epoch, hub.last_seq))) as ws,
                    trio.open_nursery() as nursery,
                ):
                    await ws.get_message()  # its welcome
                    delay = 0.05
                    nursery.start_soon(self._report, ws)
                    while True:
                        self._append(await ws.get_message(), hub)
            except* ConnectionClosed as group:
                exc = group.exceptions[0]
                assert isinstance(exc, ConnectionClosed)
                ended = exc.reason is not None and exc.reason.code == CLOSE_GOING_AWAY
                if not ended:
                    log.warning("fanout.upstream_lost", error=describe(exc))
            except* (OSError, HandshakeError, trio.TooSlowError) as group:
                log.warning("fanout.upstream_lost", error=describe(group))
            if ended:
                log.info("fanout.upstream_ended")
                hub.close()
                return
            self.reconnects += 1
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(RECONNECT_MAX_S, delay * 2)

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
        parsed = _frame.decode(frame)
        if parsed.type == "users":
            for item in parsed.items:
                raw = bytes(item)
                head = _head.decode(raw)
                hub.append(head.seq, raw, head.source, head.position)
        elif parsed.type == "user":
            head = _head.decode(frame)
            hub.append(head.seq, frame, head.source, head.position)
        elif parsed.type == "gap" and parsed.from_seq == parsed.to_seq == hub.last_seq + 1:
            hub.append(parsed.to_seq, frame, "", 0)  # a hole in a mirrored stream, kept


def _report(worker: int, hub: Hub, broadcaster: Broadcaster) -> FanoutReport:
    stats = hub.statistics()
    return FanoutReport(
        worker=worker,
        pid=os.getpid(),
        clients=stats.clients,
        sent=broadcaster.sent["plain"],
        slow_closes=stats.slow_disconnects,
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
