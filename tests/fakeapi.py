"""A fake Random User API 1.4 on 127.0.0.1 that behaves like the real one and misbehaves on cue.

Real HTTP (stdlib ``ThreadingHTTPServer`` in a daemon thread), so it serves trio tests in the
same process and a daemon running as a child process alike. Users come from
``userstreamd.sources.synthetic.synthetic_page``, so ``seed`` + ``page`` + ``results`` is
deterministic and page N of size R holds stream positions (N-1)*R+1 .. N*R.

    with FakeRandomUserAPI() as api:
        api.push(Fault.status(503), Fault.hang(2.0))   # the next two requests
        api.corrupt(3, "missing_uuid")                 # the next 200 with users
        api.down(); ...; api.up()                      # connection refused, then back

Behaviour copied from the real server (api/1.4/api.js): ``results`` outside 1..5000 or not an
integer becomes 1; ``page`` outside 1..10000 becomes 1; no ``seed`` -> a random 16-char seed,
reported in ``info.seed``; a seed of exactly 18 characters (UTF-16 units) is read as 16 seed
characters plus a 2-hex-digit index into the nationality list, which overrides ``nat``, and an
index outside the list (or not hex) fails generation: HTTP 500 with the API's generic error
(the real server throws there, and as published its process goes down); ``nat`` is a case-insensitive comma list and one invalid code drops
the filter; ``inc``/``exc`` select top-level keys; ``noinfo`` drops ``info``; repeated query
keys use the last value; any other path is a plain-text 404. The rate limit counts *users* per
window like the real one: a request is refused (429, "Whoa, ease up there cowboy") once the
users already served in the window reach the budget, so the last allowed request may overshoot.
Users are counted (`users_served`, `requests`) when a reply is generated, before it is sent:
a reply the client gave up waiting for (`Fault.hang`, a timeout) counts, as on the real server.

Deviations, on purpose: only JSON is served (``format`` is ignored except ``prettyjson``); the
real API appends a hex nat index to ``info.seed`` for a single-``nat`` request, this fake does
not; responses are HTTP/1.0 (one request per connection) so ``down()`` really refuses the next
request instead of leaving pooled keep-alive connections being served.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from userstreamd.sources.fields import FIELDS, select, selected
from userstreamd.sources.synthetic import NATIONALITIES, synthetic_page

__all__ = ["FIELDS", "FakeRandomUserAPI", "Fault", "RecordedRequest"]

VERSION = "1.4"
API_PATHS = frozenset({"/api/1.4/", "/api/1.4"})
MAX_RESULTS = 5000
MAX_PAGE = 10000
WHOA = (
    "Whoa, ease up there cowboy. You've requested {users} users in the last minute. Help us keep"
    " this service free and spare some bandwidth for other users please :)"
)
UH_OH = "Uh oh, something has gone wrong. Please tweet us @randomapi about the issue. Thank you."
HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    "<h1>Bad gateway</h1><p>The web server reported a bad gateway error.</p></body></html>"
)
CORRUPTIONS = frozenset({"missing_uuid", "bad_date"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour, consumed by one request. Build with the classmethods."""

    kind: str  # status | empty_results | html | truncated | error_json | hang
    code: int = 200
    retry_after: float | str | None = None  # seconds, or sent as is (an HTTP date)
    body: Any = None  # dict/list -> JSON, str/bytes -> sent as is
    seconds: float = 0.0

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None, body: Any = None) -> Fault:
        """HTTP `code` with a JSON error body (the real ones for 429 and 5xx by default)."""
        if body is None:
            if code == 429:
                body = {"error": WHOA.format(users=20000)}
            elif code >= 500:
                body = {"error": UH_OH}
            else:
                body = {"error": HTTPStatus(code).phrase}
        return cls("status", code=code, retry_after=retry_after, body=body)

    @classmethod
    def empty_results(cls) -> Fault:
        """HTTP 200 with ``"results": []``, as seen during real outages."""
        return cls("empty_results")

    @classmethod
    def html(cls) -> Fault:
        """HTTP 200 with a text/html error page (a proxy in the way)."""
        return cls("html", body=HTML_PAGE)

    @classmethod
    def truncated(cls) -> Fault:
        """HTTP 200, the normal JSON cut in half (Content-Length matches the cut body)."""
        return cls("truncated")

    @classmethod
    def error_json(cls, msg: str) -> Fault:
        """HTTP 200 with ``{"error": msg}`` and no results."""
        return cls("error_json", body={"error": msg})

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        """Sleep `seconds` before sending a normal answer (generated and counted at once,
        as the real server counts a page it is slow to send); other requests are served
        meanwhile."""
        return cls("hang", seconds=seconds)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    at: float  # time.monotonic() when the request arrived
    path: str
    params: dict[str, str]
    status: int
    users: int  # users in a well-formed 200 response, else 0


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    users: int = 0


