"""Rate control: drive a source into the hub at a steady number of users per second.

Two tasks: the *fetcher* pulls whole pages from the active source one page ahead (a
zero-capacity channel is the prefetch window), the *pacer* hands users to the hub
smoothly - as many as are due at each wake-up, never a whole page at once.

A failed fetch is retried after a delay that starts at 0.1 s and doubles up to
``retry_max_s`` (equal jitter), or after the server's ``Retry-After``. After
``failures_before_fallback`` failures in a row the circuit opens (``producer.circuit_open``);
with a fallback configured the stream continues from it (``producer.fallback_on``, and
each message's ``source`` says so) while the primary is probed every ``probe_interval_s``;
the first good answer closes the circuit and switches back (``producer.fallback_off``).
Records that fail validation are counted, logged and sent to the dead letters, never
published.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import trio

from .deadletters import DeadLetters
from .errors import InvalidRecord, SourceError
from .hub import Hub
from .logs import bind, get_logger
from .records import parse_user, scrub

MAX_CATCH_UP_S = 0.1  # at most this much of the rate is published at once after a delay


class Source(Protocol):
    name: str

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class ProducerStatistics:
    published: int
    invalid: int
    fetch_failures: int
    active_source: str
    fallback_active: bool
    circuit_open: bool
    failures_by_kind: Mapping[str, int]
    rate_per_s: float
    position: int
    backpressure_waits: int


@dataclass(frozen=True)
class Page:
    source: str
    start: int
    users: Sequence[dict[str, Any]]


def page_size_for(rate_per_s: float) -> int:
    """Users per request: about five seconds' worth, 1..5000 (the API's valid range)."""
    return max(1, min(5000, math.ceil(rate_per_s * 5)))


class Producer:
    def __init__(
        self,
        hub: Hub,
        primary: Source,
        *,
        rate_per_s: float,
        page_size: int,
        fallback: Source | None = None,
        failures_before_fallback: int = 3,
        probe_interval_s: float = 30.0,
        retry_max_s: float = 30.0,
        keep_credentials: bool = False,
        log_each_user_below_per_s: float = 5.0,
        start_position: int = 1,
        dead_letters: DeadLetters | None = None,
        stop_at_position: int = 0,
    ) -> None:
        self.hub = hub
        self.primary, self.fallback = primary, fallback
        self.rate_per_s = rate_per_s
        self.page_size = page_size
        self.failures_before_fallback = failures_before_fallback
        self.probe_interval_s = probe_interval_s
        self.retry_max_s = retry_max_s
        self.keep_credentials = keep_credentials
        self.log_each_user_below_per_s = log_each_user_below_per_s
        self.position = start_position  # next position the fetcher asks for
        self.next_position = start_position  # next position to publish (or dead-letter)
        self.published = self.invalid = self.fetch_failures = 0
        self.fallback_active = self.circuit_open = False
        self.failures_by_kind: dict[str, int] = {}
        self.dead_letters = dead_letters
        self.stop_at_position = stop_at_position
        self.backpressure_waits = 0
        self._rate_changed = trio.Event()

    def statistics(self) -> ProducerStatistics:
        active = self.fallback if self.fallback_active and self.fallback else self.primary
        return ProducerStatistics(
            self.published,
            self.invalid,
            self.fetch_failures,
            active.name,
            self.fallback_active,
            self.circuit_open,
            MappingProxyType(dict(self.failures_by_kind)),
            self.rate_per_s,
            self.position,
            self.backpressure_waits,
        )

    def set_rate(self, rate_per_s: float) -> None:
        if rate_per_s != self.rate_per_s:
            get_logger().info("producer.rate_changed", old=self.rate_per_s, new=rate_per_s)
            self.rate_per_s = rate_per_s
            self._rate_changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bind(component="producer")
        # After a crash, fetch again what was fetched but not yet published.
        self.position = self.next_position
        send, receive = trio.open_memory_channel[Page](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch_pages, send)
            if self.dead_letters is not None:
                nursery.start_soon(self.dead_letters.run)
            get_logger().info(
                "producer.started",
                source=self.primary.name,
                rate_per_s=self.rate_per_s,
                page_size=self.page_size,
            )
            task_status.started()
            await self._pace(receive)

    # -- fetcher -------------------------------------------------------------------------

    async def _fetch_pages(self, send: trio.MemorySendChannel[Page]) -> None:
        log = get_logger()
        failures, delay, next_probe = 0, 0.0, 0.0
        async with send:
            while True:
                source = self.primary
                probing = False
                if self.fallback_active and self.fallback is not None:
                    probing = trio.current_time() >= next_probe
                    source = self.primary if probing else self.fallback
                count = self.page_size
                if self.stop_at_position:
                    count = min(count, self.stop_at_position - self.position + 1)
                    if count <= 0:
                        log.info("producer.stopped_at_position", position=self.stop_at_position)
                        await trio.sleep_forever()
                try:
                    users = await source.fetch(self.position, count)
                except SourceError as exc:
                    self.fetch_failures += 1
                    self.failures_by_kind[exc.kind] = self.failures_by_kind.get(exc.kind, 0) + 1
                    if probing:
                        wait = max(self.probe_interval_s, exc.retry_after_s or 0.0)
                        next_probe = trio.current_time() + wait
                        log.info(
                            "producer.probe_failed",
                            source=source.name,
                            error=str(exc),
                            kind=exc.kind,
                            next_probe_in_s=wait,
                        )
                        continue
                    failures += 1
                    delay = min(self.retry_max_s, max(0.1, delay * 2))
                    # Equal jitter: the delay stays in [d/2, d], so delays still grow.
                    wait = (
                        exc.retry_after_s
                        if exc.retry_after_s is not None
                        else (delay * random.uniform(0.5, 1.0))
                    )
                    log.warning(
                        "producer.fetch_failed",
                        source=source.name,
                        error=str(exc),
                        kind=exc.kind,
                        consecutive=failures,
                        retry_in_s=round(wait, 3),
                    )
                    if failures == self.failures_before_fallback:
                        self.circuit_open = True
                        log.warning(
                            "producer.circuit_open", source=source.name, after_failures=failures
                        )
                        if self.fallback is not None:
                            self.fallback_active = True
                            probe_in_s = max(self.probe_interval_s, wait)
                            next_probe = trio.current_time() + probe_in_s
                            log.warning(
                                "producer.fallback_on",
                                primary=self.primary.name,
                                fallback=self.fallback.name,
                                probe_in_s=round(probe_in_s, 3),
                            )
                            continue
                    await trio.sleep(wait)
                    continue
                if source is self.primary and self.circuit_open:
                    self.circuit_open = False
                    log.warning("producer.circuit_closed", source=source.name)
                    if self.fallback_active:
                        self.fallback_active = False
                        log.warning("producer.fallback_off", primary=self.primary.name)
                if source is self.primary:
                    failures, delay = 0, 0.0
                await send.send(Page(source.name, self.position, users))
                self.position += len(users)

    # -- pacer ---------------------------------------------------------------------------

    async def _pace(self, receive: trio.MemoryReceiveChannel[Page]) -> None:
        """Publish users as they fall due: ``rate_per_s`` on average, no bursts."""
        t0, sent = trio.current_time(), 0
        async with receive:
            async for page in receive:
                index = 0
                while index < len(page.users):
                    if self._rate_changed.is_set():
                        self._rate_changed = trio.Event()
                        t0, sent = trio.current_time(), 0
                    # (+1e-6: a wake-up at the exact due time must not round down to "not yet")
                    due = int((trio.current_time() - t0) * self.rate_per_s + 1e-6) - sent
                    if due <= 0:
                        with trio.move_on_at(t0 + (sent + 1) / self.rate_per_s):
                            await self._rate_changed.wait()
                        continue
                    burst = max(1, int(self.rate_per_s * MAX_CATCH_UP_S))
                    if due > burst:
                        # Behind (a slow page, a full buffer, a busy CPU): go on at the rate
                        # from here rather than making up for lost time in one burst.
                        t0, sent, due = trio.current_time() - burst / self.rate_per_s, 0, burst
                    batch = page.users[index : index + due]
                    for offset, raw in enumerate(batch):
                        await self._publish(raw, page.source, page.start + index + offset)
                    index += len(batch)
                    sent += len(batch)
                    await trio.lowlevel.checkpoint()

    async def _publish(self, raw: dict[str, Any], source: str, position: int) -> None:
        await self._publish_or_reject(raw, source, position)
        self.next_position = position + 1

    async def _publish_or_reject(self, raw: dict[str, Any], source: str, position: int) -> None:
        try:
            user = parse_user(raw)
        except InvalidRecord as exc:
            self.invalid += 1
            get_logger().warning(
                "producer.invalid_record", source=source, position=position, error=str(exc)
            )
            if self.dead_letters is not None:
                self.dead_letters.put(source, position, str(exc), raw)
            return
        if not self.hub.has_room():
            self.backpressure_waits += 1
            get_logger().info(
                "producer.backpressure", position=position, buffered=self.hub.statistics().buffered
            )
            await self.hub.wait_for_room()
        message = self.hub.publish_nowait(
            raw if self.keep_credentials else scrub(raw), source, position
        )
        self.published += 1
        log = get_logger()
        emit = log.info if self.rate_per_s <= self.log_each_user_below_per_s else log.debug
        name = user.name
        emit(
            "producer.published",
            seq=message.seq,
            uuid=str(user.login.uuid),
            source=source,
            name=f"{name.first} {name.last}" if name else None,
            country=user.location.country if user.location else None,
            clients=self.hub.clients,
        )
