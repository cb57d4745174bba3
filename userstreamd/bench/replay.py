"""``userstreamd bench replay [--bus embedded|nats]``: how fast a client that resumes from
the stream's beginning gets every stored user, on either topology. The servers are the
fan-out bench's (`fanout_servers`: one daemon; or a local NATS cluster, a producer and
broadcasters as processes), each with what says how much of the stream is stored
(`ReplayServer.stored`), chosen once from `LAUNCHERS` by the bus's name.

1. fill: the producer (synthetic source) asked for FILL_RATE_PER_S users/s until the
   store holds ``--users`` N (embedded: N users committed into PostgreSQL, as
   ``userstreamd_users_committed_total`` says; nats: the JetStream stream's last seq at
   N), then slowed to LIVE_RATE_PER_S: the live stream goes on, slowly, during the runs.
   With ``--buffer-messages K`` the broadcasters keep K users in their replay buffer
   (``broadcaster.buffer_messages``; by default 100,000): the rest is read from the
   store;
2. the epoch, from a plain client's welcome;
3. for each run (``?batch=1000``, then one user per frame): one client connects with
   ``?epoch=E&since=0`` through the one client of the stream (`stream.client`, which
   resumes from the last seq it holds if the server closes it) and reads until it holds
   seqs 1..N. Reported: seconds from the connect to the last of them, users/s, how
   many of them the server's replayer read from storage and from its buffer (its
   ``userstreamd_history_users_replayed_total`` by ``source``, before and after), frames,
   the welcome's time, the client's CPU (the bench process's: it runs nothing else
   meanwhile), reconnects, the gaps the server sent (with their seqs and reason:
   the users it said are gone) and whether the seqs held were exactly 1..N, in order.

A run that does not hold N users within RUN_TIMEOUT_S (or DEADLINE_PER_USER_S each,
whichever is longer) reports what it held. Figures are reported, never judged.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import WebSocketConnection

from ..stream.client import StreamClient, describe_lost
from ..stream.protocol import Gap, Welcome, decode_server, decode_timed
from . import procs
from .daemon_child import BenchError, DaemonChild
from .display import Steps, open_steps
from .fanout_servers import DaemonServer, NatsServers

FILL_RATE_PER_S = 50_000.0
LIVE_RATE_PER_S = 1.0
FILL_TIMEOUT_S = 900.0
POLL_S = 0.25
RUN_TIMEOUT_S = 120.0
DEADLINE_PER_USER_S = 0.002  # (a run of 200,000 users: 400 s at most)
BATCH = 1000  # the ?batch= of the first run (the protocol's most)
RUNS = (BATCH, None)  # each run's ?batch= (None: one user per frame)
COMMITTED = "userstreamd_users_committed_total"
REPLAYED = "userstreamd_history_users_replayed_total"


class EmbeddedReplay(DaemonServer):
    """The daemon; its history is what its consumers committed to PostgreSQL."""

    def set_buffer(self, messages: int) -> None:
        self.child.tables["broadcaster"]["buffer_messages"] = messages

    def stored(self) -> int:
        return int(self.child.metrics().get(COMMITTED, 0.0))

    def replayer(self) -> DaemonChild:
        """The process the client replays from."""
        return self.child


class NatsReplay(NatsServers):
    """The cluster and the roles; the history is the JetStream stream."""

    def set_buffer(self, messages: int) -> None:
        self.broadcaster["buffer_messages"] = messages

    def stored(self) -> int:
        return self.probe.last_seq()

    def replayer(self) -> DaemonChild:
        """The process the client replays from."""
        return self.broadcasters[0]  # (the first of `urls`)


def replayed(child: DaemonChild) -> Counter[str]:
    """The users the daemon's replays sent, by where they were read (REPLAYED's
    ``source`` label: ``stored``, ``buffered``)."""
    text = httpx.get(child.http_url + "metrics", timeout=10.0).text
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REPLAYED:
                found[sample.labels.get("source", "")] += int(sample.value)
    return found


ReplayServer = EmbeddedReplay | NatsReplay
LAUNCHERS: dict[str, type[ReplayServer]] = {"embedded": EmbeddedReplay, "nats": NatsReplay}


class Replay:
    """One client's run: what it held of seqs 1..`users`, and when."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.expected = 1  # the next seq in order
        self.held = 0  # users of seqs 1..N received in order
        self.frames = 0
        self.gaps: list[dict[str, Any]] = []
        self.out_of_order: list[tuple[int, int]] = []  # (expected, got), the first few
        self.welcome_s: float | None = None
        self.done_s: float | None = None
        self.cpu_s = 0.0  # the bench process's CPU meanwhile (the client is all it runs)
        self.lost: list[str] = []  # why connections ended before the end

    def take(self, seq: int) -> None:
        if seq != self.expected and len(self.out_of_order) < 10:
            self.out_of_order.append((self.expected, seq))
        if seq == self.expected and seq <= self.users:
            self.held += 1
        self.expected = max(self.expected, seq + 1)

    def skip(self, gap: Gap) -> None:
        self.gaps.append(
            {"from_seq": gap.from_seq, "to_seq": gap.to_seq, "reason": gap.reason}
            if len(self.gaps) < 10
            else {}
        )
        self.expected = max(self.expected, gap.to_seq + 1)

    @property
    def past_the_end(self) -> bool:
        """Seq N is accounted for (held, or said to be gone)."""
        return self.expected > self.users

    def figures(self, batch: int | None) -> dict[str, Any]:
        complete = self.held == self.users
        seconds = self.done_s if complete else None
        return {
            "batch": batch,
            "users": self.users,
            "held": self.held,
            "complete": complete,  # (seqs 1..N held: then seconds and users/s)
            "consecutive": complete and not self.gaps and not self.out_of_order,
            "seconds": round(seconds, 3) if seconds is not None else None,
            "users_per_s": round(self.users / seconds, 1) if seconds else None,
            "welcome_ms": round(self.welcome_s * 1000, 1) if self.welcome_s is not None else None,
            "client_cpu_pct": round(100 * self.cpu_s / seconds, 1) if seconds else None,
            "frames": self.frames,
            "reconnects": len(self.lost),
            "lost": self.lost[:5],
            "gaps": [g for g in self.gaps if g],
            "gap_count": len(self.gaps),
            "out_of_order": self.out_of_order,
        }


