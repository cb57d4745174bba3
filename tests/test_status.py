"""The observers (readiness, metrics, the ops endpoint) read a `Status` snapshot and
nothing else: each is tested here on snapshots made by hand, with no daemon."""

from __future__ import annotations

import json

import httpx
import trio

from userstreamd.ops.app import OpsApp
from userstreamd.ops.health import readiness
from userstreamd.ops.metrics import Metrics, StatusCollector
from userstreamd.ops.report import stats, summary_line, totals
from userstreamd.ops.server import OpsPortStatistics
from userstreamd.ops.status import FanoutTotals, Status, WebSocketInfo
from userstreamd.runtime.supervisor import ComponentState
from userstreamd.serve.broadcaster import BroadcasterStatistics
from userstreamd.serve.edge import EdgeStatistics
from userstreamd.stream.hub import GroupStatistics, HubStatistics
from userstreamd.topology import StreamCounts

RUNNING = (
    ComponentState("database", "running", 0, None),
    ComponentState("broadcaster", "running", 0, None),
    ComponentState("consumer-1", "running", 2, "OSError: gone"),
)
FEED = HubStatistics(
    epoch="e1",
    last_seq=120,
    clients=3,
    members=1,
    buffered=120,
    buffered_bytes=4096,
    slow_disconnects=1,
    bad_frames=0,
    groups_cut_off=0,
    members_evicted=0,
    groups=(GroupStatistics("db", 1, 100, 10, 10),),
)


def _status(**changes: object) -> Status:
    fields: dict[str, object] = {
        "started": True,
        "components": RUNNING,
        "database": "ok",
        "serves": True,
        "broadcasting": True,
        "topology_checks": {"consumers": "ok"},
        "feed": FEED,
        "sent": {"plain": 300, "member": 100},
        "fanout": FanoutTotals(workers=2, clients=5, sent=50, slow_closes=2),
        "counts": StreamCounts({"synthetic": 120}, {"synthetic": 100}, {}, 120, 100),
        "committed_through": 100,
        "websocket": WebSocketInfo(8765, "ws", False),
    }
    fields.update(changes)
    return Status(**fields)  # type: ignore[arg-type]


def test_ready_when_every_part_is() -> None:
    found = readiness(_status())
    assert found.checks == {
        "daemon": "ok",
        "database": "ok",
        "broadcaster": "ok",
        "consumers": "ok",
    }
    assert found.ready and found.alive


def test_a_dependency_down_is_not_ready_but_alive() -> None:
    found = readiness(_status(database="unreachable: connection refused"))
    assert not found.ready and found.alive
    assert found.problems == {"database": "unreachable: connection refused"}


def test_an_own_part_down_is_neither() -> None:
    backoff = (ComponentState("broadcaster", "backoff", 1, "OSError: port in use"),)
    found = readiness(_status(components=backoff))
    assert found.checks["broadcaster"] == "backoff"
    assert not found.ready and not found.alive


def test_starting_stopping_and_parts_not_run() -> None:
    assert readiness(_status(started=False)).checks["daemon"] == "starting"
    assert readiness(_status(stopping=True)).checks["daemon"] == "stopping"
    alone = readiness(_status(database=None, serves=False, topology_checks={"nats": "ok"}))
    assert alone.checks == {"daemon": "ok", "nats": "ok"}


def _exposition(status: Status) -> str:
    metrics = Metrics()
    metrics.watch(StatusCollector(lambda: status))
    return metrics.exposition()[0].decode()


def test_metrics_are_read_from_the_snapshot() -> None:
    text = _exposition(_status())
    assert 'userstreamd_users_broadcast_total{source="synthetic"} 120.0' in text
    assert 'userstreamd_users_committed_total{source="synthetic"} 100.0' in text
    assert 'userstreamd_websocket_messages_sent_total{kind="fanout"} 50.0' in text
    assert 'userstreamd_websocket_clients{kind="fanout"} 5.0' in text
    assert "userstreamd_websocket_slow_closes_total 3.0" in text
    assert 'userstreamd_oldest_unacknowledged_seq{group="db"} 101.0' in text
    assert 'userstreamd_component_restarts_total{component="consumer-1"} 2.0' in text
    assert "userstreamd_ready 1.0" in text


def test_committed_seq_is_where_the_stream_stands_not_a_count_since_start() -> None:
    """A daemon resumed at seq 100 that has committed 5 users since: the counter says 5
    (it starts at 0 with the daemon), the gauge the stream's committed seq."""
    resumed = _status(
        counts=StreamCounts({"synthetic": 5}, {"synthetic": 5}, {}, 105, 5),
        committed_through=105,
    )
    text = _exposition(resumed)
    assert 'userstreamd_users_committed_total{source="synthetic"} 5.0' in text
    assert "userstreamd_stream_committed_seq 105.0" in text
    assert "# TYPE userstreamd_stream_committed_seq gauge" in text


