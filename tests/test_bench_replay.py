"""`userstreamd bench replay`: a few thousand users stored, then one client resuming from
seq 0, batched and not, on both buses. What is asserted is the work counted (every seq
held once, in order; the JSON's shape), never a rate from such a short run; and that a
client's run counts what it was sent (`bench.replay.Replay`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench import _run_bench
from userstreamd.bench.replay import Replay
from userstreamd.bench.replay_load import run_replay_load
from userstreamd.stream.protocol import Gap

USERS = 3000


def _check(out: Path, bus: str, buffer_messages: int | None) -> None:
    report = json.loads(out.read_text())
    assert (report["bus"], report["mode"]) == (bus, "replay")
    replay = report["replay"]
    assert (replay["users"], replay["buffer_messages"]) == (USERS, buffer_messages)
    assert replay["fill_s"] > 0 and len(replay["epoch"]) == 16
    batched, plain = replay["runs"]
    assert (batched["batch"], plain["batch"]) == (1000, None)
    for run in (batched, plain):
        assert run["complete"] and run["consecutive"], run
        assert run["held"] == USERS and run["gaps"] == [] and run["out_of_order"] == []
        assert run["seconds"] > 0 and run["users_per_s"] > 0
    # (1,000 users a frame at most: a few frames; one a user without batch)
    assert USERS // 1000 <= batched["frames"] < USERS // 10
    assert plain["frames"] >= USERS
    if buffer_messages is not None:  # (the users before the buffer: read from storage)
        assert batched["from_storage"] >= USERS - buffer_messages
        assert plain["from_storage"] >= USERS - buffer_messages


@pytest.mark.e2e
def test_bench_replay_holds_every_seq_in_order_batched_and_not(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    result = _run_bench("replay", "--users", str(USERS), "--json", str(out), timeout_s=240)
    _check(out, "embedded", None)
    assert "seqs 1..N each once, in order" in result.stdout


@pytest.mark.e2e
def test_bench_replay_reads_postgresql_beyond_the_buffer(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    options = ("--buffer-messages", "500", "--json", str(out))
    _run_bench("replay", "--users", str(USERS), *options, timeout_s=240)
    _check(out, "embedded", 500)


@pytest.mark.cluster
def test_bench_replay_on_nats_reads_the_stream_beyond_the_buffer(tmp_path: Path) -> None:
    """The broadcasters keep 500 users: the rest comes from the JetStream stream."""
    out = tmp_path / "replay.json"
    options = ("--bus", "nats", "--buffer-messages", "500", "--json", str(out))
    _run_bench("replay", "--users", str(USERS), *options, timeout_s=240)
    _check(out, "nats", 500)


def test_a_run_counts_users_in_order_and_what_the_server_said_is_gone() -> None:
    replay = Replay(10)
    for seq in (1, 2, 3):
        replay.take(seq)
    replay.skip(Gap(epoch="e", from_seq=4, to_seq=6, reason="no longer in the stream"))
    for seq in (7, 9, 10):
        replay.take(seq)
    assert replay.past_the_end
    figures = replay.figures(None)
    # (held: each the next seq expected; 9 came where 8 was: not held in order)
    assert (figures["held"], figures["complete"], figures["consecutive"]) == (5, False, False)
    assert figures["gaps"] == [{"from_seq": 4, "to_seq": 6, "reason": "no longer in the stream"}]
    assert figures["out_of_order"] == [(8, 9)]
    assert figures["users_per_s"] is None  # (no rate for a run that is not complete)


@pytest.mark.e2e
def test_bench_replays_measures_both_windows_and_replays_from_storage() -> None:
    """`bench replays`, small: 5 clients resuming 2,000 back (the buffer holds 20,000:
    the fill of 12,000 puts the start in it, so a small run reads its buffer, and the
    figures' shape is what is checked), a live client in each window."""
    report = run_replay_load(replays=5, back=2000, window_s=2.0, live=1, settle_s=1.0)
    assert (report["back"], report["live_rate_per_s"]) == (2000, 1000.0)
    without, with_ = report["without"], report["with"]
    assert (without["replays"], with_["replays"]) == (0, 5)
    for window in (without, with_):
        assert window["commit_rate_per_s"] > 0 and window["live_samples"] > 0
        assert 0 < window["live_p50_ms"] <= window["live_p99_ms"]
        assert window["daemon_rss_max_mib"] > 0
    assert without["replayed_from_storage"] == 0
