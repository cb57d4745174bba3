"""Is the daemon ready to do its job? One answer for ``/readyz``, the ``ready`` metric, the
live page and systemd.

`Health.readiness` names every check and what is wrong with it:

- ``daemon``: started (not starting, not stopping);
- ``database``: accepts writes, as a probe every `PROBE_INTERVAL_S` finds it (reachable
  within `PROBE_TIMEOUT_S`, not in recovery, not read-only);
- ``broadcaster``: its component runs, so it listens;
- ``consumers``: the consumer group has members (when the config has consumers).

The first and third are the daemon's own parts; the other two are what it depends on.
systemd's watchdog is fed while the daemon's own parts are fine (`Readiness.alive`): an
outage of the database makes ``/readyz`` answer 503, but restarting the daemon would not
bring the database back, so the watchdog does not ask for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import StoreError
from ..logs import get_logger
from ..store.postgres import PostgresStore

if TYPE_CHECKING:
    from ..runtime.daemon import Daemon

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


class Health:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.database = NOT_CHECKED
        self._limiter = trio.CapacityLimiter(1)  # one probe at a time, even one abandoned
        self._wake = trio.Event()
        self._store: PostgresStore | None = None  # used by one probe thread at a time
        self._closing = False

    def readiness(self) -> Readiness:
        d = self.daemon
        checks = {"daemon": OK, "database": self.database, "broadcaster": OK}
        if d.stopping:
            checks["daemon"] = "stopping"
        elif not d.ready.is_set():
            checks["daemon"] = "starting"
        states = {c.name: c.state for c in d.supervisor.snapshot()} if d.supervisor else {}
        if (state := states.get("broadcaster", "not started")) != "running":
            checks["broadcaster"] = state
        if d.config.cluster.bus == "nats":
            return Readiness(self._on_nats(checks, states))
        group = d.config.consumers.group
        if d.config.consumers.count > 0:
            members = next((g.members for g in d.hub.statistics().groups if g.name == group), 0)
            checks["consumers"] = OK if members else f"no member of group {group!r} connected"
        return Readiness(checks)

    def _on_nats(self, checks: dict[str, str], states: Mapping[str, str]) -> dict[str, str]:
        """On the NATS bus: the role's own parts, the connection, and the database when
        the role writes to it."""
        d = self.daemon
        roles = {"producer", "broadcaster", "consumer"} if d.role == "all" else {d.role}
        checks["nats"] = OK if d.bus is not None and d.bus.connected else "not connected"
        if "broadcaster" not in roles:
            del checks["broadcaster"]
        if not roles & {"producer", "consumer"}:
            del checks["database"]
        if "producer" in roles and (state := states.get("producer", "not started")) != "running":
            checks["producer"] = state
        if "consumer" in roles and d.config.consumers.count > 0:
            connected = any(c.connected for c in d.consumers)
            checks["consumers"] = OK if connected else "no consumer bound to the stream"
        return checks

    async def probe_database(self) -> None:
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
                if found != self.database:
                    if found == OK:
                        log.info("health.database_ready")
                    elif self.daemon.dsn:
                        log.warning("health.database_not_ready", problem=found)
                    self.database = found
                with trio.move_on_after(PROBE_INTERVAL_S):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self.database = NOT_CHECKED
            self._closing = True  # (a probe thread still running closes it when it ends)
            if self._limiter.borrowed_tokens == 0:
                self._close()

    def probe_now(self) -> None:
        """Probe without waiting for the interval (the database just started)."""
        self._wake.set()

    def _probe(self) -> str:
        """One probe, in a worker thread: "ok" or what is wrong. Never raises."""
        try:
            if not self.daemon.dsn:
                return "not started"
            fresh = self._store is None
            try:
                return self._ask()
            except StoreError as exc:
                if fresh:
                    return f"unreachable: {_first_line(exc)}"
            try:  # the connection was from before a restart of the server: once more
                return self._ask()
            except StoreError as exc:
                return f"unreachable: {_first_line(exc)}"
        except Exception as exc:  # (a credential file that cannot be read, ...)
            self._close()
            return f"probe failed: {type(exc).__name__}: {_first_line(exc)}"
        finally:
            if self._closing:
                self._close()

    def _ask(self) -> str:
        if self._store is None:
            self._store = PostgresStore(
                self.daemon.dsn,
                password=self.daemon.config.db_password(),
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
