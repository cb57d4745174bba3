"""The contract every topology keeps, one set of tests run against each of them.

A topology (`userstreamd.topology.Topology`) decides where the stream lives; whatever it
decides, a daemon that runs it must store every published user exactly once, count what
it did, say when it is ready, and pick up where it stopped. The cases:

- ``embedded``: the shipped default, chosen from the config (`topology.choose`);
- ``fake``: `tests.topology.fake.FakeTopology`, written for these tests (its consumers are
  in-process members of the hub's group: no WebSocket), passed to `Daemon`;
- ``nats``: the shipped JetStream topology on the shared local cluster (marked
  ``cluster``: ``pytest -m cluster`` runs it, ``-m "not cluster"`` leaves it out).

To add a topology (Kafka, Redpanda, ...): write its module, add a case to `CASES` (and
to `case`), and make these pass (and tests/test_group_contract.py's, for the groups its
WebSocket members join: `Topology.member_groups`). Nothing here asks which topology it got beyond the
case's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import query
from tests.helpers import eventually, resumed, run_until, write_config
from tests.topology.fake import FakeTopology
from userstreamd.config import Config, load_config
from userstreamd.ops.health import readiness
from userstreamd.runtime.daemon import Daemon
from userstreamd.sources.synthetic import synthetic_user
from userstreamd.stream.protocol import UserMessage
from userstreamd.stream.records import SECRET_LOGIN_FIELDS, scrub
from userstreamd.topology import PARTS, Context, Topology, choose

N = 300  # users the producer publishes (positions 1..N), then it idles
SEED = "contract"  # (every topology regenerates the same users from it)
RUN_S = 120  # the bound of each daemon's whole run, stop included
TABLES: dict[str, dict[str, Any]] = {
    "producer": {"source": "synthetic", "seed": SEED, "rate_per_s": 1000.0, "stop_at_position": N},
    "consumers": {"count": 2},
}
Factory = Callable[[Context], Topology]
CASES: dict[str, Factory] = {"embedded": choose, "fake": FakeTopology, "nats": choose}


@dataclass(frozen=True)
class Case:
    name: str  # the topology's `name`
    factory: Factory  # what `Daemon(topology=...)` makes it with
    config: Callable[..., Config]  # config(**tables): a config this topology runs

    def daemon(self, config: Config) -> Daemon:
        return Daemon(config, topology=self.factory)


@pytest.fixture(params=["embedded", "fake", pytest.param("nats", marks=pytest.mark.cluster)])
def case(request: pytest.FixtureRequest, tmp_path: Path, dsn: str) -> Case:
    name: str = request.param
    if name == "nats":  # (only this case starts the cluster)
        return Case(name, CASES[name], request.getfixturevalue("nats_config"))

    def make(**tables: dict[str, Any]) -> Config:
        return load_config(write_config(tmp_path, dsn, **tables))

    return Case(name, CASES[name], make)


def assert_each_seq_stored_once(dsn: str) -> None:
    """``incoming_users`` holds seqs 1..N, each once, each the synthetic user at that
    position (seq = position on a fresh stream), without the fake credentials."""
    rows = query(
        dsn,
        """SELECT seq, uuid::text, first_name, last_name, email, username, nat, city, dob, raw
           FROM incoming_users ORDER BY seq""",
    )
    assert [row[0] for row in rows] == list(range(1, N + 1))
    for seq, uid, first, last, email, username, nat, city, dob, raw in rows:
        user = synthetic_user(SEED, seq)
        assert uid == user["login"]["uuid"] == raw["login"]["uuid"]
        assert (first, last) == (user["name"]["first"], user["name"]["last"])
        assert (email, username, nat) == (user["email"], user["login"]["username"], user["nat"])
        assert city == user["location"]["city"]
        assert dob == datetime.fromisoformat(user["dob"]["date"])
        assert not set(SECRET_LOGIN_FIELDS) & set(raw["login"]), "fake credentials stored"


async def until_all_committed(daemon: Daemon) -> None:
    await eventually(lambda: daemon.committed_through() == N, 60)
    await eventually(lambda: daemon.counts().committed_total == N, 10)


async def test_the_topology_declares_what_it_runs(case: Case) -> None:
    config = case.config(**TABLES)
    topology = case.daemon(config).topology  # (made, nothing started)
    cls = type(topology)
    assert cls.name == case.name
    assert "all" in cls.roles and cls.roles <= {"all", *PARTS}
    assert topology.parts <= PARTS
    cls.preflight(config)  # (what it reads before starting is readable)
    assert list(cls.rules(config)) == []  # the contract's config is one it runs
    # A config that asks for more than some topology can do: whatever it objects to is a
    # (key, what was expected) pair naming a real key.
    odd = case.config(
        producer=TABLES["producer"],
        consumers={"count": 0, "group": "a.b"},
        broadcaster={"groups": ["others"]},
    )
    for rule in cls.rules(odd):
        assert isinstance(rule, tuple) and len(rule) == 2, rule
        key, expected = rule
        assert isinstance(expected, str) and expected, rule
        table, _, field = key.partition(".")
        assert hasattr(getattr(odd, table), field), f"{key!r} is not a config key"


async def test_every_seq_is_stored_once_and_the_observers_agree(case: Case, dsn: str) -> None:
    daemon = case.daemon(case.config(**TABLES))

    async def committed_then_observe() -> None:
        await until_all_committed(daemon)
        await eventually(lambda: daemon.readiness().ready, 30)
        await eventually(lambda: daemon.hub is not None and daemon.hub.last_seq == N, 30)
        assert all(v == "ok" for v in daemon.readiness().checks.values())
        counts = daemon.counts()
        assert (counts.last_seq, dict(counts.published)) == (N, {"synthetic": N})
        assert (dict(counts.committed), dict(counts.rejected)) == ({"synthetic": N}, {})
        # The frozen snapshot the observers read says the same.
        status = daemon.status()
        assert status.started and not status.stopping
        assert status.counts == counts
        assert status.committed_through == daemon.committed_through() == N
        states = {c.name: c.state for c in status.components}
        assert set(states.values()) == {"running"}, states
        topology = daemon.topology
        expected = {"producer", "broadcaster"} & topology.parts
        expected |= {"database"} if topology.uses_database else set()
        assert expected <= set(states), states
        assert readiness(status).ready

    with trio.fail_after(RUN_S):
        assert await run_until(daemon, committed_then_observe) == 0
    assert daemon.counts().committed_total == N  # (what it ended with)
    assert daemon.committed_through() == N
    assert_each_seq_stored_once(dsn)


async def test_a_second_run_resumes_and_stores_nothing_twice(case: Case, dsn: str) -> None:
    config = case.config(**TABLES)
    first = case.daemon(config)

    async def committed() -> None:
        await until_all_committed(first)

    with trio.fail_after(RUN_S):
        assert await run_until(first, committed) == 0  # (a graceful stop)
    assert_each_seq_stored_once(dsn)

    second = case.daemon(config)

    async def resumed() -> None:
        await eventually(lambda: second.committed_through() == N, 60)
        await eventually(lambda: second.counts().last_seq == N, 30)
        await eventually(lambda: second.readiness().ready, 30)

    with trio.fail_after(RUN_S):
        assert await run_until(second, resumed) == 0
    # It went on after the first run's last seq: nothing produced or delivered again.
    counts = second.counts()
    assert (counts.last_seq, sum(counts.published.values()), counts.committed_total) == (N, 0, 0)
    assert_each_seq_stored_once(dsn)


@pytest.mark.e2e  # (two daemon runs, two replays each: beside the fast tier)
async def test_a_client_resuming_from_the_start_gets_every_stored_user_after_a_restart_too(
    case: Case, dsn: str
) -> None:
    """The broadcaster's buffer holds 40 users: a client resuming from seq 0 is served the
    rest from the topology's history, each user as stored, through the live end, with no
    gap and no repeat, one user a frame or in ``users`` frames; in the run that stored
    them, and in the next one (whose buffer starts empty)."""
    config = case.config(**TABLES, broadcaster={"buffer_messages": 40, "client_lag_max": 20})

    async def replayed_whole(daemon: Daemon) -> None:
        await eventually(lambda: daemon.committed_through() == N, 60)
        hub = daemon.hub
        assert hub is not None
        await eventually(lambda: hub.last_seq == N, 30)
        stored = dict(query(dsn, "SELECT seq, raw FROM incoming_users"))
        for batch in (1, 100):
            got = await resumed(daemon.url, hub.epoch, 0, N, batch=batch)
            assert [m.seq for m in got if isinstance(m, UserMessage)] == list(range(1, N + 1))
            assert len(got) == N, [m for m in got if not isinstance(m, UserMessage)]
            for m in got:
                assert isinstance(m, UserMessage) and m.epoch == hub.epoch
                assert scrub(m.user) == stored[m.seq], m.seq
        assert daemon.broadcaster is not None
        assert daemon.broadcaster.replayer.statistics().stored >= 2 * (N - 40)

    for _ in range(2):
        daemon = case.daemon(config)
        with trio.fail_after(RUN_S):
            assert await run_until(daemon, partial(replayed_whole, daemon)) == 0
