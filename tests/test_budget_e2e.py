"""A spent budget end to end: the daemon as a child process against the fake API, at a rate
the budget cannot carry, with the synthetic fallback (item 3 of issue 22: the stream used to
stop for the rest of the window while /readyz said ready and /status.json said randomuser).

At test scale: 2,000 users per 20 s (the API's 20,000 per 5 minutes, shrunk) at 400 users/s,
so one page of the API's lasts 5 s and the fallback serves the other 15 s of each window.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from .conftest import daemon_tables
from .fakeapi import FakeRandomUserAPI

pytestmark = pytest.mark.e2e

BUDGET, WINDOW_S, RATE = 2000, 20.0, 400


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_a_spent_budget_switches_to_the_fallback_without_a_pause_and_back(
    tmp_path: Any, dsn: str, daemon_factory: Any
) -> None:
    with FakeRandomUserAPI(rate_limit_users=BUDGET, rate_limit_window_s=WINDOW_S) as api:
        tables = daemon_tables(tmp_path, dsn)
        tables["producer"] = {
            "source": "randomuser",
            "rate_per_s": RATE,
            "seed": "spent",
            "fallback": "synthetic",
        }
        tables["randomuser"] = {
            "url": api.url,
            "budget_users": BUDGET,
            "budget_window_s": WINDOW_S,
        }
        daemon = daemon_factory(tables)
        url = daemon.wait_for("daemon.http_listening")["url"]
        seen: list[tuple[float, str, bool]] = []  # (time, status.json's source, /readyz 200)
        with httpx.Client(base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 3 * WINDOW_S
            back_for_s = None  # until 2 s after the API's second page began to go out
            while time.monotonic() < deadline and (back_for_s is None or back_for_s < 2):
                source = http.get("status.json").json()["stream"]["source"]
                seen.append((time.time(), source, http.get("readyz").status_code == 200))
                if back_for_s is None and daemon.events("producer.fallback_off"):
                    back_for_s = 0.0
                elif back_for_s is not None and source == "randomuser":
                    back_for_s += 0.2
                time.sleep(0.2)
        assert daemon.stop() == 0, daemon.log_path.read_text()[-3000:]

        # A restart inside the window (spent at its second page): the fallback at once.
        again = daemon_factory(tables, name="again")
        again.wait_for("producer.published")
        again.wait_for("producer.fallback_off", timeout_s=WINDOW_S + 5)
        deadline = time.monotonic() + 10  # (the fallback's page fetched ahead goes out first)
        while time.monotonic() < deadline and not any(
            e["source"] == "randomuser" for e in again.events("producer.published")
        ):
            time.sleep(0.2)
        assert again.stop() == 0, again.log_path.read_text()[-3000:]
        statuses = [r.status for r in api.requests]

    published = daemon.events("producer.published")
    runs = [(s, list(g)) for s, g in itertools.groupby(published, key=lambda e: e["source"])]
    assert [s for s, _ in runs][:3] == ["randomuser", "synthetic", "randomuser"], [
        (s, len(g)) for s, g in runs
    ]
    times = [_at(e) for e in published]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    longest = max(gaps)
    print(
        f"{len(published)} users, longest pause {longest:.3f} s, runs",
        [(s, len(g)) for s, g in runs],
    )
    # The bar is 1 s (measured: 0.02-0.34 s on idle cores); the assertion allows for
    # busy CI cores and still fails the old code, which paused for the rest of the window.
    assert longest < WINDOW_S / 4, "no pause for the rest of the window"
    assert not daemon.events("producer.budget_wait"), "never waiting with a fallback"
    assert [e["seq"] for e in published] == list(range(1, len(published) + 1))

    assert 429 not in statuses, "the budget kept the API's limit"
    [first_spent, *_] = daemon.events("producer.budget_spent")
    assert first_spent["level"] == "warning"
    back_at = _at(runs[2][1][0])  # the first of the API's users again
    assert back_at - _at(runs[0][1][0]) >= WINDOW_S - 1, "not before the window allows"

    # What the operator sees: the fallback's name while it serves, ready throughout.
    fallback_from, fallback_to = _at(runs[1][1][0]), _at(runs[1][1][-1])
    during = [s for t, s, _ in seen if fallback_from + 1 < t < fallback_to - 1]
    after = [s for t, s, _ in seen if t > back_at + 1]
    assert during and set(during) == {"synthetic"}
    assert after and after[0] == "randomuser"
    assert all(ready for t, _, ready in seen if t > fallback_from)

    # After the restart: what the ledger remembered, the fallback first, the API again.
    restored = again.events("producer.budget_restored")
    assert [e["users"] for e in restored] == [BUDGET], "the second page: the first left the window"
    second = again.events("producer.published")
    sources = [s for s, _ in itertools.groupby(e["source"] for e in second)]
    assert sources[:2] == ["synthetic", "randomuser"], sources
    assert again.events("producer.budget_spent")[0]["level"] == "warning"
