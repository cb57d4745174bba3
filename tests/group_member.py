"""A group member in a process of its own, for tests/test_group_contract.py.

    python -m tests.group_member URL STORE [--ack-first K]

Joins the group URL names; stores each user it gets as a line ``seq uuid`` appended to
STORE, flushed and fsynced (its commit), then acknowledges it. With ``--ack-first K``
it acknowledges only its first K users: from then on it stores what it gets and holds
it (a member that committed and died before its ack), until killed.
"""

from __future__ import annotations

import argparse
import json
import os

import trio

from userstreamd.stream.client import open_ws


async def member(url: str, store: str, ack_first: int | None) -> None:
    stored = 0
    async with open_ws(url) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] != "user":
                continue
            seq = message["seq"]
            commit(store, f"{seq} {message['user']['login']['uuid']}\n")
            stored += 1
            if ack_first is None or stored <= ack_first:
                await ws.send_message(json.dumps({"type": "ack", "seqs": [seq]}))


def commit(store: str, line: str) -> None:
    """Append `line` to `store`, durably (blocking, as a database commit would)."""
    with open(store, "a", encoding="utf-8") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("store")
    parser.add_argument("--ack-first", type=int, default=None)
    args = parser.parse_args()
    trio.run(member, args.url, args.store, args.ack_first)


if __name__ == "__main__":
    main()