async def _epoch(url: str) -> str:
    """The stream's epoch, from a plain client's welcome."""
    found: list[str] = []

    async def session(ws: WebSocketConnection, welcome: Welcome) -> None:
        found.append(welcome.epoch)

    with trio.fail_after(30):
        await StreamClient(url).run_once(session)
    return found[0]


async def _replay(url: str, epoch: str, users: int, batch: int | None) -> Replay:
    """One run of step 3 (see the module's docstring)."""
    replay = Replay(users)
    query = f"?batch={batch}" if batch else ""
    client = StreamClient(url.rstrip("/") + "/" + query)
    client.resume_after(epoch, 0)
    start, cpu = time.perf_counter(), time.process_time()

    async def session(ws: WebSocketConnection, welcome: Welcome) -> None:
        if replay.welcome_s is None:
            replay.welcome_s = time.perf_counter() - start
        while not replay.past_the_end:
            frame = await ws.get_message()
            replay.frames += 1
            timed = decode_timed(frame)
            if timed.type == "user":
                replay.take(timed.seq)
            elif timed.type == "users":
                for item in timed.items:
                    replay.take(item.seq)
            elif timed.type == "gap":
                gap = decode_server(frame)
                assert isinstance(gap, Gap)
                replay.skip(gap)
            client.resume_after(epoch, replay.expected - 1)
            client.progressed()
        replay.done_s = time.perf_counter() - start
        replay.cpu_s = time.process_time() - cpu

    def on_lost(exc: BaseException) -> None:
        replay.lost.append(describe_lost(exc))

    with trio.move_on_after(max(RUN_TIMEOUT_S, users * DEADLINE_PER_USER_S)):
        await client.run(session, on_lost)
    return replay