def test_write_timeouts_of_the_daemon_and_its_fanout_workers_are_one_counter() -> None:
    edge = EdgeStatistics(0, 0, {}, 0, 0, 0, 0, 0, 4096, {}, 0)
    broadcaster = BroadcasterStatistics(edge, {"write_timeout": 2}, 0, write_timeouts=2)
    fanout = FanoutTotals(workers=2, clients=5, sent=50, slow_closes=2, write_timeouts=1)
    text = _exposition(_status(broadcaster=broadcaster, fanout=fanout))
    assert "userstreamd_websocket_write_timeouts_total 3.0" in text
    assert "userstreamd_websocket_write_timeouts_total 0.0" in _exposition(
        _status(fanout=FanoutTotals())
    )


def test_the_ops_ports_turn_aways_drops_and_accept_errors_are_metrics() -> None:
    ops_port = OpsPortStatistics(
        open_connections=3,
        max_connections=128,
        accepted=900,
        over_limit={503: 40, 429: 7},
        write_timeouts=5,
        peers_gone=11,
        accept_errors=2,
    )
    text = _exposition(_status(ops_port=ops_port))
    assert 'userstreamd_http_connections_refused_total{status="429"} 7.0' in text
    assert 'userstreamd_http_connections_refused_total{status="503"} 40.0' in text
    assert "userstreamd_http_accept_errors_total 2.0" in text
    assert 'userstreamd_http_dropped_total{reason="peer_gone"} 11.0' in text
    assert 'userstreamd_http_dropped_total{reason="write_timeout"} 5.0' in text
    # Every series from the start (a panel's increase() has data before the first one):
    quiet = _exposition(_status(ops_port=OpsPortStatistics(0, 256, 0, {}, 0, 0, 0)))
    assert 'userstreamd_http_connections_refused_total{status="429"} 0.0' in quiet
    assert 'userstreamd_http_connections_refused_total{status="503"} 0.0' in quiet
    assert 'userstreamd_http_dropped_total{reason="write_timeout"} 0.0' in quiet
    assert "userstreamd_http_accept_errors_total 0.0" in quiet
    assert "userstreamd_http_" not in _exposition(_status())  # (no ops port: http.enabled off)


def test_metrics_of_a_process_without_a_feed() -> None:
    """A consumer-only node: no hub, no fan-out; what it has is still exposed."""
    status = _status(feed=None, serves=False, broadcasting=False, fanout=FanoutTotals(), sent={})
    text = _exposition(status)
    assert "userstreamd_buffer_messages 0.0" in text
    assert "userstreamd_stream_last_seq 120.0" in text  # (from the counts)
    assert 'kind="fanout"' not in text


def test_each_scrape_reads_a_new_snapshot() -> None:
    snapshots = iter([_status(), _status(counts=StreamCounts({"synthetic": 500}, {}, {}, 500, 0))])
    metrics = Metrics()
    metrics.watch(StatusCollector(lambda: next(snapshots)))
    assert 'users_broadcast_total{source="synthetic"} 120.0' in metrics.exposition()[0].decode()
    assert 'users_broadcast_total{source="synthetic"} 500.0' in metrics.exposition()[0].decode()


async def test_the_ops_endpoint_answers_from_the_snapshot() -> None:
    current = {"status": _status()}
    app = OpsApp(lambda: current["status"], Metrics())
    transport = httpx.ASGITransport(app=app)
    with trio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
            assert (await client.get("/readyz")).status_code == 200
            body = json.loads((await client.get("/status.json")).text)
            assert body["stream"] == {
                "epoch": "e1",
                "last_seq": 120,
                "committed": 100,
                "committed_through": 100,
                "rate_per_s": 0,
                "source": None,
            }
            assert body["clients"] == {"plain": 3, "member": 1}
            assert body["websocket"] == {"port": 8765, "scheme": "ws", "token_required": False}
            current["status"] = _status(database="read-only (transaction_read_only)")
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"] == "read-only (transaction_read_only)"
            assert (await client.get("/healthz")).status_code == 200


def test_the_systemd_line_leads_with_what_is_wrong() -> None:
    assert summary_line(_status()) == (
        "120 users streamed at 0/s from -, 3 clients, committed through seq 100"
    )
    down = summary_line(_status(database="unreachable: refused"))
    assert down.startswith("not ready: database: unreachable: refused; 120 users streamed")


