"""The operations endpoint, on its own address (``[http]``, 127.0.0.1:8766 by default),
served by hypercorn behind `server`'s limits:

- ``GET /metrics``: Prometheus text format (OpenMetrics when the scraper asks);
- ``GET /healthz``: 200 while the daemon's own parts are fine (what feeds systemd's
  watchdog), else 503;
- ``GET /readyz``: 200 while every readiness check passes, else 503; the JSON body names
  each check and what is wrong with it (`health`);
- ``GET /status.json``: what the live page shows (stream, clients, components);
- ``GET /``, ``/live.js``, ``/live.css``: the live page (`userstreamd/ops/live/`).

Anything else gets 404, a method other than GET or HEAD 405; HTTP parsing and sizes are
hypercorn's, the connection limits and timeouts `server`'s. Every answer carries
``no-store`` and ``nosniff``; the page also a Content-Security-Policy that allows only
its own script and style, so record text can never run as code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import msgspec

from .health import readiness
from .metrics import Metrics
from .status import StatusFn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LIVE = resources.files(__package__) / "live"
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live.css": ("live.css", "text/css; charset=utf-8"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: https://randomuser.me; connect-src 'self' ws: wss:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
JSON = "application/json"


class OpsApp:
    """The ASGI application over the daemon's `Status` (and its metrics' registry)."""

    def __init__(self, status: StatusFn, metrics: Metrics) -> None:
        self.status = status
        self.metrics = metrics
        self.files = {path: (LIVE / name).read_bytes() for path, (name, _) in FILES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":  # not here: the stream is on the broadcaster
            await send({"type": "websocket.close", "code": 1008})
        else:
            status, content_type, body, extra = self._answer(scope)
            headers = [(b"content-type", content_type.encode()), *HEADERS, *extra]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            head = scope["method"] == "HEAD"
            await send({"type": "http.response.body", "body": b"" if head else body})

    def _answer(self, scope: Scope) -> tuple[int, str, bytes, list[tuple[bytes, bytes]]]:
        if scope["method"] not in ("GET", "HEAD"):
            return 405, JSON, b'{"error": "only GET and HEAD"}', [(b"allow", b"GET, HEAD")]
        path = scope["path"]
        if path == "/metrics":
            accept = b",".join(v for k, v in scope["headers"] if k == b"accept")
            body, content_type = self.metrics.exposition(accept.decode("latin-1"))
            return 200, content_type, body, []
        if path in ("/healthz", "/readyz"):
            found = readiness(self.status())
            ok = found.alive if path == "/healthz" else found.ready
            body = msgspec.json.encode(
                {"ready": found.ready, "alive": found.alive, "checks": found.checks}
            )
            return (200 if ok else 503), JSON, body, []
        if path == "/status.json":
            return 200, JSON, msgspec.json.encode(self.status_json()), []
        if path in FILES:
            extra = [(b"content-security-policy", CSP.encode())] if path == "/" else []
            return 200, FILES[path][1], self.files[path], extra
        return 404, JSON, b'{"error": "not found"}', []

    def status_json(self) -> dict[str, Any]:
        """What the live page shows."""
        status = self.status()
        found = readiness(status)
        feed, producer, ws = status.feed, status.producer, status.websocket
        return {
            "version": status.version,
            "ready": found.ready,
            "checks": found.checks,
            "websocket": {
                "port": ws.port,
                "scheme": ws.scheme,
                "token_required": ws.token_required,
            },
            "stream": {
                "epoch": feed.epoch
                if feed and status.broadcasting
                else None,  # (None: not open yet)
                "last_seq": feed.last_seq if feed else status.counts.last_seq,
                "committed": status.counts.committed_total,  # since the daemon started
                "committed_through": status.committed_through,
                "rate_per_s": producer.rate_per_s if producer else 0,
                "source": producer.active_source if producer else None,
            },
            "clients": {
                "plain": feed.clients if feed else 0,
                "member": feed.members if feed else 0,
            },
            "components": {c.name: c.state for c in status.components},
        }


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
