"""Is the daemon ready to do its job? One answer for ``/readyz``, the ``ready`` metric, the
live page and systemd.

`readiness(status)` names every check and what is wrong with it:

- ``daemon``: started (not starting, not stopping);
- ``database``: accepts writes, as a probe every `PROBE_INTERVAL_S` finds it (reachable
  within `PROBE_TIMEOUT_S`, not in recovery, not read-only);
- ``broadcaster``: its component runs, so it listens;
- ``consumers``: the consumer group has members (when the config has consumers);
- ``source``: only while the producer waits for the Random User API's spent budget with no
  fallback configured (no users until the time it names; with a fallback the stream goes
  on from it and stays ready).

On the NATS bus also ``nats`` (connected) and ``producer`` (its component runs), and
only the checks of the parts the role runs. The checks beyond the first three are the
topology's (`Topology.checks`). `readiness` is a pure function of a `Status`; the
database's answer comes from `DatabaseProbe`, a task of its own.

The daemon, broadcaster and producer are the daemon's own parts; the rest is what it
depends on.
systemd's watchdog is fed while the daemon's own parts are fine (`Readiness.alive`): an
outage of the database makes ``/readyz`` answer 503, but restarting the daemon would not
bring the database back, so the watchdog does not ask for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import StoreError, describe
from ..logs import get_logger
from ..store.postgres import PostgresStore
from .status import Status

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
OWN_CHECKS = frozenset({"daemon", "broadcaster", "producer"})
OK = "ok"
NOT_CHECKED = "not checked"


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str]  # name -> "ok", or what is wrong

    @property
    def ready(self) -> bool:
        return all(v == OK for v in self.checks.values())

    @property
    def alive(self) -> bool:
        """The daemon's own parts are fine (dependencies aside)."""
        return all(v == OK for k, v in self.checks.items() if k in OWN_CHECKS)

    @property
    def problems(self) -> dict[str, str]:
        return {k: v for k, v in self.checks.items() if v != OK}


def readiness(status: Status) -> Readiness:
    """Every check the status calls for, and what is wrong with each."""
    checks = {"daemon": OK}
    if status.stopping:
        checks["daemon"] = "stopping"
    elif not status.started:
        checks["daemon"] = "starting"
    if status.database is not None:
        checks["database"] = status.database
    if status.serves and (state := status.state_of("broadcaster")) != "running":
        checks["broadcaster"] = state
    elif status.serves:
        checks["broadcaster"] = OK
    checks.update(status.topology_checks)
    if status.producer is not None and (until := status.producer.budget_wait_until):
        checks["source"] = (
            f"waiting for the {status.producer.active_source} budget until {until}: "
            "no users meanwhile (no fallback configured)"
        )
    return Readiness(checks)


class DatabaseProbe:
    """Checks that the database accepts writes, every PROBE_INTERVAL_S (`run`); `state`
    is "ok" or what is wrong. `dsn` answers "" until the database has started."""

    def __init__(self, dsn: Callable[[], str], password: Callable[[], str | None]) -> None:
        self.dsn = dsn
        self.password = password
        self.state = NOT_CHECKED
        self._limiter = trio.CapacityLimiter(1)  # one probe at a time, even one abandoned
        self._wake = trio.Event()
        self._store: PostgresStore | None = None  # used by one probe thread at a time
        self._closing = False

    async def run(self) -> None:
        """Check the database every PROBE_INTERVAL_S until cancelled."""
        log = get_logger()
        try:
            while True:
                with trio.move_on_after(PROBE_TIMEOUT_S) as waited:
                    found = await trio.to_thread.run_sync(
                        self._probe, abandon_on_cancel=True, limiter=self._limiter
                    )
                if waited.cancelled_caught:
                    found = f"no answer within {PROBE_TIMEOUT_S:g} s"
                if found != self.state:
                    if found == OK:
                        log.info("health.database_ready")
                    elif self.dsn():
                        log.warning("health.database_not_ready", problem=found)
                    self.state = found
                with trio.move_on_after(PROBE_INTERVAL_S):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.state = NOT_CHECKED
            self._closing = True  # (a probe thread still running closes it when it ends)
            if self._limiter.borrowed_tokens == 0:
                self._close()

    def probe_now(self) -> None:
        """Probe without waiting for the interval (the database just started)."""
        self._wake.set()

    def _probe(self) -> str:
        """One probe, in a worker thread: "ok" or what is wrong. Never raises."""
        try:
            if not self.dsn():
                return "not started"
            fresh = self._store is None
            try:
                return self._ask()
            except StoreError as exc:
                if fresh:
                    return f"unreachable: {describe(exc, with_type=False)}"
            try:  # the connection was from before a restart of the server: once more
                return self._ask()
            except StoreError as exc:
                return f"unreachable: {describe(exc, with_type=False)}"
        except Exception as exc:  # (a credential file that cannot be read, ...)
            self._close()
            return f"probe failed: {describe(exc)}"
        finally:
            if self._closing:
                self._close()

    def _ask(self) -> str:
        if self._store is None:
            self._store = PostgresStore(
                self.dsn(),
                password=self.password(),
                application_name="userstreamd-health",
                connect_timeout_s=PROBE_TIMEOUT_S,
                statement_timeout_s=PROBE_TIMEOUT_S,
            )
        ((in_recovery, read_only),) = self._store.query(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
        )
        if in_recovery:
            return "in recovery: read-only"
        if read_only == "on":
            return "read-only (transaction_read_only)"
        return OK

    def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()
