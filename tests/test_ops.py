"""The operations endpoint of a real daemon: /metrics, /healthz, /readyz, /status.json,
and what it answers to careless or hostile HTTP."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from userstreamd.runtime.daemon import Daemon

from .conftest import PostgresForTests, daemon_tables, query
from .helpers import eventually, in_process_daemon, run_until, wait_until

STOP_AT = 600
UPGRADE = {
    "connection": "upgrade",
    "upgrade": "websocket",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{daemon.http_url}metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_count_what_the_pipeline_did(tmp_path: Path, dsn: str) -> None:
    daemon = in_process_daemon(
        tmp_path,
        dsn,
        consumers={"count": 1},
        producer={"source": "synthetic", "rate_per_s": 2000, "stop_at_position": STOP_AT},
    )
    found: dict[Any, float] = {}

    async def drain_then_scrape() -> None:
        await eventually(lambda: daemon.hub.last_seq == STOP_AT and daemon.hub.drained())
        await eventually(lambda: daemon.readiness().ready)
        found.update(await scrape(daemon))

    assert await run_until(daemon, drain_then_scrape) == 0
    (rows,) = query(dsn, "SELECT count(*) FROM incoming_users")[0]
    synthetic = (("source", "synthetic"),)
    assert rows == STOP_AT
    assert found[("userstreamd_users_committed_total", synthetic)] == rows
    assert found[("userstreamd_users_broadcast_total", synthetic)] == rows
    assert found[("userstreamd_users_produced_total", synthetic)] == rows
    assert found[("userstreamd_end_to_end_latency_seconds_count", ())] == rows
    assert found[("userstreamd_consumer_batch_size_sum", ())] == rows
    assert found[("userstreamd_consumer_commit_duration_seconds_count", ())] >= 1
    assert found[("userstreamd_websocket_clients", (("kind", "member"),))] == 1
    assert found[("userstreamd_websocket_messages_sent_total", (("kind", "member"),))] >= rows
    assert found[("userstreamd_oldest_unacknowledged_seq", (("group", "db"),))] == rows + 1
    assert found[("userstreamd_ready", ())] == 1
    running = (("component", "producer"), ("state", "running"))
    assert found[("userstreamd_component_state", running)] == 1
    assert found[("userstreamd_component_restarts_total", (("component", "producer"),))] == 0
    assert all(name.startswith("userstreamd_") for name, _ in found)


async def test_health_status_and_what_is_not_served(tmp_path: Path, dsn: str) -> None:
    daemon = in_process_daemon(
        tmp_path, dsn, consumers={"count": 1}, producer={"source": "synthetic"}
    )

    async def ask() -> None:
        async with httpx.AsyncClient(base_url=daemon.http_url) as client:
            await eventually(lambda: daemon.readiness().ready)
            for path in ("/healthz", "/readyz"):
                response = await client.get(path)
                assert response.status_code == 200, response.text
                assert response.json()["checks"] == {
                    "daemon": "ok",
                    "database": "ok",
                    "broadcaster": "ok",
                    "consumers": "ok",
                }
            status = (await client.get("/status.json")).json()
            assert status["websocket"] == {
                "port": daemon.ws_port,
                "scheme": "ws",
                "token_required": False,
            }
            assert status["components"]["broadcaster"] == "running"
            assert status["clients"] == {"plain": 0, "member": 1}
            assert status["stream"]["epoch"] == daemon.hub.epoch
            assert 0 <= status["stream"]["committed_through"] <= daemon.committed_through()
            page = await client.get("/")
            assert page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert page.headers["x-content-type-options"] == "nosniff"
            for path, code in [
                ("/nope", 404),
                ("/../../etc/passwd", 404),
                ("/metrics/../config.toml", 404),
                ("/live.js%00.html", 404),
            ]:
                assert (await client.get(path)).status_code == code, path
            posted = await client.post("/metrics", content=b"x" * 10_000)
            assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
            head = await client.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            odd = await client.get("/metrics?name[]=%ff%fe&x", headers={"accept": b"\xff\xfe"})
            assert odd.status_code == 200
            openmetrics = await client.get(
                "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert openmetrics.text.rstrip().endswith("# EOF")

    assert await run_until(daemon, ask) == 0


async def _raw(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection; what comes back before the server closes (or
    goes quiet for 5 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(5):
            while chunk := await stream.receive_some():
                received += chunk
                if b"\r\n\r\n" in received and not received.startswith(b"HTTP/1.1 2"):
                    break
    return received


async def test_hostile_http_gets_an_answer_and_the_endpoint_carries_on(
    tmp_path: Path, dsn: str
) -> None:
    daemon = in_process_daemon(
        tmp_path, dsn, consumers={"count": 0}, producer={"source": "synthetic"}
    )

    async def attack() -> None:
        port = urlsplit(daemon.http_url).port
        assert port is not None
        # One client holds a connection open and says nothing.
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        answers = [
            await _raw(port, b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n"),
            await _raw(
                port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"
            ),
            await _raw(port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
            await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
        ]
        for answer in answers:
            assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), answer[:80]
        # A WebSocket upgrade on this port is refused: the stream is on the broadcaster.
        async with httpx.AsyncClient() as client:
            upgrade = await client.get(daemon.http_url, headers=UPGRADE)
            assert upgrade.status_code == 403
            # And everyone else is still served.
            assert (await client.get(f"{daemon.http_url}healthz")).status_code == 200
        await idle.aclose()
        # Requests cut off half-way, then a flood of 200 at once from one address: as many
        # as http.max_connections_per_ip (32) are open at a time (the cut-off ones may still
        # hold some), the rest are told 429 at once; the endpoint carries on and the stream
        # flows on.
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /metr")
            await stream.aclose()
        published = daemon.hub.last_seq
        codes: list[int] = []

        async def one(client: httpx.AsyncClient) -> None:
            codes.append((await client.get(f"{daemon.http_url}metrics")).status_code)

        limits = httpx.Limits(max_connections=200)
        async with (
            httpx.AsyncClient(limits=limits, timeout=30) as client,
            trio.open_nursery() as flood,
        ):
            for _ in range(200):
                flood.start_soon(one, client)
        assert len(codes) == 200 and set(codes) <= {200, 429}
        assert codes.count(200) >= 1 and codes.count(429) >= 200 - 32
        async with httpx.AsyncClient() as client:  # (once the flood's connections close)
            for _ in range(100):
                if (await client.get(f"{daemon.http_url}healthz")).status_code == 200:
                    break
                await trio.sleep(0.1)
            else:
                raise AssertionError("/healthz refused 10 s after the flood")
        await eventually(lambda: daemon.hub.last_seq > published, 10)
        # Clients closing with the slow-client code, or sending acks with made-up batch
        # reports, count for nothing.
        for _ in range(3):
            async with open_websocket_url(daemon.url) as ws:
                await ws.get_message()
                await ws.send_message(
                    '{"type":"ack","seqs":[1],"batch":{"rows":9999,"inserted":9999,"commit_s":1}}'
                )
                await ws.aclose(3008, "slow")
        found = await scrape(daemon)
        assert found[("userstreamd_websocket_slow_closes_total", ())] == 0
        assert found[("userstreamd_consumer_batch_size_count", ())] == 0
        assert daemon.metrics.rows_inserted == 0
        assert daemon.hub.bad_frames == 3  # (acks from plain clients: logged, counted)

    assert await run_until(daemon, attack) == 0


async def test_the_page_origin_may_open_the_stream_and_others_may_not(
    tmp_path: Path, dsn: str
) -> None:
    daemon = in_process_daemon(
        tmp_path, dsn, consumers={"count": 0}, producer={"source": "synthetic"}
    )

    async def connect() -> None:
        own = daemon.http_url.rstrip("/")
        for origin in (own, own.replace("127.0.0.1", "localhost")):
            headers = [(b"origin", origin.encode())]
            async with open_websocket_url(daemon.url, extra_headers=headers) as ws:
                assert json.loads(await ws.get_message())["type"] == "welcome"
        async with httpx.AsyncClient() as client:  # (a refused handshake is plain HTTP)
            refused = await client.get(
                daemon.url.replace("ws://", "http://"),
                headers={**UPGRADE, "origin": "http://evil.example:" + own.rpartition(":")[2]},
            )
        assert refused.status_code == 403

    assert await run_until(daemon, connect) == 0


async def test_readyz_follows_the_database_down_and_back(
    tmp_path: Path, dsn: str, postgres: PostgresForTests
) -> None:
    daemon = in_process_daemon(
        tmp_path, dsn, consumers={"count": 1}, producer={"source": "synthetic"}
    )
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    seen: list[dict[str, Any]] = []

    async def readyz(client: httpx.AsyncClient) -> int:
        response = await client.get(f"{daemon.http_url}readyz")
        seen.append(response.json())
        return response.status_code

    async def outage() -> None:
        async with httpx.AsyncClient() as client:
            await eventually(lambda: daemon.readiness().ready)
            assert await readyz(client) == 200
            with postgres.down(str(dbname)):
                with trio.fail_after(5):  # the bound: 503 within 5 s
                    while await readyz(client) != 503:  # noqa: ASYNC110 (polling HTTP)
                        await trio.sleep(0.1)
                assert seen[-1]["checks"]["database"] != "ok"
                assert seen[-1]["checks"]["broadcaster"] == "ok"
                assert "not ready: database" in daemon._status()
            with trio.fail_after(30):
                while await readyz(client) != 200:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            assert "not ready" not in daemon._status()

    assert await run_until(daemon, outage) == 0


@pytest.mark.e2e
def test_committed_counter_equals_the_rows_across_a_kill_9_of_a_worker(
    tmp_path: Path, dsn: str, daemon_factory: Any
) -> None:
    tables = daemon_tables(tmp_path, dsn)
    tables["daemon"]["log_level"] = "info"
    tables["producer"] = {"source": "synthetic", "rate_per_s": 800, "stop_at_position": 4000}
    tables["consumers"].update(processes=True, batch_size=200)
    daemon = daemon_factory(tables)
    metrics_url = daemon.wait_for("daemon.ready")["http_url"] + "metrics"
    wait_until(lambda: query(dsn, "SELECT count(*) FROM incoming_users")[0][0] > 500, 30)
    worker = next(e for e in daemon.events("supervisor.process_started") if e["worker"] == 1)
    os.kill(worker["pid"], signal.SIGKILL)
    daemon.wait_for("producer.stopped_at_position", timeout_s=60)
    committed = ("userstreamd_users_committed_total", (("source", "synthetic"),))
    found: dict[Any, float] = {}

    def all_committed() -> bool:
        found.update(samples(httpx.get(metrics_url).text))
        return found[committed] == 4000

    wait_until(all_committed, 60, "the group commits every user")
    assert query(dsn, "SELECT count(*) FROM incoming_users")[0][0] == 4000
    assert found[("userstreamd_component_restarts_total", (("component", "consumer-1"),))] >= 1
    assert (
        found[
            (
                "userstreamd_users_dead_lettered_total",
                (("source", "synthetic"), ("stage", "consumer")),
            )
        ]
        == 0
    )
    wait_until(lambda: any(e["committed"] == 4000 for e in daemon.events("daemon.stats")), 10)
    assert daemon.stop() == 0
    assert daemon.events("daemon.stopped")[0]["committed"] == 4000


async def test_a_probe_stuck_in_a_silent_database_gives_its_connection_back(
    tmp_path: Path, dsn: str, postgres: PostgresForTests
) -> None:
    """The probe's server process stops answering (SIGSTOP): /readyz says so within the
    probe's timeout; once it answers again after the daemon stopped, the abandoned probe
    closes its connection instead of leaving it open."""
    if postgres.server is None:
        pytest.skip("SIGSTOP needs the embedded server's processes (USERSTREAMD_TEST_DSN is set)")
    daemon = in_process_daemon(
        tmp_path, dsn, consumers={"count": 0}, producer={"source": "synthetic"}
    )
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    probe_pid = "SELECT pid FROM pg_stat_activity WHERE application_name = 'userstreamd-health' AND datname = %s"
    pids: list[int] = []

    async def stop_the_probe_backend() -> None:
        await eventually(lambda: bool(query(dsn, probe_pid, (dbname,))))
        pids.append(query(dsn, probe_pid, (dbname,))[0][0])
        os.kill(pids[0], signal.SIGSTOP)
        await eventually(lambda: "no answer" in daemon.readiness().checks["database"], 10)

    try:
        assert await run_until(daemon, stop_the_probe_backend) == 0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    await eventually(lambda: not query(dsn, probe_pid, (dbname,)), 10)