def fill(server: ReplayServer, steps: Steps, users: int) -> float:
    """Step 1: seconds until the store held `users` (BenchError if not in time)."""
    step = steps.step(f"fill: {users:,} users at up to {FILL_RATE_PER_S:,.0f}/s")
    start = time.monotonic()
    while (stored := server.stored()) < users:
        if time.monotonic() - start > FILL_TIMEOUT_S:
            after = f"after {FILL_TIMEOUT_S:.0f} s"
            raise BenchError(f"the store held {stored:,} of {users:,} users {after}")
        step.status(f"{stored:,} stored")
        time.sleep(POLL_S)
    seconds = time.monotonic() - start
    server.set_rate(LIVE_RATE_PER_S)
    step.done(f"{seconds:.1f} s ({users / seconds:,.0f} users/s)")
    return seconds


def run_replay(
    *,
    bus: str = "embedded",
    users: int = 200_000,
    buffer_messages: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The steps of the module's docstring on the `bus` topology (the broadcasters'
    replay buffer of `buffer_messages`, if given); the JSON report."""
    report: dict[str, Any] = {
        "users": users,
        "fill_rate_per_s_asked": FILL_RATE_PER_S,
        "buffer_messages": buffer_messages,
    }
    with (
        tempfile.TemporaryDirectory(prefix="usd-bench-") as folder,
        open_steps(progress and sys.stderr.isatty()) as steps,
    ):
        server = LAUNCHERS[bus](Path(folder), 1)
        if buffer_messages is not None:
            server.set_buffer(buffer_messages)
        try:
            server.start(steps, FILL_RATE_PER_S)
            report["server"] = server.name
            report["fill_s"] = round(fill(server, steps, users), 2)
            url = server.urls[0]
            report["epoch"] = epoch = trio.run(_epoch, url)
            runs = []
            for batch in RUNS:
                how = f"?batch={batch}" if batch else "one user per frame"
                step = steps.step(f"replay from seq 0, {how}")
                before = replayed(server.replayer())
                replay = trio.run(_replay, url, epoch, users, batch)
                sent = replayed(server.replayer())
                sent.subtract(before)
                runs.append({**replay.figures(batch), "from_storage": sent["stored"]})
                runs[-1]["from_buffer"] = sent["buffered"]
                took = f" in {replay.done_s:.1f} s" if replay.done_s is not None else ""
                step.done(f"{replay.held:,} held{took}")
            report["runs"] = runs
        finally:
            server.stop()
    return {**procs.report_head("replay"), "replay": report, "bus": bus}


def print_replay(report: dict[str, Any]) -> None:
    r = report["replay"]
    option = LAUNCHERS[report["bus"]].option
    print(
        f"userstreamd {report['version']} bench replay{option}: {r['users']:,} users stored "
        f"({r['server']}; filled in {r['fill_s']:g} s; replay buffer "
        f"{r['buffer_messages'] or 'as configured by default'}), one client resuming from "
        "seq 0; "
        f"Python {report['python']}, {report['cpus']} CPUs"
    )
    for run in r["runs"]:
        how = f"?batch={run['batch']}" if run["batch"] else "one user per frame"
        if run["complete"]:
            all_in = f"all {run['users']:,} in {run['seconds']:g} s"
            held = f"{run['users_per_s']:,.0f} users/s, {all_in}"
        else:
            held = f"INCOMPLETE: {run['held']:,} of {run['users']:,} held"
        check = "seqs 1..N each once, in order" if run["consecutive"] else "NOT consecutive"
        cpu = f", the client {run['client_cpu_pct']:.0f}% of a core" if run["complete"] else ""
        read = f"{run['from_storage']:,} from storage, {run['from_buffer']:,} from the buffer"
        print(
            f"  {how:<20} {held}{cpu}; {read}; {run['frames']:,} frames, welcome after "
            f"{run['welcome_ms']} ms, {run['reconnects']} reconnects; {check}"
        )
        for gap in run["gaps"]:
            print(f"    gap {gap['from_seq']}..{gap['to_seq']}: {gap['reason']}")
