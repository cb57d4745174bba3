"""The WebSocket server around the hub: one session per admitted client.

``ws://HOST:PORT/`` is the plain broadcast: a welcome, then every user in order.
``?epoch=E&since=S`` resumes after seq S (missed users first, or a ``gap`` message when
they are gone). ``?group=NAME`` joins a consumer group instead: the member receives its
share of the users and must ``ack`` them. Who may connect and ask for what is decided in
`admission` and `edge`; this module serves the ones let in.

Close codes (`protocol` defines them; docs/protocol.md has the table):

- 1001 the server is stopping (after everything queued for the client was sent)
- 1007 a text frame that is not UTF-8; 1002 a frame that breaks the protocol
- 1008 more than ``max_messages_per_s`` messages from the client
- 1011 (fan-out workers) a group member's connection to the daemon failed; a client
  replaying from storage whose store could not be read
- 1013 a client resuming from storage while too many wait for a replay slot
- 1009 a message larger than ``max_message_bytes``
- 3008 a plain client more than ``client_lag_max`` users behind ("slow"), or one that took
  nothing for ``write_timeout_s`` while a write to it was due between two frames
  (mid-frame, no close frame can follow: its TCP connection is closed)
- 4000 a group member that held users and acknowledged none for ``ack_timeout_s``
- 4001 the member's group fell more than ``group_lag_max`` users behind and was cut off

A peer that does not answer a ping within ``pong_timeout_s`` is dead: its TCP connection
is closed without a close frame. Every close waits at most ``close_timeout_s`` for the
peer's reply.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import msgspec
import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError, WebSocketConnection

from ..config import BroadcasterConfig, HistoryConfig, is_loopback, url_host
from ..errors import InUseError, ProtocolError, address_in_use, describe, in_use_text
from ..logs import Throttle, bind, get_logger
from ..stream.client import open_ws
from ..stream.groups import MemberGroups
from ..stream.history import History, HistoryUnavailable, UnknownEpoch
from ..stream.hub import AckTimeout, GroupLagging, Hub, Member, Slow, StaleAck, Subscription
from ..stream.protocol import (
    CLOSE_ACK_TIMEOUT,
    CLOSE_GOING_AWAY,
    CLOSE_GROUP_LAGGING,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NOT_SENDABLE,
    CLOSE_RATE,
    CLOSE_SLOW,
    CLOSE_TRY_AGAIN_LATER,
    GAP_PREFIX,
    Batch,
    FanoutReport,
    Welcome,
    decode_client,
    encode,
    users_frame,
)
from .admission import Admission, Policy
from .auth import Tokens
from .edge import Edge, EdgeStatistics, raise_fd_limit, reuse_port_sockets
from .keepalive import DeadPeer, KeepAlive, Peer
from .pump import FRAMES_PER_WRITE, Plain, Pump
from .replayer import Replayer, ReplaysBusy, ReplayStatistics
from .wsconn import ServerConnection
from .wsframes import WriteTimeout, send_frames

USERS_FRAME_MAX_BYTES = 256 * 1024  # a ``users`` frame stops growing here
# what a fan-out worker's `FanoutReport` counts since its process started
FANOUT_COUNTS = ("sent", "slow_closes", "write_timeouts", "token_lockouts", "peer_faults")


class RateExceeded(Exception):
    """The client sent more messages than its rate allows."""


@dataclass(frozen=True)
class BroadcasterStatistics:
    edge: EdgeStatistics
    closed: dict[str, int]  # why sessions ended -> count
    bad_frames: int
    write_timeouts: int  # clients dropped: a write took longer than write_timeout_s
    replays: ReplayStatistics = field(default_factory=ReplayStatistics)  # resumed from storage


class TokenBucket:
    """`rate_per_s` messages a second on average, bursts of up to `burst`."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate, self.burst = rate_per_s, burst
        self.tokens, self.at = burst, trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Broadcaster:
    def __init__(
        self,
        hub: Hub,
        settings: BroadcasterConfig,
        policy: Policy,
        *,
        ssl_context: ssl.SSLContext | None = None,
        on_batch: Callable[[Batch], None] | None = None,
        relay: str | None = None,
        history: History | None = None,
        history_settings: HistoryConfig | None = None,
        groups: MemberGroups | None = None,
    ) -> None:
        """`history` serves the clients that resume from before the buffer (`replayer`;
        None: they are told of a gap). `on_batch` gets the batch reports of the daemon's
        own consumers (private socket, the group that holds the producer). With `relay`
        (a fan-out worker: the daemon's private socket), group members are admitted here
        and then relayed to the daemon, which holds the groups; `hub` is a mirror that
        serves the plain clients. `groups` are those the members join (the hub's by
        default; the daemon passes its topology's, `Topology.member_groups`)."""
        self.hub = hub
        self.groups: MemberGroups = groups or hub
        self.relay = relay
        self.settings = settings
        self.edge = Edge(settings, policy, self._session, ssl_context=ssl_context)
        self.closed: Counter[str] = Counter()
        # Messages sent, by kind of client (plain, member): each user (also inside a
        # ``users`` frame), gap and checkpoint.
        self.sent: Counter[str] = Counter()
        self.fanout: dict[int, FanoutReport] = {}  # each fan-out worker's latest report
        self.fanout_retired: Counter[str] = Counter()  # the last counts of processes gone
        self.write_timeouts = 0
        self._feeds: dict[int, int] = {}  # a worker's feed connection -> its worker number
        self.on_batch = on_batch
        self._throttle = Throttle()
        self.pump = Pump(
            hub, settings.write_timeout_s, settings.coalesce_ms / 1000, _in_frames, self.sent
        )
        self.keepalive = KeepAlive(settings.ping_interval_s, settings.pong_timeout_s)
        self.replayer = Replayer(
            hub, history, history_settings or HistoryConfig(), settings.write_timeout_s, _in_frames
        )

    def _fanout_report(self, connection: int, report: FanoutReport) -> None:
        """A worker's counts since its process started: a new process of the same
        worker starts from zero, so the last counts of the old one are kept aside."""
        old = self.fanout.get(report.worker)
        if old is not None and old.pid != report.pid:
            for count in FANOUT_COUNTS:
                self.fanout_retired[count] += getattr(old, count)
        self.fanout[report.worker] = report
        self._feeds[connection] = report.worker

    def fanout_totals(self) -> dict[str, int]:
        """The fan-out workers' plain clients now and their `FANOUT_COUNTS` (frames sent,
        slow closes, write timeouts, token lockouts, peer faults) summed, the counts of
        worker processes since gone included: the fields of `ops.status.FanoutTotals`."""
        reports = self.fanout.values()
        totals = {"clients": sum(r.clients for r in reports)}
        for count in FANOUT_COUNTS:
            totals[count] = sum(getattr(r, count) for r in reports) + self.fanout_retired[count]
        return totals

    def statistics(self) -> BroadcasterStatistics:
        return BroadcasterStatistics(
            self.edge.statistics(),
            dict(self.closed),
            self.hub.bad_frames,
            self.write_timeouts,
            self.replayer.statistics(),
        )

    async def run(
        self,
        host: str,
        port: int,
        private_path: Path | None = None,
        *,
        public: bool = True,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound public port once both doors listen.
        With `public` false the port is only held (fan-out workers serve it: each with
        `reuse_port`)."""
        bind(component="broadcaster")
        async with trio.open_nursery() as nursery:
            try:
                if public:
                    bound = await nursery.start(
                        partial(self.edge.serve_tcp, host, port, reuse_port=reuse_port)
                    )
                else:  # (relayed group members still hold a descriptor each, here)
                    raise_fd_limit(self.settings.max_connections)
                    bound = await nursery.start(_hold_port, host, port)
            except OSError as exc:
                if address_in_use(exc):
                    address = f"{url_host(host)}:{port}"
                    raise InUseError(in_use_text(address, "broadcaster.port")) from exc
                raise
            if private_path is not None:
                await nursery.start(self.edge.serve_unix, private_path)
            nursery.start_soon(self._evict_silent_members)
            nursery.start_soon(self.pump.run)
            nursery.start_soon(self.keepalive.run)
            scheme = "wss" if self.edge.ssl_context is not None else "ws"
            shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
            get_logger().info(
                "broadcaster.listening",
                url=f"{scheme}://{shown}:{bound}/",
                port=bound,
                reachable_from="this machine only" if is_loopback(host) else "other machines too",
                access="token required" if self.edge.policy.tokens.required else "no token needed",
                served_by="this process" if public else "the fan-out workers",
                consumers_socket=private_path and str(private_path),
                max_connections=self.edge.max_connections,
            )
            task_status.started(bound)

    async def _evict_silent_members(self) -> None:
        """Members silent for ``ack_timeout_s``; ad-hoc groups empty for
        ``ad_hoc_group_grace_s`` (checked once a second at most)."""
        timeout, grace = self.settings.ack_timeout_s, self.settings.ad_hoc_group_grace_s
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            for member in self.groups.evict_silent_members(timeout):
                get_logger().warning(
                    "broadcaster.member_evicted",
                    peer=member.peer,
                    group=member.group.name,
                    ack_timeout_s=timeout,
                )
            for name in self.groups.forget_empty_groups(grace):
                self._throttle.log(
                    "group_forgotten",
                    "info",
                    "broadcaster.ad_hoc_group_forgotten",
                    group=name,
                    empty_for_s=grace,
                )

    # -- one session ---------------------------------------------------------------------

    async def _session(
        self, ws: ServerConnection, admission: Admission, peer: str, private: bool
    ) -> None:
        hub = self.hub
        who = {"peer": peer, "who": admission.who}
        group = admission.group
        if group and self.relay:
            await self._relay_session(ws, admission, who)
            return
        member = self.groups.join(group, peer, admission.window) if group else None
        # (A fan-out worker's feed, on the private socket, is bounded by the buffer only.)
        lag = hub.buffer_messages if private else None
        replaying = member is None and self.replayer.needed(admission.since)
        sub = None
        if member is None:
            sub = (
                Subscription(-1, peer, 0, 0)  # (subscribed once the replay joins it live)
                if replaying
                else hub.subscribe(peer, admission.since, lag_max=lag)
            )
        # (private: the daemon's consumers, and with fan-out workers their relayed members)
        if (
            suppressed := self._throttle.allow("connected-private" if private else "connected")
        ) is not None:
            get_logger().info(
                "broadcaster.client_connected",
                **who,
                group=group,
                clients=hub.clients,
                resumed_after=admission.since and admission.since[1],
                gap=sub is not None and sub.gap is not None,
                replaying=replaying,
                suppressed=suppressed,
            )
        code, reason = None, ""  # a close we start
        ended: tuple[str, str | None] | None = None  # or how the connection ended without one
        # (a plain client is written by the pump; either is pinged by the keep-alive wheel)
        watched = Plain(ws, sub, admission.batch) if sub is not None else Peer(ws)
        try:
            await ws.send_message(
                encode(Welcome(epoch=hub.epoch, seq=hub.last_seq, clients=hub.clients, group=group))
            )
            self.keepalive.watch(watched)
            with watched.scope:
                if member is not None:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ws.read)
                        nursery.start_soon(self._read_client, ws, member, private)
                        await self._send_member(ws, member, admission.batch)
                else:
                    assert isinstance(watched, Plain)
                    read = partial(self._plain_frame, ws, watched, private, self._bucket(private))
                    if replaying:
                        assert admission.since is not None
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(
                                self._replay, watched, admission.since, lag, peer, private
                            )
                            await ws.read(read)
                            nursery.cancel_scope.cancel()
                    else:
                        await self._join(watched)
                        await ws.read(read)
                    if watched.ended is None:  # (else why it ended, below)
                        raise ConnectionClosed(ws.closed or CloseReason(1006, None))
            if watched.ended is not None:
                raise watched.ended
        except* trio.EndOfChannel:
            code, reason = CLOSE_GOING_AWAY, "server stopping"
        except* Slow:
            code, reason = CLOSE_SLOW, "slow"
        except* AckTimeout:
            code, reason = CLOSE_ACK_TIMEOUT, "ack timeout"
        except* GroupLagging:
            code, reason = CLOSE_GROUP_LAGGING, "group cut off: too far behind"
        except* RateExceeded:
            code, reason = CLOSE_RATE, "message rate exceeded"
        except* HistoryUnavailable:
            code, reason = CLOSE_INTERNAL_ERROR, "history unavailable: resume later"
        except* ReplaysBusy:
            code, reason = CLOSE_TRY_AGAIN_LATER, "too many replays: resume later"
        except* DeadPeer:
            ended = ("dead_peer", f"no pong within {self.settings.pong_timeout_s:g} s")
        except* WriteTimeout as group:
            close, ended = self._write_timed_out(group)
            code, reason = close or (code, reason)
        except* ConnectionClosed:
            closed = ws.closed
            if ended is None and code is None:  # (not the abort of a write that timed out)
                ended = (f"closed_{closed.code}", closed.reason) if closed else ("closed", None)
        finally:
            watched.finished = True
            if member is not None:
                self.groups.leave(member)
            if isinstance(watched, Plain):
                self.pump.remove(watched)
                hub.unsubscribe(watched.sub)
            if (worker := self._feeds.pop(id(ws), None)) is not None:  # a worker's feed
                self.fanout[worker] = msgspec.structs.replace(self.fanout[worker], clients=0)
        if ended is not None:
            self._ended(who, *ended)
        elif code is not None:
            self._ended(who, f"closed_{code}", reason)
            await ws.close_within(code, reason, self.settings.close_timeout_s)

    async def _join(self, watched: Plain) -> None:
        """The pump writes to the client from its cursor on (after the gap it missed)."""
        if watched.sub.gap is not None:
            gap = encode(watched.sub.gap).encode()
            await send_frames(watched.ws, [gap], self.settings.write_timeout_s)
            self.sent["plain"] += 1
        self.pump.add(watched)

    async def _replay(
        self, watched: Plain, since: tuple[str, int], lag: int | None, peer: str, private: bool
    ) -> None:
        """A task of the client's session: what it missed from storage, then live. (The
        daemon's own processes on the private socket are not bounded by the slots.)"""
        try:
            with contextlib.suppress(UnknownEpoch):  # (then the subscription tells of it)
                since = await self.replayer.replay(
                    watched.ws, since, watched.batch, bounded=not private
                )
            watched.sub = self.hub.subscribe(peer, since, lag_max=lag)
            await self._join(watched)
        except (HistoryUnavailable, ReplaysBusy, Slow, WriteTimeout, ConnectionClosed) as exc:
            watched.end(exc)
        except Exception as exc:  # (a store's fault we did not foresee: the client may resume)
            get_logger().error("broadcaster.replay_failed", peer=peer, error=describe(exc))
            watched.end(HistoryUnavailable(describe(exc)))

    async def _relay_session(
        self, ws: ServerConnection, admission: Admission, who: dict[str, str]
    ) -> None:
        """A group member on a fan-out worker: admitted here, served by the daemon
        (through its private socket, to which this worker relays frames both ways, with
        this side's message rate limit); the daemon's close code is passed on."""
        assert self.relay is not None and admission.group is not None
        query = {"group": admission.group, "window": admission.window, "batch": admission.batch}
        code, reason = CLOSE_GOING_AWAY, "server stopping"  # a close we pass on or start
        ended: tuple[str, str | None] | None = None  # or how it ended without one
        watched = Peer(ws)
        self.keepalive.watch(watched)
        try:
            with watched.scope:
                async with (
                    open_ws(f"{self.relay}?{urlencode(query)}") as upstream,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(ws.read)
                    nursery.start_soon(self._relay_acks, ws, upstream)
                    while True:
                        message = await upstream.get_message()
                        await send_frames(ws, [_utf8(message)], self.settings.write_timeout_s)
            if watched.ended is not None:
                raise watched.ended
        except* RateExceeded:
            code, reason = CLOSE_RATE, "message rate exceeded"
        except* DeadPeer:
            ended = ("dead_peer", f"no pong within {self.settings.pong_timeout_s:g} s")
        except* WriteTimeout as group:
            close, ended = self._write_timed_out(group)
            code, reason = close or (code, reason)
        except* ConnectionClosed as group:
            if ended is not None or code == CLOSE_SLOW:  # (a write that timed out)
                pass
            elif (closed := ws.closed) is not None:  # the client went away
                ended = (f"closed_{closed.code}", closed.reason)
            elif isinstance(exc := group.exceptions[0], ConnectionClosed) and exc.reason:
                code, reason = exc.reason.code, exc.reason.reason or ""
                if code in CLOSE_NOT_SENDABLE:  # the daemon went away without a close frame
                    code, reason = CLOSE_INTERNAL_ERROR, "upstream unavailable"
        except* (OSError, HandshakeError, trio.TooSlowError) as group:
            get_logger().warning("broadcaster.relay_failed", error=describe(group), **who)
            code, reason = CLOSE_INTERNAL_ERROR, "upstream unavailable"
        finally:
            watched.finished = True
        if ended is not None:
            self._ended(who, *ended)
            return
        self._ended(who, f"closed_{code}", reason)
        await ws.close_within(code, reason, self.settings.close_timeout_s)

    async def _relay_acks(self, ws: WebSocketConnection, upstream: WebSocketConnection) -> None:
        rate = self.settings.max_messages_per_s
        bucket = TokenBucket(rate, max(10.0, rate))
        while True:
            frame = await ws.get_message()
            if not bucket.take():
                raise RateExceeded
            try:  # (the daemon counts what is not an ack, except a worker's report)
                poses_as_worker = isinstance(decode_client(frame), FanoutReport)
            except ProtocolError:
                poses_as_worker = False
            if poses_as_worker:
                self.hub.bad_frames += 1
                self._throttle.log(
                    "bad_frame", "warning", "broadcaster.bad_frame", error="a fanout report"
                )
                continue
            await upstream.send_message(frame)

    def _write_timed_out(
        self, group: BaseExceptionGroup[WriteTimeout]
    ) -> tuple[tuple[int, str] | None, tuple[str, str | None] | None]:
        """A client that took nothing for ``write_timeout_s``: the close to start (3008)
        when the write stopped between two frames, else how it ended (its connection is
        already aborted)."""
        self.write_timeouts += 1
        exc = group.exceptions[0]
        if isinstance(exc, WriteTimeout) and exc.intact:
            return (CLOSE_SLOW, f"slow: {exc}"), None
        return None, ("write_timeout", f"{exc} in the middle of a frame")

    def _ended(self, who: dict[str, str], why: str, detail: str | None) -> None:
        self.closed[why] += 1
        self._throttle.log(
            why,
            "info",
            "broadcaster.client_disconnected",
            how=why,
            detail=detail,
            clients=self.hub.clients,
            **who,
        )

    async def _read_client(
        self, ws: WebSocketConnection, member: Member | None, private: bool
    ) -> None:
        """A member's frames (its acks), read by a task of the session's."""
        bucket = self._bucket(private)
        while True:
            self._client_frame(ws, await ws.get_message(), member, private, bucket)

    def _plain_frame(
        self,
        ws: ServerConnection,
        watched: Peer,
        private: bool,
        bucket: TokenBucket | None,
        frame: str | bytes,
    ) -> None:
        """A plain client's frame, handled on its session's task as it arrives: nothing
        but a fan-out worker's report (on the private socket) is expected. (Once the
        session is over, frames read while closing are ignored.)"""
        if watched.finished:
            return
        try:
            self._client_frame(ws, frame, None, private, bucket)
        except RateExceeded as exc:
            watched.end(exc)

    def _bucket(self, private: bool) -> TokenBucket | None:
        rate = self.settings.max_messages_per_s
        return None if private else TokenBucket(rate, max(10.0, rate))

    def _client_frame(
        self,
        ws: WebSocketConnection,
        frame: str | bytes,
        member: Member | None,
        private: bool,
        bucket: TokenBucket | None,
    ) -> None:
        """One message of the client's: an ack of a member's, a fan-out worker's report
        (on the private socket), or a bad frame (counted); RateExceeded over the rate."""
        if bucket is not None and not bucket.take():
            raise RateExceeded
        hub = self.hub
        try:
            ack = decode_client(frame)
            if isinstance(ack, FanoutReport):
                if not private or member is not None:  # (relayed members are members)
                    raise ProtocolError("fanout reports come from the daemon's own workers")
                self._fanout_report(id(ws), ack)
                return
            if member is None:
                raise ProtocolError("acks are for group members (connect with ?group=NAME)")
            own = private and member.group.holds_producer  # (elsewhere reports are ignored)
            if own and ack.batch is not None and self.on_batch is not None:
                self.on_batch(ack.batch)
            self.groups.ack(member, ack.seqs, frozenset(ack.rejected) if own else ())
        except StaleAck as exc:
            get_logger().debug("broadcaster.stale_ack", error=str(exc))
        except ProtocolError as exc:
            hub.bad_frames += 1
            self._throttle.log(
                "bad_frame",
                "warning",
                "broadcaster.bad_frame",
                error=str(exc)[:200],
                size=len(frame),
            )

    # Each wake-up sends everything due to the member (up to FRAMES_PER_WRITE) in one
    # write: a member that is behind catches up in few writes, one that asked for
    # ``batch`` gets its users in ``users`` frames. (Plain clients: `pump`.)

    async def _send_member(self, ws: WebSocketConnection, member: Member, batch: int) -> None:
        limit = FRAMES_PER_WRITE
        while True:
            due = await self.groups.next_member_frames(member, limit)
            await send_frames(
                ws, due.control + _in_frames(due.users, batch), self.settings.write_timeout_s
            )
            self.sent["member"] += len(due.control) + len(due.users)


def _utf8(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


def _in_frames(users: list[bytes], batch: int) -> list[bytes]:
    """One frame per user, or, for a client that asked for `batch` > 1, ``users``
    frames of up to `batch` users (and USERS_FRAME_MAX_BYTES); a lone user goes as is."""
    if batch == 1 or len(users) < 2:
        return users
    frames: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for user in users:
        if user.startswith(GAP_PREFIX):  # (a hole in a mirrored stream: never in a batch)
            if chunk:
                frames.append(users_frame(chunk) if len(chunk) > 1 else chunk[0])
                chunk, size = [], 0
            frames.append(user)
            continue
        if chunk and (len(chunk) == batch or size + len(user) > USERS_FRAME_MAX_BYTES):
            frames.append(users_frame(chunk) if len(chunk) > 1 else chunk[0])
            chunk, size = [], 0
        chunk.append(user)
        size += len(user) + 1
    if chunk:
        frames.append(users_frame(chunk) if len(chunk) > 1 else chunk[0])
    return frames


async def _hold_port(
    host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold `port` (bound with SO_REUSEPORT, not listening) until cancelled."""
    sockets = await trio.to_thread.run_sync(partial(reuse_port_sockets, host, port, listen=False))
    try:
        task_status.started(sockets[0].getsockname()[1])
        await trio.sleep_forever()
    finally:
        for sock in sockets:
            sock.close()


OPEN_POLICY = Policy(
    Tokens((), required=False), own_group="", groups=frozenset(), allow_ad_hoc_groups=True
)


async def run_broadcaster(
    hub: Hub,
    host: str,
    port: int,
    settings: BroadcasterConfig | None = None,
    policy: Policy = OPEN_POLICY,
    private_path: Path | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A `Broadcaster` serving until cancelled (the defaults: no tokens, any group)."""
    broadcaster = Broadcaster(hub, settings or BroadcasterConfig(), policy, ssl_context=ssl_context)
    await broadcaster.run(host, port, private_path, task_status=task_status)