def test_the_stats_event_and_the_totals() -> None:
    fields = stats(_status(rows_inserted=100), rate_per_s=12.345)
    assert fields["rate_per_s"] == 12.35
    assert fields["users_streamed"] == 120 and fields["active_clients"] == 3
    assert fields["components"]["consumer-1"] == {
        "state": "running",
        "restarts": 2,
        "last_exit": "OSError: gone",
    }
    assert totals(_status(rows_inserted=100)) == {
        "published": 0,
        "invalid": 0,
        "fetch_failures": {},
        "backpressure_waits": 0,
        "last_seq": 120,
        "committed_through": 100,
        "committed": 100,
        "rows_inserted": 100,
    }


def _stats_lines(fmt: str, status: Status) -> list[str]:
    """What `log_stats` writes in `fmt` for two intervals of `status`."""
    import io

    import structlog

    from userstreamd.logs import configure_logging
    from userstreamd.ops.report import log_stats

    out = io.StringIO()
    configure_logging("info", fmt, out)

    async def main() -> None:
        with trio.move_on_after(2.5):
            await log_stats(lambda: status, 1.0)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        structlog.reset_defaults()
    return out.getvalue().splitlines()


def test_the_console_stats_line_is_a_sentence_and_json_keeps_the_fields() -> None:
    """Issue 22 item 11: no Python reprs, each count said in words; JSON unchanged."""
    from userstreamd.ops.report import stats
    from userstreamd.serve.broadcaster import BroadcasterStatistics
    from userstreamd.serve.edge import EdgeStatistics

    edge = EdgeStatistics(
        3, 40, {401: 2, 503: 1}, 1, 0, 0, 0, 0, 4096, {}, 0
    )  # (503: the one over the limit)
    broadcaster = BroadcasterStatistics(edge, {"closed_1000": 5}, 0, 0)
    status = _status(rows_inserted=90, broadcaster=broadcaster)
    console = _stats_lines("console", status)
    assert len(console) == 2
    line = console[0]
    assert "daemon.stats: stream at seq 120 (0 published since start, 0/s, from" in line
    assert "), 3 clients;" in line
    assert (
        "PostgreSQL holds every seq through 100 (100 committed since start, 90 of them new rows)"
    ) in line
    assert "consumer-1 running after 2 restarts (last exit: OSError: gone)" in line
    assert "; 3 connections turned away" in line
    for repr_mark in ("EdgeStatistics(", "{", "'", "=None", "users_streamed="):
        assert repr_mark not in line, repr_mark
    assert len(line) < 350

    [first, _] = [json.loads(line) for line in _stats_lines("json", status)]
    assert set(first) == {"event", "level", "timestamp", "component", *stats(status, 0)}
    assert first["users_streamed"] == 120 and first["committed_through"] == 100


def test_fanout_workers_token_lockouts_and_peer_faults_reach_the_status_and_the_stats() -> None:
    """Each fan-out worker locks addresses out and counts peer faults on its own edge: its
    reports carry both, summed like write_timeouts (a replaced process's last counts
    kept), into `FanoutTotals` and the ``daemon.stats`` event."""
    from userstreamd.config import BroadcasterConfig
    from userstreamd.serve.admission import Policy
    from userstreamd.serve.auth import Tokens
    from userstreamd.serve.broadcaster import Broadcaster
    from userstreamd.stream.hub import Hub
    from userstreamd.stream.protocol import FanoutReport, decode_client

    policy = Policy(Tokens((), required=False), own_group="db", groups=frozenset())
    broadcaster = Broadcaster(Hub("e"), BroadcasterConfig(), policy)

    def report(worker: int, pid: int, token_lockouts: int, peer_faults: int) -> FanoutReport:
        counts = {"token_lockouts": token_lockouts, "peer_faults": peer_faults}
        return FanoutReport(
            worker=worker, pid=pid, clients=1, sent=10, slow_closes=0, write_timeouts=1, **counts
        )

    broadcaster._fanout_report(1, report(1, 100, token_lockouts=2, peer_faults=3))
    broadcaster._fanout_report(2, report(2, 200, token_lockouts=1, peer_faults=1))
    broadcaster._fanout_report(3, report(1, 101, token_lockouts=1, peer_faults=0))  # replaced
    totals = FanoutTotals(2, **broadcaster.fanout_totals())
    assert totals == FanoutTotals(
        workers=2,
        clients=2,
        sent=30,
        slow_closes=0,
        write_timeouts=3,
        token_lockouts=4,
        peer_faults=4,
    )
    assert stats(_status(fanout=totals), 0)["fanout"] == totals
    assert "fanout" not in stats(_status(fanout=FanoutTotals()), 0)  # (no workers)
    older = decode_client(
        '{"type":"fanout","worker":1,"pid":1,"clients":0,"sent":0,"slow_closes":0}'
    )
    assert isinstance(older, FanoutReport)
    assert (older.token_lockouts, older.peer_faults, older.write_timeouts) == (0, 0, 0)
