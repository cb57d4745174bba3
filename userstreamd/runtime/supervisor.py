"""Supervision: start components in order, restart what fails, stop in reverse.

The model is Erlang/OTP's, in one trio nursery:

- Each component runs in its own task and cancel scope. A crash (any ``Exception``,
  including an exception group from the component's own nursery) is logged with its
  traceback; siblings never see it. ``Cancelled`` is never caught.
- Restart policy: *permanent* components are restarted whenever they end, *transient*
  ones only when they crash. The delay starts at ``delay_min_s`` and doubles up to
  ``delay_max_s`` (equal jitter: each delay is in [d/2, d], so delays still grow); it is
  reset once the component has stayed up for ``reset_after_s``.
- Restart intensity: more than ``max_restarts`` restarts (all components together)
  within ``window_s`` escalates: the component is marked *failed*, ``on_escalate`` is
  called with the reason, and the daemon stops everything and exits non-zero, so systemd
  or the operator sees the failure instead of a crash loop.
- A configuration fault found at start (`errors.InUseError`: a port or the state
  directory held by another process) escalates at once, with no restart and no
  traceback: the reason names the address or the holder.

    sup = Supervisor(nursery, policy=RestartPolicy(), intensity=Intensity(5, 60))
    dsn = await sup.start("database", run_database)   # returns what the component
    await sup.start("broadcaster", run_broadcaster)    # passed to task_status.started()
    await sup.stop("producer")                          # bounded; several stop together
    await sup.stop_all()                                # the rest, in reverse order
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import trio

from ..backoff import Backoff
from ..errors import InUseError, describe, leaves
from ..logs import bind, get_logger

State = Literal["starting", "running", "backoff", "stopping", "stopped", "failed"]
ComponentFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class RestartPolicy:
    restart: Literal["permanent", "transient"] = "permanent"
    delay_min_s: float = 0.1
    delay_max_s: float = 30.0
    reset_after_s: float = 30.0


@dataclass(frozen=True)
class Intensity:
    max_restarts: int = 5
    window_s: float = 60.0


@dataclass(frozen=True)
class ComponentState:
    name: str
    state: State
    restarts: int
    last_exit: str | None


class _Component:
    def __init__(self, name: str, fn: ComponentFn, policy: RestartPolicy) -> None:
        self.name, self.fn, self.policy = name, fn, policy
        self.state: State = "starting"
        self.restarts = 0
        self.last_exit: str | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    def snapshot(self) -> ComponentState:
        return ComponentState(self.name, self.state, self.restarts, self.last_exit)


class Supervisor:
    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        policy: RestartPolicy | None = None,
        intensity: Intensity | None = None,
        stop_timeout_s: float = 10.0,
        on_escalate: Callable[[str], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self.policy = policy or RestartPolicy()
        self.intensity = intensity or Intensity()
        self.stop_timeout_s = stop_timeout_s
        self.on_escalate = on_escalate
        self.failure: str | None = None
        self._components: dict[str, _Component] = {}
        self._restarts: deque[float] = deque()

    def snapshot(self) -> list[ComponentState]:
        """Every component's state, in start order."""
        return [c.snapshot() for c in self._components.values()]

    async def start(self, name: str, fn: ComponentFn, policy: RestartPolicy | None = None) -> Any:
        """Start `fn` supervised; return once it reports ready (its started() value)."""
        if name in self._components:
            raise ValueError(f"component {name!r} already started")
        component = self._components[name] = _Component(name, fn, policy or self.policy)
        return await self._nursery.start(self._supervise, component)

    def _restart_allowed(self, c: _Component) -> bool:
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] <= now - self.intensity.window_s:
            self._restarts.popleft()
        if len(self._restarts) <= self.intensity.max_restarts:
            return True
        self.failure = (
            f"{c.name}: more than {self.intensity.max_restarts} restarts in "
            f"{self.intensity.window_s:g} s; last exit: {c.last_exit}"
        )
        return False

    async def _supervise(self, c: _Component, *, task_status: trio.TaskStatus[Any]) -> None:
        bind(component=c.name)
        log = get_logger()
        reported = False
        delays = Backoff(c.policy.delay_min_s, c.policy.delay_max_s).delays()
        try:
            with c.scope:
                while True:
                    c.state = "starting"
                    started_at: float | None = None
                    crashed = True
                    try:
                        async with trio.open_nursery() as nursery:
                            value = await nursery.start(c.fn)
                            c.state, started_at = "running", trio.current_time()
                            if not reported:
                                task_status.started(value)
                                reported = True
                            else:
                                log.info("supervisor.restarted", restarts=c.restarts)
                        c.last_exit, crashed = "returned", False
                    except Exception as exc:
                        c.last_exit = describe(exc)
                        held = next((e for e in leaves(exc) if isinstance(e, InUseError)), None)
                        if held is not None:  # a configuration fault: no restart cures it
                            self.failure = f"{c.name}: {describe(held, with_type=False)}"
                            await self._give_up(c, None)
                        log.error("supervisor.component_crashed", error=c.last_exit, exc_info=exc)
                    if not crashed and c.policy.restart == "transient":
                        log.info("supervisor.component_done")
                        break
                    if started_at is not None and (
                        trio.current_time() - started_at >= c.policy.reset_after_s
                    ):
                        delays.reset()
                    if not self._restart_allowed(c):
                        await self._give_up(c, "supervisor.intensity_exceeded")
                    c.restarts += 1
                    c.state = "backoff"
                    wait = delays.next_s()
                    log.warning(
                        "supervisor.backoff",
                        restart_in_s=round(wait, 3),
                        restarts=c.restarts,
                        last_exit=c.last_exit,
                    )
                    await trio.sleep(wait)
        finally:
            # Also when cancelled from outside (a start that never reported ready).
            if c.state != "failed":
                c.state = "stopped"
            c.done.set()

    async def _give_up(self, c: _Component, event: str | None) -> NoReturn:
        """Mark `c` failed and escalate `self.failure`; it stays failed until the daemon
        stops it. With no `event` the escalation is the one line that says why (the
        daemon logs it), unless there is no one to escalate to."""
        c.state = "failed"
        assert self.failure is not None
        if event is not None or self.on_escalate is None:
            get_logger().error(event or "supervisor.component_failed", reason=self.failure)
        if self.on_escalate is not None:
            self.on_escalate(self.failure)
        await trio.sleep_forever()

    async def stop(self, *names: str) -> None:
        """Cancel these components together and wait (bounded) until each has finished
        its cleanup."""
        stopping = [self._components[n] for n in names if n in self._components]
        stopping = [c for c in stopping if not c.done.is_set()]
        for c in stopping:
            if c.state != "failed":
                c.state = "stopping"
            c.scope.cancel()
        with trio.move_on_after(self.stop_timeout_s):
            for c in stopping:
                await c.done.wait()
        for c in stopping:
            if not c.done.is_set():
                get_logger().error(
                    "supervisor.stop_timeout", component=c.name, timeout_s=self.stop_timeout_s
                )

    async def stop_all(self) -> None:
        """Stop every component still running, newest first."""
        for name in reversed(list(self._components)):
            await self.stop(name)
