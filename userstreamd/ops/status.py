"""One frozen snapshot of the daemon, for every observer.

The daemon assembles a `Status` from each part's own ``statistics()`` (and the
supervisor's, the topology's counts and checks) whenever an observer asks: the ops
endpoint (`app`), the metrics (`metrics`), readiness (`health`), systemd's STATUS= line
and the stats log each take a callable that returns one, and none of them imports the
daemon or holds one of its parts (a part replaced at run time is never seen stale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .. import __version__
from ..produce.producer import ProducerStatistics
from ..runtime.supervisor import ComponentState
from ..serve.broadcaster import BroadcasterStatistics
from ..stream.hub import HubStatistics
from ..topology import StreamCounts
from .server import OpsPortStatistics

NO_COUNTS = StreamCounts({}, {}, {}, 0, 0)


@dataclass(frozen=True)
class FanoutTotals:
    """The fan-out workers' (``broadcaster.workers``) plain clients, as they report; the
    counts are summed over the workers (and their processes since replaced)."""

    workers: int = 0  # configured
    clients: int = 0
    sent: int = 0
    slow_closes: int = 0
    write_timeouts: int = 0
    token_lockouts: int = 0  # each worker locks addresses out on its own (`auth.Lockouts`)
    peer_faults: int = 0  # every kind together (`EdgeStatistics.peer_faults`)


@dataclass(frozen=True)
class WebSocketInfo:
    port: int | None = None
    scheme: str = "ws"
    token_required: bool = False


@dataclass(frozen=True)
class Status:
    version: str = __version__
    started: bool = False
    stopping: bool = False
    components: tuple[ComponentState, ...] = ()
    database: str | None = None  # the probe's answer; None: this process has no database
    serves: bool = False  # this process runs a broadcaster
    broadcasting: bool = False  # ... and it is made (the stream is open)
    topology_checks: Mapping[str, str] = field(default_factory=dict)
    feed: HubStatistics | None = None  # the broadcaster's hub
    broadcaster: BroadcasterStatistics | None = None
    sent: Mapping[str, int] = field(default_factory=dict)  # by kind of client
    fanout: FanoutTotals = FanoutTotals()
    counts: StreamCounts = NO_COUNTS
    committed_through: int = 0
    producer: ProducerStatistics | None = None
    rows_inserted: int = 0  # by this process's consumers and the ones it started
    websocket: WebSocketInfo = WebSocketInfo()
    ops_port: OpsPortStatistics | None = None  # the operations port's listener (http.enabled)

    def state_of(self, component: str) -> str:
        return next((c.state for c in self.components if c.name == component), "not started")


StatusFn = Callable[[], Status]
