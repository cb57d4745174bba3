"""Where the stream lives: a `Topology`, chosen once from ``[cluster] bus`` (`choose`).

Two implementations ship: `embedded` (the hub in the daemon's memory, its consumers on
the broadcaster's private socket, the checkpoint in PostgreSQL) and `nats` (a JetStream
stream that any number of producers, broadcasters and consumers share, each on any
machine). The daemon starts what a topology gives it, in one order: the database (when
`Topology.uses_database`), the stream (`open_stream`), the broadcaster's feed
(`open_feed`) with the groups its members join (`member_groups`), the consumers
(`consumers`), the producer (`outlet`, `producer_component`); it stops in reverse, after
`drain`. The broadcaster's clients that resume from before its replay buffer read the
stored stream through `history`. Nothing outside the implementations asks which one it
got: the registry `TOPOLOGIES` names the module of each, imported only when chosen (so
nats-py is loaded only for the NATS bus).

To add a topology: write one module beside `embedded` that defines ``TOPOLOGY`` (a class
with this protocol's members and a constructor ``(context: Context)``), add its name to
`TOPOLOGIES` and to ``ClusterConfig.bus`` (the config's schema), and add it to the
contract tests (tests/topology/test_contract.py, and for its WebSocket groups
tests/test_group_contract.py), which every topology passes: the in-memory one there
(tests/topology/fake.py) shows the least a topology must do.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio

from ..config import Config
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..produce.producer import Outlet, Producer
    from ..runtime.supervisor import ComponentFn
    from ..store.streams import Stream
    from ..stream.groups import MemberGroups
    from ..stream.history import Pages
    from ..stream.hub import Hub
    from ..stream.protocol import Batch

TOPOLOGIES: Mapping[str, str] = {
    "embedded": "userstreamd.topology.embedded",
    "nats": "userstreamd.topology.nats.topology",
}
PARTS = frozenset({"producer", "broadcaster", "consumer"})

Rule = tuple[str, str]  # (config key, what was expected)
Start = Callable[..., Awaitable[Any]]  # Supervisor.start(name, fn) -> what fn reported


@dataclass(frozen=True)
class StreamCounts:
    """Users published, committed and set aside, by source, as this process knows them
    (a copy: the counts it was made from go on counting)."""

    published: Mapping[str, int]  # by source
    committed: Mapping[str, int]
    rejected: Mapping[str, int]
    last_seq: int
    committed_total: int  # each seq once (on the NATS bus: each acknowledgement)

    def __post_init__(self) -> None:
        for name in ("published", "committed", "rejected"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True)
class Hooks:
    """What a topology reports as it happens (the daemon's metrics)."""

    on_batch: Callable[[Batch], None] | None = None
    on_end_to_end: Callable[[float], None] | None = None


@dataclass
class Context:
    """What a topology gets from the daemon to build its parts."""

    config: Config
    role: str = "all"
    hooks: Hooks = field(default_factory=Hooks)
    running: set[trio.Process] = field(default_factory=set)  # child processes started


class Topology(Protocol):
    """One way to carry the stream from producers to broadcasters and consumers."""

    name: ClassVar[str]
    roles: ClassVar[frozenset[str]]  # what `run --role` may name here

    @classmethod
    def rules(cls, config: Config) -> Iterator[Rule]:
        """What this topology needs of the config beyond its own checks."""
        ...

    @classmethod
    def preflight(cls, config: Config) -> None:
        """Read what must be readable before anything starts; ConfigError if not."""
        ...

    @property
    def parts(self) -> frozenset[str]:
        """Which of producer, broadcaster, consumer this process runs."""
        ...

    @property
    def hub(self) -> Hub | None:
        """The broadcaster's feed, once there is one."""
        ...

    @property
    def uses_database(self) -> bool: ...

    async def connect(self, stack: contextlib.AsyncExitStack) -> None:
        """Open what the parts share (closed with `stack`, after the components)."""
        ...

    async def open_stream(self, dsn: str) -> Stream:
        """The stream's epoch, seed and where its producer resumes."""
        ...

    async def open_feed(self, start: Start, stream: Stream) -> Hub:
        """The hub a broadcaster serves (its mirror started with `start` if it has one)."""
        ...

    def history(self, epoch: str, since: int) -> contextlib.AbstractAsyncContextManager[Pages]:
        """The stored stream of `epoch` after seq `since`, in pages (`stream.history`),
        for the broadcaster's clients that resume from before its replay buffer."""
        ...

    def member_groups(self, hub: Hub) -> MemberGroups:
        """The groups the broadcaster's members (``?group=NAME``) join: `hub`'s, or
        the bus's own."""
        ...

    def consumers(self, url: str, dsn: str) -> list[tuple[str, ComponentFn]]:
        """(component name, run) per consumer; `url` is the broadcaster's private one."""
        ...

    def outlet(self, stream: Stream) -> Outlet:
        """Where the producer publishes."""
        ...

    def producer_component(self, producer: Producer) -> ComponentFn:
        """How the producer runs here (the NATS bus holds a lease around it)."""
        ...

    async def drain(self, dsn: str, timeout_s: float) -> None:
        """Wait (bounded) until what was published is committed; keep the checkpoint."""
        ...

    def close(self) -> None:
        """The producer stopped: let the broadcaster's clients know the stream ends."""
        ...

    def counts(self) -> StreamCounts: ...

    def committed_through(self) -> int: ...

    def checks(self, states: Mapping[str, str]) -> dict[str, str]:
        """Readiness checks of this topology's own (`states`: each component's state)."""
        ...


def topology_class(bus: str) -> type[Topology]:
    """The implementation registered as `bus` (imported now)."""
    try:
        module = TOPOLOGIES[bus]
    except KeyError:
        raise ConfigError(f"no topology named {bus!r} (known: {', '.join(TOPOLOGIES)})") from None
    found: type[Topology] = importlib.import_module(module).TOPOLOGY
    return found


def config_rules(config: Config) -> Iterator[Rule]:
    """The chosen topology's rules, for `load_config(..., rules=config_rules)`."""
    yield from topology_class(config.cluster.bus).rules(config)


def check_role(config: Config, role: str) -> None:
    """ConfigError unless the configured topology can run `role` on its own."""
    cls = topology_class(config.cluster.bus)
    if role not in cls.roles:
        able = [name for name in TOPOLOGIES if role in topology_class(name).roles]
        raise ConfigError(
            f"{config.path}: run --role {role}: expected [cluster] bus = "
            + " or ".join(f'"{name}"' for name in able)
            + f" (each role on its own needs a shared bus), got {config.cluster.bus!r}"
        )


def choose(context: Context) -> Topology:
    """The topology the config names, for `context.role`."""
    cls: Any = topology_class(context.config.cluster.bus)
    topology: Topology = cls(context)
    return topology
