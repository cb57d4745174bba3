"""Fan-out workers (``broadcaster.workers``): real child processes sharing the public port
with SO_REUSEPORT, real clients, a real kill -9."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from userstreamd.stream.client import open_ws

from .conftest import daemon_tables, query
from .helpers import eventually
from .test_ops import samples

pytestmark = pytest.mark.e2e

VIEWER, AUDITOR = "viewer-Lk3jH5gF7dS9", "auditor-Mn2bV4cX6zQ8"
USERS = 3000


def _established(pid: int, port: int) -> int:
    """TCP connections on `port` that process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


async def _follow(base: str, upto: int, seen: list[int], notices: list[dict[str, Any]]) -> None:
    """A plain client that resumes after every disconnect, as the live page does."""
    epoch, last = None, None
    while last is None or last < upto:
        url = base if last is None else f"{base}?epoch={epoch}&since={last}"
        try:
            async with open_ws(url, token=VIEWER) as ws:
                welcome = json.loads(await ws.get_message())
                epoch = welcome["epoch"]
                last = welcome["seq"] if last is None else last
                while last < upto:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "user":
                        seen.append(message["seq"])
                        last = message["seq"]
                    else:
                        notices.append(message)
        except (ConnectionClosed, HandshakeError, OSError):
            await trio.sleep(0.05)


async def test_workers_share_the_port_and_a_killed_one_costs_its_clients_nothing(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {
        "source": "synthetic",
        "rate_per_s": 400,
        "seed": "fanout",
        "stop_at_position": USERS,
    }
    tables["broadcaster"] = {"port": 0, "workers": 2, "groups": ["audit"]}
    tables["supervisor"] = {"restart_delay_min_s": 0.1}
    env = {"USERSTREAMD_TOKENS": f"viewer {VIEWER} read;auditor {AUDITOR} read group:audit"}
    daemon = daemon_factory(tables, env=env)
    ready = await trio.to_thread.run_sync(daemon.wait_for, "daemon.ready")
    base = ready["url"]
    port = int(base.rstrip("/").rsplit(":", 1)[1])
    workers = {
        e["component"]: e["pid"]
        for e in daemon.events("supervisor.process_started")
        if e["component"].startswith("fanout-")
    }
    assert set(workers) == {"fanout-1", "fanout-2"}

    # Strangers are answered by the workers (the daemon itself does not listen).
    for token, target, status in [
        (None, base, 401),
        (VIEWER, f"{base}?group=audit", 403),
        (AUDITOR, f"{base}?group=db", 403),
        (VIEWER, f"{base}?batch=0", 400),
    ]:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_ws(target, token=token):
                pass
        assert rejected.value.status_code == status

    clients = 24
    seen: list[list[int]] = [[] for _ in range(clients)]
    notices: list[dict[str, Any]] = []
    audited: list[int] = []
    checkpoints: list[int] = []

    async def audit_member() -> None:
        """A public group member, relayed to the daemon: it acks (in chunks: the rate
        limit), the checkpoints come; if its worker is the one killed, it reconnects and
        the group redelivers what it had not acknowledged."""
        while not checkpoints or checkpoints[-1] < USERS:
            pending: list[int] = []
            try:
                async with open_ws(f"{base}?group=audit&batch=50", token=AUDITOR) as ws:
                    assert json.loads(await ws.get_message())["group"] == "audit"
                    while not checkpoints or checkpoints[-1] < USERS:
                        with trio.move_on_after(0.2) as quiet:
                            message = json.loads(await ws.get_message())
                            items = message["items"] if message["type"] == "users" else [message]
                            pending += [m["seq"] for m in items if m["type"] == "user"]
                            if message["type"] == "checkpoint":
                                checkpoints.append(message["seq"])
                        if len(pending) >= 50 or (pending and quiet.cancelled_caught):
                            await ws.send_message(json.dumps({"type": "ack", "seqs": pending}))
                            audited.extend(pending)
                            pending.clear()
            except (ConnectionClosed, HandshakeError, OSError):
                await trio.sleep(0.05)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(_follow, base, USERS, seen[i], notices)
            nursery.start_soon(audit_member)
            await eventually(lambda: all(len(s) >= 200 for s in seen), timeout_s=30)
            shares = {name: _established(pid, port) for name, pid in workers.items()}
            assert sum(shares.values()) >= clients + 1, shares
            assert min(shares.values()) >= 1, f"one worker got no client: {shares}"
            # The workers report their clients to the daemon's /metrics.
            fanout_clients = ("userstreamd_websocket_clients", (("kind", "fanout"),))
            async with httpx.AsyncClient(base_url=ready["http_url"]) as http:
                scrape: dict[Any, float] = {}
                sent = ("userstreamd_websocket_messages_sent_total", (("kind", "fanout"),))
                for _ in range(100):  # (reports come every second)
                    scrape = samples((await http.get("metrics")).text)
                    if scrape.get(fanout_clients) == clients and scrape[sent] >= clients * 200:
                        break
                    await trio.sleep(0.1)
            assert scrape[fanout_clients] == clients
            assert scrape[sent] >= clients * 200
            os.kill(workers["fanout-1"], signal.SIGKILL)
            await eventually(
                lambda: any(
                    e["component"] == "fanout-1" for e in daemon.events("supervisor.restarted")
                ),
                timeout_s=30,
            )
    assert await trio.to_thread.run_sync(daemon.stop) == 0

    for got in seen:  # every client: every seq from where it joined, once, in order
        assert got == list(range(got[0], USERS + 1))
    assert notices == [], "a client was told of a gap"
    assert sorted(set(audited)) == list(range(min(audited), USERS + 1))  # (at least once)
    assert checkpoints[-1] == USERS
    assert query(dsn, "SELECT count(*), min(seq), max(seq) FROM incoming_users") == [
        (USERS, 1, USERS)
    ]
    assert daemon.events("broadcaster.connection_failed") == []
