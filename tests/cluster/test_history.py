"""The stored stream read back on the NATS bus (`topology.nats.history`), against a real
3-node JetStream cluster, through the `stream.history.Pages` API."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import trio

from tests.cluster.test_bus import outlet, publish
from tests.helpers import resumed, run_until
from userstreamd.runtime.daemon import Daemon
from userstreamd.stream.history import HistoryUnavailable, Page, UnknownEpoch
from userstreamd.stream.protocol import Gap, UserMessage
from userstreamd.testing.nats import LocalCluster
from userstreamd.topology.nats.bus import Bus, open_bus
from userstreamd.topology.nats.history import REMOVED, open_history

pytestmark = pytest.mark.cluster


def seqs_of(pages: list[Page]) -> list[tuple[str, int, int]]:
    """(type, first seq, last seq) of every frame, in order."""
    found = []
    for page in pages:
        for frame in page.frames:
            f = msgspec.json.decode(frame)
            if f["type"] == "gap":
                found.append(("gap", f["from_seq"], f["to_seq"]))
            else:
                found.append((f["type"], f["seq"], f["seq"]))
    return found


async def stored(bus: Bus, seq: int) -> bytes:
    message = await bus.call(bus.js.get_msg, bus.stream, seq)
    return bytes(message.data or b"")


async def stored_user(bus: Bus, seq: int) -> Any:
    """The record of the user stored at `seq`, decoded."""
    return msgspec.json.decode(await stored(bus, seq))["user"]


async def test_every_seq_comes_once_in_order_exactly_as_stored_a_page_at_a_time(
    nats_config: Any,
) -> None:
    async with open_bus(nats_config(), "test") as bus:
        await publish(await outlet(bus, 0), 1, 2100)
        pages = []
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 0) as history:
                while not pages or pages[-1].frames:
                    pages.append(await history.next(500))
        frames = [frame for page in pages for frame in page.frames]
        assert frames == [await stored(bus, seq) for seq in range(1, 2101)]
    assert [(p.users, p.through) for p in pages] == [
        (500, 500),
        (500, 1000),
        (500, 1500),
        (500, 2000),
        (100, 2100),
        (0, 2100),  # (nothing more stored: an empty page, through unchanged)
    ]
    assert seqs_of(pages) == [("user", seq, seq) for seq in range(1, 2101)]


async def test_a_purged_range_is_one_gap_with_its_exact_seqs_then_the_users(
    nats_config: Any,
) -> None:
    async with open_bus(nats_config(), "test") as bus:
        await publish(await outlet(bus, 0), 1, 300)
        await bus.call(bus.js.purge_stream, bus.stream, 201)  # keeps seqs 201..300
        await bus.call(bus.js.delete_msg, bus.stream, 250)
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 120) as history:
                first = await history.next(40)
                rest = [await history.next(100), await history.next(100)]
    # (a gap is one frame, whatever it covers)
    assert (first.users, first.through, len(first.frames)) == (39, 239, 40)
    gap = msgspec.json.decode(first.frames[0])
    assert gap == {
        "type": "gap",
        "epoch": bus.epoch,
        "from_seq": 121,
        "to_seq": 200,
        "reason": REMOVED,
    }
    assert seqs_of([first, *rest]) == [
        ("gap", 121, 200),
        *[("user", seq, seq) for seq in range(201, 250)],
        ("gap", 250, 250),  # (deleted on its own)
        *[("user", seq, seq) for seq in range(251, 301)],
    ]
    assert (rest[0].through, rest[1].through, rest[1].frames) == (300, 300, [])


async def test_seqs_purged_up_to_the_end_are_a_gap_and_seqs_to_come_are_not(
    nats_config: Any,
) -> None:
    async with open_bus(nats_config(), "test") as bus:
        await publish(await outlet(bus, 0), 1, 50)
        await bus.call(bus.js.purge_stream, bus.stream)
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 10) as history:
                page = await history.next(100)
                assert seqs_of([page]) == [("gap", 11, 50)]
                assert (await history.next(100)).through == 50
                await publish(await outlet(bus, 50), 51, 5)
                after = await history.next(100)
    assert seqs_of([after]) == [("user", seq, seq) for seq in range(51, 56)]


async def test_a_seq_ahead_of_the_stream_is_an_empty_page_and_another_epoch_is_unknown(
    nats_config: Any,
) -> None:
    async with open_bus(nats_config(), "test") as bus:
        await publish(await outlet(bus, 0), 1, 10)
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 25) as history:
                page = await history.next(100)
            with pytest.raises(UnknownEpoch):
                async with open_history(bus, "0123456789abcdef", 0):
                    pass
    assert (page.frames, page.through, page.users, page.next_epoch) == ([], 25, 0, None)


async def test_a_stream_made_again_under_a_replay_is_an_unknown_epoch(
    nats_config: Any,
) -> None:
    config = nats_config()
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 10)
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 0) as history:
                assert (await history.next(100)).through == 10
                await bus.call(bus.js.delete_stream, bus.stream)
                async with open_bus(config, "again") as again:  # (made anew: another epoch)
                    assert again.epoch != bus.epoch
                    with pytest.raises(UnknownEpoch):
                        await history.next(100)


async def test_a_message_not_a_user_of_the_stream_is_a_gap_over_its_seq(
    nats_config: Any,
) -> None:
    async with open_bus(nats_config(), "test") as bus:
        await publish(await outlet(bus, 0), 1, 3)
        await bus.call(bus.js.publish, bus.subject, b"not a user")  # seq 4
        await publish(await outlet(bus, 4), 4, 2)  # seqs 5, 6
        with trio.fail_after(30):
            async with open_history(bus, bus.epoch, 0) as history:
                page = await history.next(100)
                assert history.foreign == 1
    assert seqs_of([page]) == [
        ("user", 1, 1),
        ("user", 2, 2),
        ("user", 3, 3),
        ("gap", 4, 4),
        ("user", 5, 5),
        ("user", 6, 6),
    ]
    assert msgspec.json.decode(page.frames[3])["reason"] == "not a user"
    assert page.users == 5


async def test_a_node_lost_during_a_replay_leaves_no_silent_hole(
    tmp_path: Path, nats_config: Any
) -> None:
    """The node the replay is connected to is killed after its first page: the replay
    either completes (the client reconnects, the page is asked again) or stops with
    HistoryUnavailable; what it gave is every seq, in order, either way."""
    with LocalCluster(tmp_path / "nats") as cluster:
        config = nats_config(cluster={"servers": cluster.urls, "replicas": 3})
        async with open_bus(config, "test") as bus:
            await publish(await outlet(bus, 0), 1, 3000)
            pages: list[Page] = []
            ended = "complete"
            with trio.fail_after(60):
                async with open_history(bus, bus.epoch, 0) as history:
                    pages.append(await history.next(250))
                    url = bus.nc.connected_url
                    assert url is not None
                    node = [urlsplit(u).port for u in cluster.urls].index(url.port)
                    await trio.to_thread.run_sync(cluster.kill, node)
                    try:
                        while pages[-1].through < 3000:
                            pages.append(await history.next(250))
                    except HistoryUnavailable:
                        ended = "unavailable"
    got = seqs_of(pages)
    assert got == [("user", seq, seq) for seq in range(1, len(got) + 1)], ended
    assert pages[-1].through == len(got)
    if ended == "complete":
        assert len(got) == 3000


async def test_a_cluster_that_cannot_answer_ends_the_replay_as_unavailable_within_seconds(
    tmp_path: Path, nats_config: Any
) -> None:
    """Every node lost after the first page: the next page is asked again for a few
    seconds, then the replay ends with HistoryUnavailable (the client is closed with a
    code it resumes from), not a hang and not an empty page."""
    with LocalCluster(tmp_path / "nats") as cluster:
        config = nats_config(cluster={"servers": cluster.urls, "replicas": 3})
        async with open_bus(config, "test") as bus:
            await publish(await outlet(bus, 0), 1, 100)
            async with open_history(bus, bus.epoch, 0) as history:
                first = await history.next(60)
                for node in range(3):
                    await trio.to_thread.run_sync(cluster.kill, node)
                with trio.fail_after(30), pytest.raises(HistoryUnavailable):
                    await history.next(60)
            # (back, so that the bus can close: nats-py's drain refuses while reconnecting)
            async with trio.open_nursery() as nursery:  # (together: each waits for quorum)
                for node in range(3):
                    nursery.start_soon(trio.to_thread.run_sync, cluster.restart, node)
    assert seqs_of([first]) == [("user", seq, seq) for seq in range(1, 61)]


async def test_a_client_resuming_on_a_broadcaster_gets_the_purged_range_as_one_gap(
    nats_config: Any,
) -> None:
    """Over the wire: a broadcaster (its buffer: 20 users) serves a client resuming from
    seq 100 of a stream purged up to seq 200 its gap over 101..200, with its exact bounds
    and why, then every user after it from the stream, each as stored."""
    config = nats_config(
        database={"dsn": "postgresql://nobody@127.0.0.1:1/none"},
        broadcaster={"buffer_messages": 20, "client_lag_max": 10},
    )
    async with open_bus(config, "test") as bus:
        await publish(await outlet(bus, 0), 1, 300)
        await bus.call(bus.js.purge_stream, bus.stream, 201)
        stored = {seq: await stored_user(bus, seq) for seq in range(201, 301)}
    daemon = Daemon(config, role="broadcaster")
    got: list[UserMessage | Gap] = []

    async def resume() -> None:
        got.extend(await resumed(daemon.url, bus.epoch, 100, 300, batch=100))

    assert await run_until(daemon, resume) == 0
    assert got[0] == Gap(epoch=bus.epoch, from_seq=101, to_seq=200, reason=REMOVED)
    users = got[1:]
    assert [m.seq for m in users if isinstance(m, UserMessage)] == list(range(201, 301))
    assert all(isinstance(m, UserMessage) and m.user == stored[m.seq] for m in users)
