"""Supervision: start components in order, restart what crashes, stop in reverse.

Each component runs in its own task and cancel scope inside one trio nursery. A crash
(any ``Exception``, including an exception group from the component's own nursery) is
logged with its traceback and the component is restarted after ``restart_delay_s``; its
siblings never see it. ``Cancelled`` is never caught: stopping is always possible.

    sup = Supervisor(nursery, restart_delay_s=1.0)
    dsn = await sup.start("database", run_database)   # returns what the component
    await sup.start("broadcaster", run_broadcaster)    # passed to task_status.started()
    ...
    await sup.stop("producer")                          # one component, bounded
    await sup.stop_all()                                # the rest, in reverse order
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .logs import bind, get_logger

State = Literal["starting", "running", "backoff", "stopping", "stopped", "failed"]
ComponentFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class ComponentState:
    name: str
    state: State
    restarts: int
    last_exit: str | None


def describe(exc: BaseException) -> str:
    """``Type: message`` of the exception, or of each leaf of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class _Component:
    def __init__(self, name: str, fn: ComponentFn) -> None:
        self.name, self.fn = name, fn
        self.state: State = "starting"
        self.restarts = 0
        self.last_exit: str | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    def snapshot(self) -> ComponentState:
        return ComponentState(self.name, self.state, self.restarts, self.last_exit)


class Supervisor:
    def __init__(
        self, nursery: trio.Nursery, *, restart_delay_s: float = 1.0, stop_timeout_s: float = 10.0
    ) -> None:
        self._nursery = nursery
        self.restart_delay_s = restart_delay_s
        self.stop_timeout_s = stop_timeout_s
        self._components: dict[str, _Component] = {}

    def snapshot(self) -> list[ComponentState]:
        """Every component's state, in start order."""
        return [c.snapshot() for c in self._components.values()]

    async def start(self, name: str, fn: ComponentFn) -> Any:
        """Start `fn` supervised; return once it reports ready (its started() value)."""
        if name in self._components:
            raise ValueError(f"component {name!r} already started")
        component = self._components[name] = _Component(name, fn)
        return await self._nursery.start(self._supervise, component)

    async def _supervise(self, c: _Component, *, task_status: trio.TaskStatus[Any]) -> None:
        bind(component=c.name)
        log = get_logger()
        reported = False
        with c.scope:
            while True:
                c.state = "starting"
                try:
                    async with trio.open_nursery() as nursery:
                        value = await nursery.start(c.fn)
                        c.state = "running"
                        if not reported:
                            task_status.started(value)
                            reported = True
                        else:
                            log.info("supervisor.restarted", restarts=c.restarts)
                    c.last_exit = "returned"
                    log.warning("supervisor.component_exited", restart_in_s=self.restart_delay_s)
                except Exception as exc:
                    c.last_exit = describe(exc)
                    log.error(
                        "supervisor.component_crashed",
                        error=c.last_exit,
                        restart_in_s=self.restart_delay_s,
                        exc_info=exc,
                    )
                c.restarts += 1
                c.state = "backoff"
                await trio.sleep(self.restart_delay_s)
        c.state = "stopped"
        c.done.set()

    async def stop(self, name: str) -> None:
        """Cancel one component and wait (bounded) until it has finished its cleanup."""
        c = self._components[name]
        if c.done.is_set():
            return
        c.state = "stopping"
        c.scope.cancel()
        with trio.move_on_after(self.stop_timeout_s) as timeout:
            await c.done.wait()
        if timeout.cancelled_caught:
            get_logger().error(
                "supervisor.stop_timeout", component=name, timeout_s=self.stop_timeout_s
            )

    async def stop_all(self) -> None:
        """Stop every component still running, newest first."""
        for name in reversed(list(self._components)):
            await self.stop(name)
