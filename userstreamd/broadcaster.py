"""The WebSocket server around the hub (trio-websocket).

Each client gets a welcome, then every user the hub publishes, in order. A client that
falls ``client_queue`` frames behind is closed with code 3008 ("slow") and never holds up
the others; at shutdown each client receives what was already queued, then a 1001 close.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from .errors import ProtocolError
from .hub import Hub, Subscription
from .logs import bind, get_logger
from .messages import Welcome, decode_client, encode

CLOSE_SLOW = 3008
CLOSE_GOING_AWAY = 1001
_RECEIVE_BUFFER = 65536


async def _read_client_frames(ws: WebSocketConnection, hub: Hub, sub: Subscription) -> None:
    log = get_logger()
    while True:
        frame = await ws.get_message()
        try:
            ack = decode_client(frame)
            hub.ack(sub, ack.seq)
        except (ProtocolError, ValueError) as exc:
            hub.bad_frames += 1
            log.warning("broadcaster.bad_frame", peer=sub.peer, error=str(exc), frame=frame[:200])


async def _serve_client(hub: Hub, request: WebSocketRequest) -> None:
    ws = await request.accept()
    peer = f"{ws.remote.address}:{ws.remote.port}"
    sub = hub.subscribe(peer)
    log = get_logger().bind(peer=peer)
    log.info("broadcaster.client_connected", clients=hub.clients)
    try:
        await ws.send_message(
            encode(Welcome(epoch=hub.epoch, seq=sub.start_seq, clients=hub.clients))
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_client_frames, ws, hub, sub)
            async for frame in sub.receive:
                await ws.send_message(frame)
            nursery.cancel_scope.cancel()
        if sub.overflowed:
            log.warning("broadcaster.client_slow", queue=hub.client_queue, code=CLOSE_SLOW)
            await ws.aclose(CLOSE_SLOW, "slow")
        else:
            await ws.aclose(CLOSE_GOING_AWAY, "server stopping")
    except* ConnectionClosed:
        reason = ws.closed
        log.info(
            "broadcaster.client_closed",
            code=reason and int(reason.code),
            reason=reason and reason.reason,
        )
    finally:
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
        bound = server.port
        get_logger().info("broadcaster.listening", host=host, port=bound)
        task_status.started(bound)
