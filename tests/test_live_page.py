"""The live page in a real browser: headless Chromium (Debian's chromium and
chromedriver, driven by selenium) against a real daemon and a real PostgreSQL.

No test here is skipped: without /usr/bin/chromium and /usr/bin/chromedriver each one
fails, saying what to install. The browser resolves randomuser.me to nothing, so the
page shows what it shows offline (initials instead of pictures) and nothing leaves the
machine.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from userstreamd.sources.synthetic import synthetic_user

from .conftest import daemon_tables
from .helpers import free_ports, in_process_daemon, run_until, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,1000",
    "--host-resolver-rules=MAP randomuser.me ~NOTFOUND",
)
SCREENSHOT_COPY = Path("/tmp/userstreamd-live.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_COUNTRY = "<b>bold</b>"

# What the page shows, in one round trip.
SNAPSHOT = """
const text = (selector, root = document) => root.querySelector(selector)?.textContent ?? null;
return {
  rows: [...document.querySelectorAll("#users .user")].map((row) => ({
    seq: Number(row.dataset.seq),
    epoch: row.dataset.epoch,
    name: text(".name", row),
    country: text(".country", row),
    initials: text(".initials", row),
  })),
  connection: text("#connection"),
  connectionState: document.getElementById("connection").dataset.state,
  state: text("#state"),
  ready: document.getElementById("state").dataset.ready,
  rate: text("#rate"),
  total: text("#total"),
  clients: text("#clients"),
  countries: document.querySelectorAll("#countries .bar").length,
  genders: document.querySelectorAll("#genders .bar").length,
  notices: [...document.querySelectorAll("#notices .notice")].map((n) => ({
    kind: n.dataset.kind ?? "",
    text: n.textContent,
  })),
  duplicates: Number(document.body.dataset.duplicates ?? 0),
};
"""
Snapshot = dict[str, Any]


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium with a profile of its own; quit whatever the test did."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the live page tests need Debian's chromium "
            "and chromedriver (apt-get install chromium chromium-driver)"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(15)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


def snapshot(driver: WebDriver) -> Snapshot:
    result: Snapshot = driver.execute_script(SNAPSHOT)
    return result


def wait_for_page(
    driver: WebDriver, predicate: Callable[[Snapshot], bool], timeout_s: float, what: str
) -> Snapshot:
    """The first snapshot that satisfies `predicate`, polled every 100 ms."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = snapshot(driver)
        if predicate(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}; the page shows {seen}")
        time.sleep(0.1)


def seqs(seen: Snapshot) -> list[int]:
    return [row["seq"] for row in seen["rows"]]


def digits(figure: str) -> int:
    """A figure as the page formats it (1,234 or 1 234) as a number."""
    return int("".join(c for c in figure if c.isdigit()))


def is_live(seen: Snapshot) -> bool:
    return seen["connectionState"] == "live" and "live" in seen["connection"]


