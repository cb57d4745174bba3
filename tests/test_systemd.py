"""systemd integration: sd_notify over a real datagram socket, credentials, and the unit
file checked by systemd's own tools (``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from userstreamd.credentials import read_credential
from userstreamd.runtime.systemd import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "userstreamd.service"
MAX_EXPOSURE = 2.0


class Receiver:
    """The systemd end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def receive(self) -> list[str]:
        """The next datagram as its list of assignments (waits at most 5 s)."""
        self.sock.settimeout(5.0)
        return self.sock.recv(65536).decode().split("\n")

    def assert_nothing_received(self) -> None:
        # A Unix datagram is queued at the receiver before sendto() returns, so nothing
        # queued now means nothing was sent.
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(65536)


def _bound(address: str | bytes, notify_socket: str) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        yield Receiver(sock, notify_socket)
    finally:
        sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    assert len(os.fsencode(path)) < 108, "AF_UNIX paths are limited to 107 bytes"
    yield from _bound(str(path), str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"userstreamd-test-{uuid.uuid4().hex}"
    yield from _bound(b"\0" + name.encode(), "@" + name)


# --- Notifier ---------------------------------------------------------------------


def test_disabled_without_notify_socket(receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None  # no socket: nobody to ping
    assert notifier.send("READY=1") is False
    assert notifier.ready("up") is False
    assert notifier.status("busy") is False
    assert notifier.watchdog() is False
    assert notifier.stopping("bye") is False
    assert notifier.reloading() is False
    notifier.close()
    receiver.assert_nothing_received()


def test_each_method_sends_its_assignments(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    assert notifier.enabled
    pid = os.getpid()

    assert notifier.ready()
    assert receiver.receive() == ["READY=1", f"MAINPID={pid}"]
    assert notifier.ready("streaming users")
    assert receiver.receive() == ["READY=1", "STATUS=streaming users", f"MAINPID={pid}"]
    assert notifier.status("3 clients")
    assert receiver.receive() == ["STATUS=3 clients"]
    assert notifier.watchdog()
    assert receiver.receive() == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert receiver.receive() == ["STOPPING=1"]
    assert notifier.stopping("draining consumers")
    assert receiver.receive() == ["STOPPING=1", "STATUS=draining consumers"]
    assert notifier.send("READY=1", "STATUS=ok")
    assert receiver.receive() == ["READY=1", "STATUS=ok"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = receiver.receive()
    assert reloading == "RELOADING=1"
    key, _, value = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after

    notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog() is False
    receiver.assert_nothing_received()


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_environ(abstract_receiver.environ())
    assert notifier.enabled
    assert notifier.ready("up")
    assert abstract_receiver.receive() == ["READY=1", "STATUS=up", f"MAINPID={os.getpid()}"]
    assert notifier.watchdog()
    assert abstract_receiver.receive() == ["WATCHDOG=1"]
    notifier.close()


def test_status_text_cannot_inject_assignments(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    assert notifier.status("line one\nREADY=1")
    assert receiver.receive() == ["STATUS=line one READY=1"]
    notifier.close()


def test_socket_is_created_once(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    assert notifier.watchdog()
    first = notifier._sock
    assert first is not None
    assert first.getblocking() is False
    assert first.get_inheritable() is False  # SOCK_CLOEXEC
    assert notifier.watchdog()
    assert notifier._sock is first
    assert receiver.receive() == ["WATCHDOG=1"]
    assert receiver.receive() == ["WATCHDOG=1"]
    notifier.close()


def test_notify_socket_is_left_in_the_environment(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.notify_socket)
    notifier = Notifier.from_environ()
    assert notifier.ready()
    assert os.environ["NOTIFY_SOCKET"] == receiver.notify_socket
    notifier.close()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    receiver: Receiver, extra: dict[str, str], expected: float | None
) -> None:
    notifier = Notifier.from_environ(receiver.environ(**extra))
    assert notifier.watchdog_interval_s == expected


def test_missing_socket_returns_false_and_logs_once(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-socket"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(missing)})
    assert notifier.enabled
    with capture_logs() as logs:
        assert notifier.ready("up") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    failures = [entry for entry in logs if entry["event"] == "systemd.notify_failed"]
    assert len(failures) == 1, logs
    assert failures[0]["notify_socket"] == str(missing)
    notifier.close()


def test_missing_abstract_socket_returns_false() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@userstreamd-none-{uuid.uuid4().hex}"})
    with capture_logs():
        assert notifier.watchdog() is False
    notifier.close()


def test_relative_notify_socket_disables(tmp_path: Path) -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert [entry["event"] for entry in logs] == ["systemd.notify_socket_invalid"]


# --- Credentials ------------------------------------------------------------------


def test_read_credential_strips_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("s3cret pass\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_credential("db-password", env) == "s3cret pass"
    (tmp_path / "db-password").write_text("no newline")
    assert read_credential("db-password", env) == "no newline"


def test_read_credential_absent(tmp_path: Path) -> None:
    assert read_credential("db-password", {}) is None
    assert read_credential("db-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    missing_dir = {"CREDENTIALS_DIRECTORY": str(tmp_path / "gone")}
    assert read_credential("db-password", missing_dir) is None


def test_read_credential_empty_means_none(tmp_path: Path) -> None:
    """The unit's `SetCredential=db-password:\\n` fallback reads as "no password"."""
    (tmp_path / "db-password").write_text("\n")
    assert read_credential("db-password", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_read_credential_rejects_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid credential name"):
        read_credential("../etc/passwd", {"CREDENTIALS_DIRECTORY": str(tmp_path)})


# --- The unit file ----------------------------------------------------------------


def _directives(text: str) -> dict[str, list[str]]:
    """{"Section.Key": [values]} of a unit file (comments and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def test_unit_declares_the_contract_with_the_daemon() -> None:
    d = _directives(UNIT.read_text())
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.WatchdogSec"] == ["30s"]
    assert d["Service.StateDirectory"] == ["userstreamd"]
    assert d["Service.DynamicUser"] == ["yes"]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.KillMode"] == ["mixed"]
    assert d["Service.ExecStart"] == [
        "/opt/userstreamd/.venv/bin/userstreamd --config /etc/userstreamd/config.toml"
    ]
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Service.LoadCredential"] == [
        "db-password:/etc/userstreamd/db-password",
        "ws-tokens:/etc/userstreamd/ws-tokens",
        "grafana-password:/etc/userstreamd/grafana-password",
    ]
    # The fallbacks that make the files optional must be what read_credential
    # turns into None (see test_read_credential_empty_means_none).
    assert d["Service.SetCredential"] == [
        "db-password:\\n",
        "ws-tokens:\\n",
        "grafana-password:\\n",
    ]
    # Room for broadcaster.max_connections (the shipped default) and the rest.
    assert int(d["Service.LimitNOFILE"][0]) >= 4096 + 128
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_unit_comments_say_where_state_dir_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit's install notes match Config.state_path: under the unit, the shipped
    relative state_dir lands in $STATE_DIRECTORY, not next to the config in /etc."""
    from userstreamd.config import Config, DaemonConfig

    text = UNIT.read_text()
    assert "in /etc, which is read-only" not in text
    assert "$STATE_DIRECTORY" in text
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "var-lib"))
    config = Config(daemon=DaemonConfig(state_dir="state"), path="/etc/userstreamd/config.toml")
    assert config.state_path == (tmp_path / "var-lib" / "state").resolve()


def test_every_directive_has_a_comment() -> None:
    lines = UNIT.read_text().splitlines()
    uncommented = [
        line
        for previous, line in itertools.pairwise(lines)
        if line and not line.startswith(("#", "[")) and not previous.startswith("#")
    ]
    assert uncommented == []


def _analyzer() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (needed to check the unit file)")
    return found


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at this checkout's real executable.

    `systemd-analyze verify` checks that ExecStart='s binary exists and is executable;
    /opt/userstreamd/.venv (the install location the unit names) does not exist on a
    development machine, so verify would only ever report that. Pointing ExecStart at
    the userstreamd script next to sys.executable (or `python -m userstreamd`) keeps
    every other line as shipped, so verify checks everything else for real.
    """
    script = Path(sys.executable).parent / "userstreamd"
    command = str(script) if script.exists() else f"{sys.executable} -m userstreamd"
    text = UNIT.read_text()
    rewritten, count = re.subn(
        r"^ExecStart=/opt/userstreamd/\.venv/bin/userstreamd ",
        f"ExecStart={command} ",
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, "ExecStart= not found in the expected form"
    copy = tmp_path / UNIT.name
    copy.write_text(rewritten)
    return copy


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run([_analyzer(), *args], capture_output=True, text=True, timeout=60, env=env)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _runnable_copy(tmp_path)
    result = _run("verify", str(unit))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert unit.name not in output, output


def test_verify_does_check_exec_start(tmp_path: Path) -> None:
    """Without the rewrite verify does complain: the test above really checks something."""
    if Path("/opt/userstreamd/.venv/bin/userstreamd").exists():
        pytest.skip("userstreamd is installed at the unit's path on this machine")
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    result = _run("verify", str(unit))
    assert result.returncode != 0
    assert "/opt/userstreamd/.venv/bin/userstreamd" in result.stdout + result.stderr


def test_unit_security_exposure(tmp_path: Path) -> None:
    unit = _runnable_copy(tmp_path)
    result = _run("security", "--offline=yes", "--no-pager", str(unit))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"exposure {exposure} > {MAX_EXPOSURE}; what scores:\n"
        + "\n".join(line for line in output.splitlines() if line.startswith("✗"))
    )
    print(f"systemd-analyze security exposure: {exposure}")
