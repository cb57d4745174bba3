"""The connection to the NATS cluster, and the stream the pipeline's roles share.

`open_bus` connects (retrying until a server answers: a role waits for NATS as it waits
for its database), makes sure the stream exists as configured, and yields a `Bus`.

**One stream, numbered by position.** Every user is one message on subject
``<stream>.users``. Producers publish position *p* with ``Nats-Msg-Id = epoch:p`` and
``Nats-Expected-Last-Sequence = p - 1`` (`outlet`), so the stream's sequence number *is*
the position and the ``seq`` a WebSocket client sees: a broadcaster's resume from
``since`` and a consumer's checkpoint are stream sequences, the same on every node.

**The epoch** names the stream's life: derived from the stream's name and its creation
time (the same on every node, without coordination), so a stream deleted and made again
starts a new epoch and clients resuming the old one are told of the gap. It also seeds
the synthetic source, so every producer makes the same user for the same position.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo

from ...backoff import Backoff
from ...config import ClusterConfig, Config
from ...credentials import read_credential
from ...errors import ConfigError
from ...logs import get_logger
from .bridge import AsyncioThread, open_asyncio_thread

T = TypeVar("T")
RETRY_MAX_S = 5.0
REPEAT_LOG_S = 10.0
OP_TIMEOUT_S = 10.0  # a JetStream API request (stream info, consumer info, KV)
ATTEMPT_S = 3.0  # one attempt of `Bus.retrying` (a leader election takes 4-9 s)


# What a cluster says while it cannot serve (yet): retried.
_UNAVAILABLE = (
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoRespondersError,
)


class BusError(Exception):
    """The cluster refused what the config asks (a stream it cannot place, say)."""


@dataclass
class Bus:
    thread: AsyncioThread
    nc: Client
    js: JetStreamContext
    settings: ClusterConfig
    epoch: str

    @property
    def stream(self) -> str:
        return self.settings.stream

    @property
    def subject(self) -> str:
        return subject_of(self.settings)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a nats-py coroutine function on the client's loop (see `bridge`)."""
        return await self.thread.run(fn, *args)

    async def retrying(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`call`, again and again while the cluster does not answer (a node lost, a
        leader being elected): each attempt bounded by ATTEMPT_S, each failure logged
        as ``what``. A refusal (`nats.js.errors.APIError` other than "unavailable") and
        a deleted stream are raised (`BusError`)."""
        delays = Backoff(0.1, RETRY_MAX_S).delays()
        while True:
            with trio.move_on_after(ATTEMPT_S) as attempt:
                try:
                    return await self.call(fn, *args)
                except nats.js.errors.NotFoundError as exc:
                    if "stream" in (exc.description or "").lower():
                        raise BusError(f"stream {self.stream!r} not found: deleted?") from exc
                    raise
                except _UNAVAILABLE as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if attempt.cancelled_caught:
                error = f"no answer within {ATTEMPT_S:g} s"
            get_logger().warning(what, error=error, retry_in_s=round(delays.ceiling_s, 2))
            await delays.sleep()

    async def quietly(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """`call` as a last step (an unsubscribe at stop): shielded from cancellation,
        at most 2 s, and a failure ignored (the server forgets it with the connection)."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(2),
            contextlib.suppress(nats.errors.Error, TimeoutError),
        ):
            await self.call(fn, *args)

    async def bounds(self) -> tuple[int, int]:
        """(first, last) sequence the stream holds (first > last: it is empty, its
        users expired or purged)."""
        info = await self.retrying("nats.stream_info_failed", self.js.stream_info, self.stream)
        return int(info.state.first_seq), int(info.state.last_seq)


def subject_of(settings: ClusterConfig) -> str:
    return f"{settings.stream}.users"


def epoch_of(info: StreamInfo) -> str:
    """From the stream's name and creation time, to the microsecond in UTC (however a
    client version parses the server's timestamp, every node gets the same epoch)."""
    created = ""
    if info.created is not None:
        at = info.created if info.created.tzinfo else info.created.replace(tzinfo=UTC)
        created = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return hashlib.sha256(f"{info.config.name}|{created}".encode()).hexdigest()[:16]


def tls_context(config: Config) -> ssl.SSLContext | None:
    cl = config.cluster
    wants_tls = any(url.startswith("tls://") for url in cl.servers)
    if not (wants_tls or cl.tls_ca_file or cl.tls_cert_file):
        return None
    context = ssl.create_default_context(
        cafile=str(config.resolve(cl.tls_ca_file)) if cl.tls_ca_file else None
    )
    if cl.tls_cert_file:
        context.load_cert_chain(config.resolve(cl.tls_cert_file), config.resolve(cl.tls_key_file))
    return context


