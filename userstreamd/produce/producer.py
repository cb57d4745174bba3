"""Rate control: drive a source into the hub at a steady number of users per second.

Two tasks: the *fetcher* pulls whole pages from the active source one page ahead (a
zero-capacity channel is the prefetch window), the *pacer* hands users to the hub
smoothly - as many as are due at each wake-up, never a whole page at once.

The pacer keeps the rate over time, not only between wake-ups: users that fell due while
the loop was busy elsewhere (a slow page, a busy CPU) are a debt it pays back in bursts of
at most `MAX_BURST_S` of the rate, with a checkpoint between bursts. The debt is capped at
`MAX_DEBT_S` of the rate (beyond that the machine is not keeping up, and lost time is
forgiven). Time spent waiting for room in the hub (backpressure) or for the next page (a
source that is late or down) is never owed: no burst follows an outage.

Failures of the primary source go through a `Circuit`. Closed: a failed fetch is retried
after a delay that starts at 0.1 s and doubles up to ``retry_max_s`` (equal jitter), or
after the server's ``Retry-After``. After ``failures_before_fallback`` failures in a row it
opens (``producer.circuit_open``), and at once on a 429 without ``Retry-After`` (the API's
rate limit: its window is minutes long and retrying sooner only earns more 429s; the next
try waits ``probe_interval_s``). With a fallback configured the stream then continues from
it (``producer.fallback_on``, and each message's ``source`` says so) while the primary is
probed every ``probe_interval_s``, never waiting for the primary's budget (a probe that
would wait is postponed); the first good answer closes the circuit and switches back
(``producer.fallback_off``). Records that fail validation are counted, logged and sent to
the dead letters, never published.

A spent budget (the primary's `Source.ready_in_s` > 0: the Random User API's users per
window) is an open circuit too: with a fallback the stream switches to it at once
(``producer.budget_spent``, ``producer.fallback_on``) and back when the window has room
for a page, the moment the probe is due; without one the stream waits, says so once at
warning (``producer.budget_wait``, with ``until``) and `ProducerStatistics` names the time
(`readiness` turns it into a ``source`` check).

A run of failures is said once: the first ``producer.fetch_failed`` at warning, then
``producer.circuit_open``/``fallback_on``; the retries and probes that fail after it are
logged at debug, with a reminder at info at most every `REMIND_EVERY_S` (with
``failures``, the count so far).

Each record is validated once. A source that prepares its pages (`PreparingSource`: the
synthetic one, in a child process for big pages) hands over users already validated and
encoded, which go to the hub as they are (``msgspec.Raw``); the others' records are
validated here (`records.parse_user`). A per-user log line (``producer.published``: at
info below ``log_each_user_below_per_s``, else at debug) costs nothing when its level is
off; when on, a prepared user is decoded for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import msgspec
import trio

from ..backoff import Backoff
from ..errors import InvalidRecord, SourceError
from ..logs import bind, get_logger
from ..sources.pagegen import PreparedPage
from ..stream.protocol import UserMessage
from ..stream.records import User, parse_user, scrub
from .deadletters import DeadLetters

MAX_BURST_S = 0.1  # at most this much of the rate is published between two checkpoints
MAX_BURST_USERS = 500  # ... and at most this many users (other tasks run in between)
MAX_DEBT_S = 3.0  # at most this much of the rate is owed after the loop was held up
RETRY_MIN_S = 0.1  # the first retry delay of the closed circuit
MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is read as this (the server may be wrong)
REMIND_EVERY_S = 300.0  # a source still failing is said again (at info) at most this often


class Outlet(Protocol):
    """Where the producer publishes: the topology's (`stream.hub.Hub` on the embedded
    bus, `topology.nats.outlet.Outlet`, a JetStream stream, on the NATS bus)."""

    @property
    def clients(self) -> int: ...

    @property
    def buffered(self) -> int: ...

    def has_room(self) -> bool: ...

    async def wait_for_room(self) -> None: ...

    def publish_nowait(
        self, user: dict[str, Any] | msgspec.Raw, source: str, position: int
    ) -> UserMessage: ...


class Source(Protocol):
    name: str

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]: ...

    async def ready_in_s(self) -> float:
        """Seconds before `fetch` would send a request without waiting (0: now): a spent
        budget. May read what it needs once (the budget's ledger)."""
        ...


@runtime_checkable
class PreparingSource(Source, Protocol):
    """A source whose users arrive validated and encoded: not validated again here."""

    async def fetch_prepared(
        self, start: int, count: int, *, keep_credentials: bool
    ) -> PreparedPage: ...

    async def release(self) -> None:
        """Stop what `fetch_prepared` started (a child process); called when `run` ends."""
        ...


@dataclass(frozen=True)
class ProducerStatistics:
    published: int
    invalid: int
    fetch_failures: int
    active_source: str  # of the users going out now
    fallback_active: bool  # ... and that is the fallback
    circuit_open: bool
    failures_by_kind: Mapping[str, int]
    invalid_by_source: Mapping[str, int]
    rate_per_s: float
    position: int
    backpressure_waits: int
    budget_remaining_users: float | None = None  # the API's budget, when it has one
    budget_wait_until: str | None = None  # no users until then (ISO UTC): a spent budget
    # and no fallback


@dataclass(frozen=True)
class Page:
    source: str
    start: int
    users: Sequence[dict[str, Any]] | Sequence[msgspec.Raw]  # raw records, or prepared
    rejected: Mapping[int, str] = field(default_factory=dict)  # prepared: index -> why


_decode_user = msgspec.json.Decoder(User).decode


def page_size_for(rate_per_s: float) -> int:
    """Users per request: about five seconds' worth, 1..5000 (the API's valid range)."""
    return max(1, min(5000, math.ceil(rate_per_s * 5)))


class Circuit:
    """When the primary source may be tried next, after its failures (no I/O, no sleeping).

    Closed: every attempt goes to the primary; a failure waits `Retry-After` (at most
    `MAX_RETRY_AFTER_S`) or the backoff delay (a 429 without `Retry-After`:
    `probe_interval_s`). Open (after `failures_to_open` failures in a row, or at once on a
    429 without `Retry-After` or a `Retry-After` longer than `probe_interval_s`): with a
    `fallback` the primary is only probed, at most every `probe_interval_s`; without one,
    retries go on as when closed. The first success closes it."""

    def __init__(
        self,
        *,
        failures_to_open: int,
        probe_interval_s: float,
        retry_max_s: float,
        fallback: bool,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.probe_interval_s = probe_interval_s
        self.retry_max_s = retry_max_s
        self.fallback = fallback
        self.is_open = False
        self.failures = 0  # in a row
        self.retry_at = -math.inf  # the primary is not tried before this time
        self._delays = Backoff(min(RETRY_MIN_S, retry_max_s), retry_max_s).delays()

    def failed(self, now: float, *, retry_after_s: float | None, rate_limited: bool) -> float:
        """Count a failure of the primary at `now`; the seconds until it may be tried again."""
        self.failures += 1
        backoff_s = self._delays.next_s()  # (grows with every failure, whatever waits)
        if retry_after_s is not None:
            wait = min(retry_after_s, MAX_RETRY_AFTER_S)
            if wait > self.probe_interval_s:  # too long to hold the stream: open
                self.is_open = True
        elif rate_limited:  # the window is minutes long: sooner only earns more 429s
            wait = self.probe_interval_s
            self.is_open = True
        else:
            wait = backoff_s
        if self.failures >= self.failures_to_open:
            self.is_open = True
        if self.is_open and self.fallback:
            wait = max(wait, self.probe_interval_s)
        self.retry_at = now + wait
        return wait

    def succeeded(self) -> bool:
        """Count a success of the primary; True if that closed the circuit."""
        was_open = self.is_open
        self.is_open, self.failures = False, 0
        self._delays.reset()
        self.retry_at = -math.inf
        return was_open

    def postpone(self, until: float) -> None:
        """The primary cannot be tried before `until` (say, its budget is spent)."""
        self.retry_at = max(self.retry_at, until)

    def open_until(self, until: float) -> None:
        """Open without a failure: the primary must not be tried before `until` (its
        budget is spent); the first success after closes it as usual."""
        self.is_open = True
        self.postpone(until)


class _Reminder:
    """How loudly to say a failure of a run: the first at warning, the rest at debug, with
    a reminder at info at most every `REMIND_EVERY_S`."""

    def __init__(self) -> None:
        self._said_at = -math.inf

    def level(self, now: float, failures: int) -> str:
        """The level for the `failures`-th failure in a row, at `now`."""
        if failures == 1:
            self._said_at = now
            return "warning"
        if now - self._said_at >= REMIND_EVERY_S:
            self._said_at = now
            return "info"
        return "debug"


class _Schedule:
    """Users due at `rate_per_s` since a start time, minus those sent: the pacer's debt."""

    def __init__(self, rate_per_s: float, now: float) -> None:
        self.rate_per_s, self.t0, self.sent = rate_per_s, now, 0

    def due(self, now: float) -> int:
        """Users due now, at most `MAX_DEBT_S` worth (older debt is forgiven)."""
        # (+1e-6: a wake-up at the exact due time must not round down to "not yet")
        due = int((now - self.t0) * self.rate_per_s + 1e-6) - self.sent
        cap = max(1, int(self.rate_per_s * MAX_DEBT_S))
        if due > cap:
            self.t0 += (due - cap) / self.rate_per_s
            due = cap
        return due

    def next_due_at(self) -> float:
        return self.t0 + (self.sent + 1) / self.rate_per_s

    def not_owed(self, seconds: float) -> None:
        """`seconds` (waiting for room in the hub, or for a late page) are not owed."""
        self.t0 += seconds


class Producer:
    def __init__(
        self,
        hub: Outlet,
        primary: Source,
        *,
        rate_per_s: float,
        page_size: int,
        page_size_for_rate: Callable[[float], int] | None = None,
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
        self.page_size_for_rate = page_size_for_rate  # (None: fixed, as the API's pages are)
        self.circuit = Circuit(
            failures_to_open=failures_before_fallback,
            probe_interval_s=probe_interval_s,
            retry_max_s=retry_max_s,
            fallback=fallback is not None,
        )
        self.keep_credentials = keep_credentials
        self.log_each_user_below_per_s = log_each_user_below_per_s
        self.position = start_position  # next position the fetcher asks for
        self.next_position = start_position  # next position to publish (or dead-letter)
        self.published = self.invalid = self.fetch_failures = 0
        self.failures_by_kind: dict[str, int] = {}
        self.invalid_by_source: dict[str, int] = {}
        self.dead_letters = dead_letters
        self.stop_at_position = stop_at_position
        self.backpressure_waits = 0
        self.budget_wait_until: str | None = None  # see ProducerStatistics
        self._reminder = _Reminder()  # how loudly the primary's next failure is said
        self._publishing: str | None = None  # the source of the page being published
        self._rate_changed = trio.Event()

    @property
    def circuit_open(self) -> bool:
        return self.circuit.is_open

    @property
    def fallback_active(self) -> bool:
        """The next pages come from the fallback (`statistics` says which source the
        users going out now are from)."""
        return self.circuit.is_open and self.fallback is not None

    def statistics(self) -> ProducerStatistics:
        # The source of the users going out now (the page being published; the next one,
        # from the other source, may already be fetched), else the one asked first.
        fetching = self.fallback if self.fallback_active and self.fallback else self.primary
        active = self._publishing or fetching.name
        return ProducerStatistics(
            self.published,
            self.invalid,
            self.fetch_failures,
            active,
            self.fallback is not None and active != self.primary.name,
            self.circuit_open,
            MappingProxyType(dict(self.failures_by_kind)),
            MappingProxyType(dict(self.invalid_by_source)),
            self.rate_per_s,
            self.position,
            self.backpressure_waits,
            self._budget_remaining(),
            self.budget_wait_until,
        )

    def _budget_remaining(self) -> float | None:
        budget = getattr(self.primary, "budget", None)  # (the Random User API's)
        return budget.remaining(trio.current_time()) if budget is not None else None

    def set_rate(self, rate_per_s: float) -> None:
        if rate_per_s != self.rate_per_s:
            get_logger().info("producer.rate_changed", old=self.rate_per_s, new=rate_per_s)
            self.rate_per_s = rate_per_s
            if self.page_size_for_rate is not None:
                self.page_size = self.page_size_for_rate(rate_per_s)
            self._rate_changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        bind(component="producer")
        # After a crash, fetch again what was fetched but not yet published.
        self.position = self.next_position
        send, receive = trio.open_memory_channel[Page](0)
        try:
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
        finally:
            with trio.CancelScope(shield=True):  # (bounded: see the sources' `release`)
                for source in (self.primary, self.fallback):
                    if isinstance(source, PreparingSource):
                        await source.release()  # (twice if it is both: harmless)

    # -- fetcher -------------------------------------------------------------------------

    async def _fetch_pages(self, send: trio.MemorySendChannel[Page]) -> None:
        async with send:
            while True:
                count = self.page_size
                if self.stop_at_position:
                    count = min(count, self.stop_at_position - self.position + 1)
                    if count <= 0:
                        get_logger().info(
                            "producer.stopped_at_position", position=self.stop_at_position
                        )
                        await trio.sleep_forever()
                source = await self._next_source()
                try:
                    page = await self._fetch(source, count)
                except SourceError as exc:
                    await self._failed(source, exc)
                    continue
                if source is self.primary and self.circuit.succeeded():
                    get_logger().warning("producer.circuit_closed", source=source.name)
                    if self.fallback is not None:
                        get_logger().warning("producer.fallback_off", primary=source.name)
                await send.send(page)
                self.position += len(page.users)

    async def _fetch(self, source: Source, count: int) -> Page:
        if isinstance(source, PreparingSource):
            prepared = await source.fetch_prepared(
                self.position, count, keep_credentials=self.keep_credentials
            )
            return Page(source.name, self.position, prepared.users, prepared.rejected)
        return Page(source.name, self.position, await source.fetch(self.position, count))

    async def _next_source(self) -> Source:
        """The source of the next page. While the circuit or a spent budget keeps the
        primary waiting, that is the fallback when there is one; else this waits for the
        primary."""
        circuit, fallback, log = self.circuit, self.fallback, get_logger()
        now = trio.current_time()
        if fallback is not None and circuit.is_open:
            if now < circuit.retry_at:
                return fallback
            # A probe is due. It must not wait (for the budget, say) while users are due.
            if (wait := await self.primary.ready_in_s()) > 0:
                circuit.postpone(now + wait)
                log.info(
                    "producer.probe_postponed", source=self.primary.name, probe_in_s=round(wait, 3)
                )
                return fallback
            return self.primary
        if now < circuit.retry_at:
            await trio.sleep_until(circuit.retry_at)
        while (wait := await self.primary.ready_in_s()) > 0:  # the budget is spent
            until = _utc_in(wait)
            if fallback is not None:  # as an open circuit: the fallback serves meanwhile
                circuit.open_until(trio.current_time() + wait)
                log.warning(
                    "producer.budget_spent",
                    source=self.primary.name,
                    until=until,
                    wait_s=round(wait, 3),
                )
                log.warning(
                    "producer.fallback_on",
                    primary=self.primary.name,
                    fallback=fallback.name,
                    probe_in_s=round(wait, 3),
                    reason="budget",
                )
                return fallback
            log.warning(
                "producer.budget_wait",
                source=self.primary.name,
                until=until,
                wait_s=round(wait, 3),
                reason="budget spent, no fallback",
            )
            self.budget_wait_until = until
            try:
                await trio.sleep(wait)
            finally:
                self.budget_wait_until = None
        return self.primary

    async def _failed(self, source: Source, exc: SourceError) -> None:
        log = get_logger()
        self.fetch_failures += 1
        self.failures_by_kind[exc.kind] = self.failures_by_kind.get(exc.kind, 0) + 1
        if source is not self.primary:  # the fallback failed: nothing else to turn to
            log.warning("producer.fetch_failed", source=source.name, error=str(exc), kind=exc.kind)
            await trio.sleep(RETRY_MIN_S)
            return
        circuit = self.circuit
        probing = circuit.is_open and self.fallback is not None
        was_open = circuit.is_open
        now = trio.current_time()
        wait = circuit.failed(
            now, retry_after_s=exc.retry_after_s, rate_limited=exc.kind == "http_429"
        )
        getattr(log, self._reminder.level(now, circuit.failures))(
            "producer.probe_failed" if probing else "producer.fetch_failed",
            source=source.name,
            error=str(exc),
            kind=exc.kind,
            failures=circuit.failures,
            retry_in_s=round(wait, 3),
        )
        if probing:
            return
        if circuit.is_open and not was_open:
            log.warning(
                "producer.circuit_open", source=source.name, after_failures=circuit.failures
            )
            if self.fallback is not None:
                log.warning(
                    "producer.fallback_on",
                    primary=source.name,
                    fallback=self.fallback.name,
                    probe_in_s=round(wait, 3),
                )

    # -- pacer ---------------------------------------------------------------------------

    async def _pace(self, receive: trio.MemoryReceiveChannel[Page]) -> None:
        """Publish users as they fall due: ``rate_per_s`` on average, in small bursts at
        most (see the module docstring)."""
        schedule = _Schedule(self.rate_per_s, trio.current_time())
        async with receive:
            while True:
                try:
                    page = await self._next_page(receive, schedule)
                except trio.EndOfChannel:
                    return
                self._publishing = page.source
                index = 0
                while index < len(page.users):
                    if self._rate_changed.is_set():
                        self._rate_changed = trio.Event()
                        schedule = _Schedule(self.rate_per_s, trio.current_time())
                    due = schedule.due(trio.current_time())
                    if due <= 0:
                        with trio.move_on_at(schedule.next_due_at()):
                            await self._rate_changed.wait()
                        continue
                    burst = max(1, min(MAX_BURST_USERS, int(self.rate_per_s * MAX_BURST_S)))
                    end = min(len(page.users), index + due, index + burst)
                    emit = self._user_log()
                    for at in range(index, end):
                        schedule.not_owed(await self._publish(page, at, emit))
                    schedule.sent += end - index
                    index = end
                    await trio.lowlevel.checkpoint()

    @staticmethod
    async def _next_page(receive: trio.MemoryReceiveChannel[Page], schedule: _Schedule) -> Page:
        """The next page; the time waited for a page not ready yet is not owed."""
        try:
            return receive.receive_nowait()
        except trio.WouldBlock:
            started = trio.current_time()
            page = await receive.receive()
            schedule.not_owed(trio.current_time() - started)
            return page

    def _user_log(self) -> Callable[..., Any] | None:
        """How each user is logged now (info at low rates, else debug); None when that
        level is off, so that nothing is computed for it."""
        log = get_logger()
        info = self.rate_per_s <= self.log_each_user_below_per_s
        enabled = getattr(log, "is_enabled_for", None)  # (structlog >= 25.1)
        if enabled is not None and not enabled(logging.INFO if info else logging.DEBUG):
            return None
        return log.info if info else log.debug

    async def _publish(self, page: Page, index: int, emit: Callable[..., Any] | None) -> float:
        """Publish (or dead-letter) one user; the seconds it waited for room in the hub."""
        waited = await self._publish_or_reject(page, index, emit)
        self.next_position = page.start + index + 1
        return waited

    async def _publish_or_reject(
        self, page: Page, index: int, emit: Callable[..., Any] | None
    ) -> float:
        raw, source, position = page.users[index], page.source, page.start + index
        user: User | None = None
        if isinstance(raw, msgspec.Raw):  # prepared: validated, encoded, scrubbed as asked
            error = page.rejected.get(index)
        else:
            try:
                user, error = parse_user(raw), None
            except InvalidRecord as exc:
                error = str(exc)
        if error is not None:
            self.invalid += 1
            self.invalid_by_source[source] = self.invalid_by_source.get(source, 0) + 1
            get_logger().warning(
                "producer.invalid_record", source=source, position=position, error=error
            )
            if self.dead_letters is not None:
                record = msgspec.json.decode(raw) if isinstance(raw, msgspec.Raw) else raw
                self.dead_letters.put(source, position, error, record)
            return 0.0
        waited = 0.0
        if not self.hub.has_room():
            self.backpressure_waits += 1
            get_logger().info(
                "producer.backpressure", position=position, buffered=self.hub.buffered
            )
            started = trio.current_time()
            await self.hub.wait_for_room()
            waited = trio.current_time() - started
        if not isinstance(raw, msgspec.Raw) and not self.keep_credentials:
            raw = scrub(raw)
        message = self.hub.publish_nowait(raw, source, position)
        self.published += 1
        if emit is not None:
            if user is None:
                assert isinstance(raw, msgspec.Raw)
                user = _decode_user(raw)
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
        return waited


def _utc_in(seconds: float) -> str:
    """The wall-clock time `seconds` from now, ISO 8601 UTC to the second."""
    at = datetime.now(UTC) + timedelta(seconds=seconds)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")
