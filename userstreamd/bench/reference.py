"""Reference broadcast servers for ``bench fanout --compare``: the same stream, served by
code that does nothing else, so that userstreamd's fan-out is measured side by side.

- ``python -m userstreamd.bench.reference POOL RATE``: asyncio, ``websockets``
  (`websockets.asyncio.server.serve`, `websockets.broadcast`);
- ``node reference_ws.js POOL RATE`` (shipped beside this file): Node's ``ws``, found by
  `node_ws` (``require('ws')`` as it is, else a copy under ~/.cache/userstreamd/node that
  it installs with npm once, when allowed).

Both send user frames as the daemon does (one ``user`` per frame, the same envelope
fields: ``epoch``, ``seq``, ``position``, ``produced_at`` to the microsecond, ``source``,
``user``), at RATE users per second paced on a 1 ms tick, to every client; the users
are a pool of synthetic users (`write_pool`: the same ~1 KiB JSON the daemon sends, without
the fake credentials) taken in turn, so the servers' CPU goes to the broadcast alone. They
print ``listening PORT`` once they listen on 127.0.0.1 (a free port), read ``rate R``
lines on their standard input, and exit at its end (the bench's lifeline). They have no
slow-client policy: what a slow client cannot take piles up in its send buffer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve

from ..sources.synthetic import synthetic_user
from ..stream.records import scrub

POOL_USERS = 1000
SEED = "bench"
TICK_S = 0.001
NODE_SCRIPT = Path(__file__).with_name("reference_ws.js")
NPM_TIMEOUT_S = 180
NPM_PACKAGE = "ws@8"


def write_pool(path: Path, users: int = POOL_USERS) -> None:
    """`users` synthetic users, one JSON object per line."""
    lines = [msgspec.json.encode(scrub(synthetic_user(SEED, p))) for p in range(1, users + 1)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def _frame(seq: int, user: str) -> str:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return (
        f'{{"type":"user","epoch":"reference","seq":{seq},"position":{seq},'
        f'"produced_at":"{now}","source":"synthetic","user":{user}}}'
    )


async def _serve(pool: list[str], rate_per_s: float) -> None:
    rate = [rate_per_s]
    changed = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        await connection.wait_closed()

    async def read_commands() -> None:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words[:1] == ["rate"]:
                rate[0] = float(words[1])
                changed.set()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=65536) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"listening {port}", flush=True)
        commands = asyncio.create_task(read_commands())
        seq, sent, start = 0, 0, time.monotonic()
        while not commands.done():
            if changed.is_set():
                changed.clear()
                sent, start = 0, time.monotonic()
            due = int((time.monotonic() - start) * rate[0])
            while sent < due:
                seq, sent = seq + 1, sent + 1
                broadcast(server.connections, _frame(seq, pool[seq % len(pool)]))
            await asyncio.sleep(TICK_S)


def main(argv: list[str] | None = None) -> int:
    pool_path, rate = (argv if argv is not None else sys.argv[1:])[:2]
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # a client's reset is normal
    pool = Path(pool_path).read_text().splitlines()
    asyncio.run(_serve(pool, float(rate)))
    return 0


def websockets_version() -> str:
    return str(websockets.__version__)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "userstreamd" / "node"


def _resolves(node: str, env: dict[str, str]) -> str | None:
    """ws's version when `node` can require it with `env`, else None."""
    try:
        result = subprocess.run(
            [node, "-e", "process.stdout.write(require('ws/package.json').version)"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def node_ws(*, install: bool) -> tuple[list[str], dict[str, str], str] | str:
    """How to run the Node reference: (command before POOL RATE, environment, ws version);
    or why it cannot run. With `install`, a missing ws is installed once with npm into the
    cache folder (bounded by NPM_TIMEOUT_S)."""
    node = shutil.which("node")
    if node is None:
        return "node is not on the PATH"
    env = dict(os.environ)
    if version := _resolves(node, env):
        return [node, str(NODE_SCRIPT)], env, version
    modules = _cache_dir() / "node_modules"
    env["NODE_PATH"] = os.pathsep.join(filter(None, [str(modules), env.get("NODE_PATH")]))
    if not (modules / "ws").exists():
        if not install:
            return f"the ws module is not installed (for node, or under {modules})"
        npm = shutil.which("npm")
        if npm is None:
            return "the ws module is not installed and npm is not on the PATH"
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(modules.parent), "--no-audit", NPM_PACKAGE],
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"npm install {NPM_PACKAGE} failed: {exc}"
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"npm install {NPM_PACKAGE} failed: {reason}"
    if version := _resolves(node, env):
        return [node, str(NODE_SCRIPT)], env, version
    return f"node cannot load ws from {modules}"


if __name__ == "__main__":
    sys.exit(main())