class FakeRandomUserAPI:
    """The fake server; see the module docstring. Thread-safe; usable as a context manager."""

    def __init__(
        self, *, rate_limit_users: int | None = None, rate_limit_window_s: float = 300.0
    ) -> None:
        self.rate_limit_users = rate_limit_users
        self.rate_limit_window_s = rate_limit_window_s
        self.requests: list[RecordedRequest] = []
        self.users_served = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified on every fault/request
        self._faults: list[Fault] = []
        self._corruptions: list[tuple[int, str]] = []
        self._window_start = 0.0
        self._window_users = 0
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FakeRandomUserAPI is not started")
        return f"http://127.0.0.1:{self._port}/api/1.4/"

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        self._stopping.clear()
        self.up()

    def stop(self) -> None:
        """Stop listening and wake any hanging request (it is then dropped unanswered)."""
        self._stopping.set()
        self.down()

    def up(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.api = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeapi-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def down(self) -> None:
        """Close the listening socket: new connections are refused until up()."""
        server, thread = self._server, self._thread
        self._server = None
        self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeRandomUserAPI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting -----------------------------------------------------------------------------

    def push(self, *faults: Fault) -> None:
        """The next len(faults) requests get these faults in order, then normal service."""
        with self._lock:
            self._faults.extend(faults)

    def corrupt(self, count: int, kind: str) -> None:
        """Break `count` records of the next normal 200 response (the first ones)."""
        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}, expected one of {sorted(CORRUPTIONS)}")
        with self._lock:
            self._corruptions.append((count, kind))

    @property
    def pending_faults(self) -> int:
        """Pushed faults not yet taken by a request."""
        with self._lock:
            return len(self._faults)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until predicate() is true (re-checked whenever a request arrives or is
        recorded); False on timeout. From trio: ``await trio.to_thread.run_sync(...)``."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    # -- request handling (runs in handler threads) ----------------------------------------------

    def _handle(self, raw_path: str) -> tuple[_Reply, RecordedRequest] | None:
        at = time.monotonic()
        split = urlsplit(raw_path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        with self._changed:
            fault = self._faults.pop(0) if self._faults else None
            self._changed.notify_all()
        hang_s = fault.seconds if fault is not None and fault.kind == "hang" else None
        if hang_s is not None:
            fault = None
        # Generated and counted before it is sent, as the real server does: a reply the
        # client gave up waiting for (a hang) is counted all the same.
        reply = self._reply(split.path, params, fault)
        record = RecordedRequest(at, split.path, params, reply.status, reply.users)
        with self._changed:
            self.requests.append(record)
            self.users_served += reply.users
            self._changed.notify_all()
        if hang_s is not None and self._stopping.wait(hang_s):
            return None  # stop(): drop the connection unanswered
        return reply, record

    def _reply(self, path: str, params: dict[str, str], fault: Fault | None) -> _Reply:
        if fault is not None and fault.kind == "status":
            return _status_reply(fault)
        if path not in API_PATHS:
            return _Reply(404, f"Cannot GET {path}".encode(), "text/plain; charset=utf-8")
        if fault is not None and fault.kind in ("html", "error_json"):
            return _body_reply(200, fault.body)
        results = _int_param(params, "results", MAX_RESULTS)
        page = _int_param(params, "page", MAX_PAGE)
        seed = params.get("seed") or secrets.token_hex(8)
        info = {"seed": seed, "results": results, "page": page, "version": VERSION}
        if fault is not None and fault.kind == "empty_results":
            return _body_reply(200, {"results": [], "info": info})
        if fault is None and (refused := self._over_budget()) is not None:
            return _body_reply(429, {"error": WHOA.format(users=refused)})
        nats = [c for c in params.get("nat", params.get("nationality", "")).split(",") if c]
        if (nat_seed := _nat_seed(seed)) is not None:
            seed, nat = nat_seed
            if nat is None:  # the real server throws while generating
                return _body_reply(500, {"error": UH_OH})
            nats = [nat]
        fields = _fields(params)
        users = [select(u, fields) for u in synthetic_page(seed, page, results, nats)]
        if fault is None:
            self._apply_corruptions(users)
        document: dict[str, Any] = {"results": users, "info": info}
        if "noinfo" in params:
            del document["info"]
        indent = 2 if params.get("format", params.get("fmt")) in ("prettyjson", "pretty") else None
        body = json.dumps(document, ensure_ascii=False, indent=indent).encode()
        if fault is not None:  # truncated
            cut = body[: len(body) // 2].decode(errors="ignore").encode()
            return _Reply(200, cut)
        with self._lock:
            self._window_users += len(users)
        return _Reply(200, body, users=len(users))

    def _over_budget(self) -> int | None:
        """Users requested in this window if the budget is spent, else None."""
        if self.rate_limit_users is None:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self.rate_limit_window_s:
                self._window_start, self._window_users = now, 0
            if self._window_users >= self.rate_limit_users:
                return self._window_users
        return None

    def _apply_corruptions(self, users: list[dict[str, Any]]) -> None:
        with self._lock:
            corruptions, self._corruptions = self._corruptions, []
        for count, kind in corruptions:
            for user in users[:count]:
                if kind == "missing_uuid" and isinstance(user.get("login"), dict):
                    user["login"].pop("uuid", None)
                elif kind == "bad_date" and isinstance(user.get("dob"), dict):
                    user["dob"]["date"] = "not-a-date"


def _int_param(params: dict[str, str], name: str, maximum: int) -> int:
    """The real API's sanitising: anything but an integer in 1..maximum silently becomes 1."""
    raw = params.get(name, "")
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= maximum:
        return int(raw)
    return 1


def _fields(params: dict[str, str]) -> frozenset[str]:
    def names(key: str) -> list[str]:
        return [f.strip().lower() for f in params.get(key, "").split(",") if f.strip()]

    return selected(names("inc"), names("exc"))


def _nat_seed(seed: str) -> tuple[str, str | None] | None:
    """An 18-character seed read as the real server reads it: (the first 16 characters, the
    nationality its last two pick, None when they pick none); None for any other seed."""
    units = seed.encode("utf-16-le", errors="surrogatepass")
    if len(units) != 2 * 18:
        return None
    base, suffix = (p.decode("utf-16-le", errors="surrogatepass") for p in (units[:32], units[32:]))
    index = _js_parse_hex(suffix)
    nat = NATIONALITIES[index] if index is not None and 0 <= index < len(NATIONALITIES) else None
    return base, nat


def _js_parse_hex(text: str) -> int | None:
    """JavaScript's parseInt(text, 16): the leading hex digits after an optional sign and
    "0x" (None for NaN)."""
    text = text.lstrip()
    sign = -1 if text.startswith("-") else 1
    text = text[1:] if text[:1] in ("+", "-") else text
    text = text[2:] if text[:2].lower() == "0x" else text
    digits = len(text) - len(text.lstrip("0123456789abcdefABCDEF"))
    return sign * int(text[:digits], 16) if digits else None


def _body_reply(status: int, body: Any) -> _Reply:
    if isinstance(body, dict | list):
        return _Reply(status, json.dumps(body, ensure_ascii=False).encode())
    data = body.encode() if isinstance(body, str) else bytes(body)
    kind = "text/html" if data.lstrip().startswith(b"<") else "text/plain"
    return _Reply(status, data, f"{kind}; charset=utf-8")


def _status_reply(fault: Fault) -> _Reply:
    reply = _body_reply(fault.code, fault.body)
    value = fault.retry_after
    if isinstance(value, str):
        reply.headers["Retry-After"] = value
    elif value is not None:
        reply.headers["Retry-After"] = str(int(value)) if value == int(value) else str(value)
    return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: FakeRandomUserAPI


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "FakeRandomUser/1.4"

    def do_GET(self) -> None:
        handled = self.server.api._handle(self.path)
        if handled is None:
            self.close_connection = True
            return
        reply, _ = handled
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a timeout test)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read FakeRandomUserAPI.requests instead
