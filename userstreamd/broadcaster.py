"""The WebSocket server around the hub (trio-websocket).

``ws://HOST:PORT/`` is the plain broadcast: a welcome, then every user in order.
``?epoch=E&since=S`` resumes after seq S (missed users first, or a ``gap`` message when
they are gone). ``?group=NAME`` joins a consumer group instead: the member receives its
share of the users and must ``ack`` them. Close codes: 3008 ("slow") for a plain client
that fell too far behind, 1008 for a request the server cannot parse, 1001 at shutdown
after everything queued for the client was sent.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from .errors import ProtocolError
from .hub import Hub, Member, Slow, StaleAck, Subscription
from .logs import bind, get_logger
from .messages import Welcome, decode_client, encode

CLOSE_SLOW = 3008
CLOSE_GOING_AWAY = 1001
CLOSE_BAD_REQUEST = 1008
SLOW_CLOSE_TIMEOUT_S = 10.0
_RECEIVE_BUFFER = 65536


def _query(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


async def _read_acks(ws: WebSocketConnection, hub: Hub, member: Member | None) -> None:
    log = get_logger()
    while True:
        frame = await ws.get_message()
        try:
            ack = decode_client(frame)
            if member is None:
                raise ProtocolError("acks are for group members (connect with ?group=NAME)")
            hub.ack(member, ack.seqs)
        except StaleAck as exc:
            log.debug("broadcaster.stale_ack", error=str(exc))
        except ProtocolError as exc:
            hub.bad_frames += 1
            log.warning("broadcaster.bad_frame", error=str(exc), frame=str(frame)[:200])


async def _send_plain(ws: WebSocketConnection, hub: Hub, sub: Subscription) -> None:
    if sub.gap is not None:
        await ws.send_message(encode(sub.gap))
    while True:
        await ws.send_message(await hub.next_frame(sub))


async def _abort_if_stuck(hub: Hub, sub: Subscription) -> None:
    """A cut-off client normally learns it at its next frame (close 3008). One whose
    socket takes nothing more for SLOW_CLOSE_TIMEOUT_S is dropped without ceremony."""
    await hub.wait_cut_off(sub)
    await trio.sleep(SLOW_CLOSE_TIMEOUT_S)
    raise Slow(f"stuck: took nothing for {SLOW_CLOSE_TIMEOUT_S:g} s after it was cut off")


async def _send_member(ws: WebSocketConnection, hub: Hub, member: Member) -> None:
    while True:
        await ws.send_message(await hub.next_member_frame(member))


async def _serve_client(hub: Hub, request: WebSocketRequest) -> None:
    ws = await request.accept()
    peer = f"{ws.remote.address}:{ws.remote.port}"  # type: ignore[union-attr]
    log = get_logger().bind(peer=peer)
    query = _query(request.path)
    try:
        since = (query["epoch"], int(query["since"])) if "since" in query else None
    except (KeyError, ValueError):
        await ws.aclose(CLOSE_BAD_REQUEST, "since needs an integer seq and an epoch")
        return
    group = query.get("group") or None
    try:
        window = min(100_000, int(query.get("window", hub.window)))
    except ValueError:
        await ws.aclose(CLOSE_BAD_REQUEST, "window needs an integer")
        return
    member = hub.join(group, peer, max(1, window)) if group else None
    sub = None if member else hub.subscribe(peer, since)
    log.info(
        "broadcaster.client_connected",
        group=group,
        clients=hub.clients,
        resumed_after=since and since[1],
        gap=sub is not None and sub.gap is not None,
    )
    try:
        await ws.send_message(
            encode(Welcome(epoch=hub.epoch, seq=hub.last_seq, clients=hub.clients, group=group))
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_acks, ws, hub, member)
                if member is not None:
                    await _send_member(ws, hub, member)
                else:
                    assert sub is not None
                    nursery.start_soon(_abort_if_stuck, hub, sub)
                    await _send_plain(ws, hub, sub)
        except* trio.EndOfChannel:
            await ws.aclose(CLOSE_GOING_AWAY, "server stopping")
        except* Slow as slow:
            log.warning(
                "broadcaster.client_slow",
                code=CLOSE_SLOW,
                error=str(slow.exceptions[0]),
                lag_max=hub.client_lag_max,
            )
            with trio.move_on_after(1):
                await ws.aclose(CLOSE_SLOW, "slow")
    except* ConnectionClosed:
        reason = ws.closed
        log.info(
            "broadcaster.client_closed",
            code=reason and int(reason.code),
            reason=reason and reason.reason,
        )
    finally:
        if member is not None:
            hub.leave(member)
        if sub is not None:
            hub.unsubscribe(sub)
        log.info("broadcaster.client_disconnected", clients=hub.clients)


async def run_broadcaster(
    hub: Hub, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; reports the bound port when listening."""
    bind(component="broadcaster")

    async def handler(request: WebSocketRequest) -> None:
        await _serve_client(hub, request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler,
                host,
                port,
                None,
                receive_buffer_size=_RECEIVE_BUFFER,
                message_queue_size=16,
                task_status=task_status,
            )
        )
        get_logger().info("broadcaster.listening", host=host, port=server.port)
        task_status.started(server.port)
