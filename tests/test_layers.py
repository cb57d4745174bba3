"""The package's shape holds: no import cycle (type-only and function-level imports
included), no import from a lower layer to a higher one, and no module outside the
topologies asks which bus is in use."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "userstreamd"

# Low to high: a module may import from its own layer and the ones before it. Each
# entry is a module or a package prefix; the longest match decides.
LAYERS: list[tuple[str, ...]] = [
    ("userstreamd", "errors", "logs", "credentials", "backoff", "gate"),
    ("runtime.lifeline", "runtime.systemd", "runtime.supervisor", "stream.records",
     "stream.protocol"),
    ("sources",),
    ("config",),
    ("stream", "store"),
    ("produce", "serve", "consume", "runtime.workers"),
    ("topology",),
    ("ops",),
    ("runtime",),
    ("commands", "__main__", "bench", "testing"),  # (bench: a command, and tools)
]  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every userstreamd module `name` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # (`from package import module` imports that module: the package's
            # __init__ counts only when a name is not a submodule)
            submodules = [f"{module}.{a.name}" for a in node.names]
            names = [a for a in submodules if a not in known]
            targets = [module] * bool(names) + [a for a in submodules if a in known]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imports(name, path, known)) for name, path in modules.items()}


def _layer(module: str) -> int:
    short = module.removeprefix("userstreamd.") if module != "userstreamd" else module
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_no_import_reaches_up_a_layer() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module) and not target.startswith(module + ".")
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ importing its own submodules is how re-exports work
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


BUS_NAME = re.compile(
    r"""(==|!=|\bin\b|\bis\b)\s*\(?\s*["'](embedded|nats)["']"""
    r"""|["'](embedded|nats)["']\s*(==|!=)"""
    r"""|\.bus\s*(==|!=|\bin\b)"""
)


def test_only_the_topologies_ask_which_bus_is_in_use() -> None:
    """A new topology is one module beside the others, not a branch in each part."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "topology" not in path.relative_to(PACKAGE).parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if BUS_NAME.search(line)
    ]
    assert found == []


@pytest.mark.parametrize(
    "line",
    [
        'if config.cluster.bus == "nats":',
        "if bus != 'embedded':",
        'on_nats = args.bus == "nats"',
        'if "nats" == config.cluster.bus:',
        'if c.cluster.bus in ("nats",):',
    ],
)
def test_the_bus_name_check_finds_comparisons(line: str) -> None:
    assert BUS_NAME.search(line)


def _loaded_by(statement: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(out.split())


def test_the_embedded_daemon_loads_no_nats_client() -> None:
    """nats-py is imported only when the NATS topology is chosen."""
    loaded = _loaded_by(
        "from userstreamd.config import Config; from userstreamd.runtime.daemon import Daemon; "
        "Daemon(Config())"
    )
    assert "userstreamd.runtime.daemon" in loaded
    assert not {
        m for m in loaded if m == "nats" or m.startswith(("nats.", "userstreamd.topology.nats"))
    }


def test_choosing_the_nats_topology_loads_it() -> None:
    loaded = _loaded_by("from userstreamd.topology import topology_class; topology_class('nats')")
    assert {"nats", "userstreamd.topology.nats.topology"} <= loaded


def test_loading_a_config_loads_no_http_client() -> None:
    loaded = _loaded_by("from userstreamd.config import load_config")
    assert "httpx" not in loaded