def page_errors(driver: WebDriver, *expected: str) -> list[str]:
    """What the console says went wrong, script errors and CSP violations included, but
    for the pictures randomuser.me cannot serve offline and messages holding any of the
    `expected` strings."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and not any(s in entry["message"] for s in ("randomuser.me", *expected))
    ]


def streaming_tables(tmp_path: Path, dsn: str, rate_per_s: float) -> dict[str, dict[str, Any]]:
    tables = daemon_tables(tmp_path, dsn)
    tables["producer"] = {"source": "synthetic", "rate_per_s": rate_per_s}
    return tables


@pytest.mark.e2e
def test_users_appear_with_the_pipeline_state(
    tmp_path: Path, dsn: str, daemon_factory: Any, browser: WebDriver
) -> None:
    """Users arrive within seconds, newest first; the figures, the pipeline's state and
    the connection are shown; the page breaks no rule of its CSP. The screenshot is kept
    (also as /tmp/userstreamd-live.png) for a human to look at."""
    daemon = daemon_factory(streaming_tables(tmp_path, dsn, 20))
    ready = daemon.wait_for("daemon.ready")
    browser.get(ready["http_url"])
    seen = wait_for_page(
        browser,
        lambda s: len(s["rows"]) >= 3 and all(row["name"].strip() for row in s["rows"]),
        5,
        "three users with names",
    )
    assert all(row["country"] and row["initials"] for row in seen["rows"]), seen["rows"]
    shown = seqs(seen)
    assert shown == sorted(shown, reverse=True) and len(set(shown)) == len(shown)
    seen = wait_for_page(
        browser,
        lambda s: (
            is_live(s)
            and s["ready"] == "true"
            and s["state"] == "ready"
            and s["clients"].isdigit()
            and int(s["clients"]) >= 1  # this page
            and float(s["rate"]) > 0
        ),
        10,
        "live, ready, this page among the clients, a rate",
    )
    assert digits(seen["total"]) >= len(seen["rows"]) >= 3
    assert seen["countries"] >= 1 and seen["genders"] >= 1
    assert seen["duplicates"] == 0 and seen["notices"] == []
    assert page_errors(browser) == []

    shot = tmp_path / "live.png"
    assert browser.get_screenshot_as_file(str(shot))
    assert shot.stat().st_size > 1000 and shot.read_bytes().startswith(PNG_MAGIC)
    shutil.copyfile(shot, SCREENSHOT_COPY)  # for a human to look at


@pytest.mark.e2e
@pytest.mark.parametrize("buffered", [100_000, 20], ids=["from-the-buffer", "from-storage"])
def test_the_page_opens_with_the_newest_users_of_the_stream(
    tmp_path: Path, dsn: str, daemon_factory: Any, browser: WebDriver, buffered: int
) -> None:
    """Issue 22 item 16: at a slow rate a visitor saw an empty page for seconds. The
    producer stops after 80 users, so no user arrives while the page is open: what it
    shows was asked for with ?epoch=&since= 50 behind the last seq of /status.json, and
    came from the replay buffer, or, when the buffer holds only 20, from storage. Not
    counted as a rate, and no gap said."""
    tables = streaming_tables(tmp_path, dsn, 200)
    tables["producer"]["stop_at_position"] = 80
    tables["broadcaster"] |= {"buffer_messages": buffered, "client_lag_max": 10}
    daemon = daemon_factory(tables)
    ready = daemon.wait_for("daemon.ready")
    daemon.wait_for("producer.stopped_at_position")
    wait_until(lambda: len(daemon.events("producer.published")) == 80, 30, "80 users published")
    last = max(e["seq"] for e in daemon.events("producer.published"))
    browser.get(ready["http_url"])
    seen = wait_for_page(
        browser, lambda s: is_live(s) and len(s["rows"]) >= 50, 10, "live with 50 users"
    )
    assert seqs(seen) == list(range(last, last - 50, -1))
    assert all(row["name"].strip() for row in seen["rows"])
    assert digits(seen["total"]) == 50 and seen["duplicates"] == 0
    assert float(seen["rate"]) == 0, "users replayed on opening are not a rate"
    assert seen["notices"] == []
    assert page_errors(browser) == []
    metrics = httpx.get(f"{ready['http_url']}metrics").text
    from_storage = 'userstreamd_history_users_replayed_total{source="stored"} 0.0' not in metrics
    assert from_storage == (buffered < 50), metrics


@pytest.mark.e2e
def test_the_page_resumes_the_epoch_after_a_restart(
    tmp_path: Path, dsn: str, daemon_factory: Any, browser: WebDriver
) -> None:
    """The daemon drains, stops and starts again on the same ports; the second resumes
    the epoch from its checkpoint, and the page (resuming with ?epoch=&since=) goes on
    from the next seq: nothing twice, nothing missing, no gap."""
    tables = streaming_tables(tmp_path, dsn, 10)
    tables["broadcaster"]["port"], tables["http"]["port"] = free_ports(2)
    first = daemon_factory(tables)
    browser.get(first.wait_for("daemon.ready")["http_url"])
    before = wait_for_page(
        browser, lambda s: is_live(s) and len(s["rows"]) >= 3, 10, "live with three users"
    )
    epoch = before["rows"][0]["epoch"]

    assert first.stop(signal.SIGTERM) == 0, first.log_path.read_text()[-3000:]
    (drained,) = first.events("daemon.drained")
    noted = drained["last_seq"]
    down = wait_for_page(
        browser,
        lambda s: (
            s["connectionState"] == "reconnecting"
            and "reconnecting" in s["connection"]
            and max(seqs(s)) == noted  # every user published before the stop
        ),
        10,
        f"reconnecting, having shown seq {noted}",
    )
    assert {row["epoch"] for row in down["rows"]} == {epoch}

    second = daemon_factory(tables, name="second")
    second.wait_for("daemon.ready")
    (resumed,) = second.events("daemon.stream_resumed")
    assert (resumed["epoch"], resumed["seq"]) == (epoch, noted)
    after = wait_for_page(
        browser,
        lambda s: is_live(s) and sum(seq > noted for seq in seqs(s)) >= 5,
        30,
        f"live again with five users after seq {noted}",
    )
    shown = seqs(after)
    assert noted in shown, "the users from before the restart scrolled away"
    assert shown == list(range(shown[0], shown[0] - len(shown), -1)), (
        "the seqs across the restart are not consecutive (newest first)"
    )
    assert {row["epoch"] for row in after["rows"]} == {epoch}
    assert after["duplicates"] == 0
    assert not [n for n in after["notices"] if n["kind"] == "gap"], after["notices"]
    # (while the daemon was away, the status and the stream were refused)
    assert page_errors(browser, "ERR_CONNECTION_REFUSED") == []


async def test_a_hostile_record_shows_as_text(tmp_path: Path, dsn: str, browser: WebDriver) -> None:
    """Markup in a record is text on the page; a javascript: picture is no picture."""
    tables = streaming_tables(tmp_path, dsn, 2)
    daemon = in_process_daemon(tmp_path, dsn, **tables)

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def look() -> None:
        await in_thread(browser.get, daemon.http_url)
        await in_thread(wait_for_page, browser, is_live, 10, "live")
        await in_thread(
            browser.execute_script, "window.alert = () => { window.__alerted = true; };"
        )
        user = synthetic_user("hostile", 1_000_000)
        user["name"]["first"] = HOSTILE_NAME
        user["location"]["country"] = HOSTILE_COUNTRY
        user["picture"]["thumbnail"] = "javascript:alert(1)"
        message = daemon.hub.publish_nowait(user, "synthetic", 1_000_000)
        seen = await in_thread(
            wait_for_page,
            browser,
            lambda s: message.seq in seqs(s),
            10,
            f"the hostile user (seq {message.seq})",
        )
        (row,) = [row for row in seen["rows"] if row["seq"] == message.seq]
        assert row["name"] == f"{HOSTILE_NAME} {user['name']['last']}"
        assert row["country"] == HOSTILE_COUNTRY
        assert row["initials"] == "<" + user["name"]["last"][0].upper()
        found = await in_thread(
            browser.execute_script,
            f"""
            const row = document.querySelector('#users .user[data-seq="{message.seq}"]');
            return {{
              injected: document.querySelectorAll('#users img[src="x"], #users b').length,
              rowImages: row.querySelectorAll("img").length,
              scriptSrcs: [...document.querySelectorAll("img")]
                .filter((img) => !img.src.startsWith("https://randomuser.me/")).length,
              alerted: window.__alerted === true,
            }};
            """,
        )
        assert found == {"injected": 0, "rowImages": 0, "scriptSrcs": 0, "alerted": False}
        with pytest.raises(NoAlertPresentException):
            await in_thread(lambda: browser.switch_to.alert)
        assert await in_thread(page_errors, browser) == []

    assert await run_until(daemon, look) == 0