def connect_options(config: Config, name: str) -> dict[str, Any]:
    """nats.connect's keyword arguments for `config` (credentials read now)."""
    cl = config.cluster
    options: dict[str, Any] = {
        "servers": list(cl.servers),
        "name": name,
        "connect_timeout": cl.connect_timeout_s,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # never give up: the roles wait for the cluster
        "reconnect_time_wait": 0.5,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if cl.credentials_file:
        options["user_credentials"] = str(config.resolve(cl.credentials_file))
    if cl.user:
        options["user"] = cl.user
        if password := _secret(cl.password_env, "nats-password"):
            options["password"] = password
    if token := _secret(cl.token_env, "nats-token"):
        options["token"] = token
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    return options


def _secret(variable: str, credential: str) -> str | None:
    """The environment variable's value, else the systemd credential (LoadCredential=)."""
    return (variable and os.environ.get(variable)) or read_credential(credential)


def checked_options(config: Config, name: str = "userstreamd") -> dict[str, Any]:
    """`connect_options`, with the credential and TLS files read now: one that is missing
    is a config error before anything starts, not an outage."""
    cl = config.cluster
    try:
        options = connect_options(config, name)
        if cl.credentials_file:
            config.resolve(cl.credentials_file).read_bytes()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{config.path}: [cluster]: cannot read a credential: {exc}") from exc
    return options


class _Reporter:
    """nats-py's connection callbacks, as log lines. The client retries on its own (twice
    a second while no server answers), so one error repeated is logged once per
    REPEAT_LOG_S with how often it came meanwhile."""

    def __init__(self) -> None:
        self.log = get_logger().bind(component="nats")
        self.connected = False
        self._last = ("", 0.0)
        self._repeats = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
        }

    async def error(self, exc: Exception) -> None:
        text, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        if text == self._last[0] and now - self._last[1] < REPEAT_LOG_S:
            self._repeats += 1
            return
        repeated, self._repeats, self._last = self._repeats, 0, (text, now)
        if "authorization" in text.lower():  # (retried: the servers may be fixed)
            self.log.error("nats.unauthorized", error=text, hint="check [cluster] credentials")
        else:
            event = "nats.error" if self.connected else "nats.unreachable"
            self.log.warning(event, error=text, repeated=repeated)

    async def disconnected(self) -> None:
        self.connected = False
        self.log.warning("nats.disconnected")

    async def reconnected(self) -> None:
        self.connected = True
        self._last = ("", 0.0)
        self.log.info("nats.reconnected")


async def _ensure_stream(js: JetStreamContext, cl: ClusterConfig) -> StreamInfo:
    want = StreamConfig(
        name=cl.stream,
        subjects=[subject_of(cl)],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=cl.replicas,
        max_msgs=cl.max_messages,
        max_age=cl.max_age_s,
        duplicate_window=cl.duplicate_window_s,
        allow_direct=True,
    )
    try:
        info = await js.stream_info(cl.stream)
    except nats.js.errors.NotFoundError:
        try:
            return await js.add_stream(want)
        except nats.js.errors.BadRequestError:  # made meanwhile, by another node
            info = await js.stream_info(cl.stream)
    have = info.config
    if (
        have.subjects != want.subjects
        or have.num_replicas != want.num_replicas
        or have.max_msgs != want.max_msgs
        or round(have.max_age or 0) != round(cl.max_age_s)
        or round(have.duplicate_window or 0) != round(cl.duplicate_window_s)
    ):
        info = await js.update_stream(want)
    return info


async def _connect(
    options: dict[str, Any], cl: ClusterConfig, reporter: _Reporter
) -> tuple[Client, StreamInfo]:
    nc = await nats.connect(**options, **reporter.callbacks())
    reporter.connected = True
    try:
        return nc, await _ensure_stream(nc.jetstream(timeout=OP_TIMEOUT_S), cl)
    except BaseException:
        await nc.close()
        raise


@contextlib.asynccontextmanager
async def open_bus(config: Config, name: str) -> AsyncIterator[Bus]:
    """Connected to the cluster, with the stream in place, until the block ends."""
    log = get_logger().bind(component="nats")
    cl = config.cluster
    options = checked_options(config, name)
    reporter = _Reporter()
    async with open_asyncio_thread() as thread:
        delays = Backoff(0.25, RETRY_MAX_S).delays()
        while True:
            try:
                nc, info = await thread.run(_connect, options, cl, reporter)
                break
            except nats.errors.AuthorizationError as exc:
                raise BusError(f"the servers refused the credentials ([cluster]): {exc}") from exc
            except nats.js.errors.ServiceUnavailableError as exc:  # (no quorum: yet)
                log.warning(
                    "nats.unavailable", error=str(exc), retry_in_s=round(delays.ceiling_s, 2)
                )
            except nats.js.errors.APIError as exc:  # connected, but the stream was refused
                raise BusError(
                    f"stream {cl.stream!r} (replicas = {cl.replicas}): {exc.description}"
                ) from exc
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                log.warning(
                    "nats.unreachable",
                    servers=cl.servers,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delays.ceiling_s, 2),
                )
            await delays.sleep()
        bus = Bus(thread, nc, nc.jetstream(timeout=OP_TIMEOUT_S), cl, epoch_of(info))
        log.info(
            "nats.connected",
            server=nc.connected_url.netloc if nc.connected_url else None,
            stream=cl.stream,
            epoch=bus.epoch,
            last_seq=info.state.last_seq,
        )
        try:
            yield bus
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await thread.run(nc.drain)
