"""``userstreamd tail`` is a client: importing it loads no part of the server."""

from __future__ import annotations

import ast
import subprocess
import sys

SERVER_MODULES = {
    "userstreamd.serve.broadcaster",
    "userstreamd.stream.hub",
    "userstreamd.serve.edge",
    "userstreamd.serve.admission",
    "userstreamd.serve.auth",
    "userstreamd.runtime.supervisor",
    "httpx",
}


def test_importing_tail_loads_no_server_module() -> None:
    code = "import userstreamd.commands.tail, sys; print(sorted(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(ast.literal_eval(result.stdout))
    assert "userstreamd.commands.tail" in loaded
    assert not SERVER_MODULES & loaded, sorted(SERVER_MODULES & loaded)
