"""The config file: strict, typed, and explained when wrong - before anything starts."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import msgspec
import pytest

from tests.helpers import wait_until
from userstreamd.commands.cli import main
from userstreamd.config import Config, load_config
from userstreamd.errors import ConfigError
from userstreamd.topology import config_rules

REPO = Path(__file__).resolve().parent.parent


def _error_of(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code = main(["--config", str(path), "check"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"expected one line, got {err!r}"
    assert str(path) in err
    return err


def test_websocket_groups_are_no_error_on_the_nats_bus(tmp_path: Path) -> None:
    path = tmp_path / "groups.toml"
    path.write_text(
        '[cluster]\nbus = "nats"\n'
        '[broadcaster]\ngroups = ["audit", "eu.audit"]\nallow_ad_hoc_groups = true\n'
    )
    config = load_config(path, rules=config_rules)
    assert config.broadcaster.groups == ["audit", "eu.audit"]


def test_typo_key_names_file_table_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error_of(tmp_path, "[producer]\nrate_per_sec = 5\n", capsys)
    assert "producer.rate_per_sec: unknown key" in err


def test_typo_table_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error_of(tmp_path, "[consumer]\ncount = 5\n", capsys)
    assert "consumer: unknown key" in err


def test_wrong_type_says_what_was_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error_of(tmp_path, '[broadcaster]\nport = "8765"\n', capsys)
    assert "broadcaster.port: expected `int`, got `str`" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[producer]\nrate_per_s = 0\n", "producer.rate_per_s: expected `float` > 0"),
        ("[broadcaster]\nport = 70000\n", "broadcaster.port: expected `int` <= 65535"),
        ('[producer]\nsource = "twitter"\n', "producer.source: invalid enum value 'twitter'"),
        ('[producer]\nnat = ["US", "XX"]\n', "producer.nat: unknown nationality 'XX'"),
        ('[randomuser]\nurl = "randomuser.me"\n', "randomuser.url: expected an http(s) URL"),
        (
            "[consumers]\nreconnect_min_s = 9.0\nreconnect_max_s = 1.0\n",
            "consumers.reconnect_max_s: expected >= reconnect_min_s",
        ),
        ("[producer\n", "not valid TOML"),
        ('[cluster]\nbus = "kafka"\n', "cluster.bus: invalid enum value 'kafka'"),
        (
            '[cluster]\nservers = ["http://127.0.0.1:4222"]\n',
            "cluster.servers: expected nats://host:port or tls://host:port, got 'http://",
        ),
        ("[cluster]\nservers = []\n", "cluster.servers: expected at least one server URL"),
        ('[cluster]\nstream = "a.b"\n', "cluster.stream: expected `str` matching"),
        ("[cluster]\nreplicas = 7\n", "cluster.replicas: expected `int` <= 5"),
        (
            '[cluster]\ntls_cert_file = "c.pem"\n',
            "cluster.tls_key_file: expected a file too",
        ),
        (
            '[cluster]\ncredentials_file = "a.creds"\nuser = "u"\n',
            "cluster.user: expected either credentials_file or user",
        ),
        (
            '[cluster]\nbus = "nats"\n[consumers]\ngroup = "db.main"\n',
            "consumers.group: expected no '.' with cluster.bus = \"nats\"",
        ),
        (
            '[database]\nlisten_port = 5433\nlisten_host = "0.0.0.0"\n',
            "database.listen_host: expected a loopback address (127.0.0.1, ::1 or localhost), "
            "got '0.0.0.0'",
        ),
        (
            '[database]\nlisten_port = 5433\nlisten_host = "db.example.net"\n',
            "database.listen_host: expected a loopback address",
        ),
        (
            '[database]\nlisten_port = 5433\ndsn = "host=db.example.net"\n',
            "database.listen_port: expected 0 with database.dsn set, got 5433",
        ),
        ("[database]\nlisten_port = 8766\n", "database.listen_port: expected a port other than"),
    ],
)
def test_invalid_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    assert expected in _error_of(tmp_path, text, capsys)


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"userstreamd: config error: {path}: no such config file\n"


def test_bad_config_starts_nothing(tmp_path: Path) -> None:
    """A real process: non-zero exit, no state directory, no log line on stdout."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_levle = "debug"\n')
    result = subprocess.run(
        [sys.executable, "-m", "userstreamd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "daemon.log_levle: unknown key" in result.stderr
    assert not (tmp_path / "state").exists()


def test_shipped_config_is_valid_and_documents_every_key() -> None:
    shipped = load_config(REPO / "config.toml")
    # The shipped file spells out the defaults.
    assert msgspec.structs.replace(shipped, path="") == Config()
    documented = tomllib.loads((REPO / "config.toml").read_text())
    for table, struct in msgspec.structs.asdict(Config()).items():
        if table == "path":
            continue
        assert set(documented[table]) == set(msgspec.structs.asdict(struct)), table


def test_relative_state_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[daemon]\nstate_dir = "st"\n')
    assert load_config(tmp_path / "c.toml").state_path == tmp_path.resolve() / "st"


def test_password_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text('[database]\npassword_env = "MY_PG_SECRET"\n')
    config = load_config(tmp_path / "c.toml")
    monkeypatch.delenv("MY_PG_SECRET", raising=False)
    assert config.db_password() is None
    monkeypatch.setenv("MY_PG_SECRET", "s3cret")
    assert config.db_password() == "s3cret"


def test_relative_state_dir_goes_under_systemds_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text('[daemon]\nstate_dir = "st"\n')
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/userstreamd:/var/lib/other")
    assert load_config(tmp_path / "c.toml").state_path == Path("/var/lib/userstreamd/st")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[broadcaster]\nhost = "0.0.0.0"\n', "broadcaster.auth: host '0.0.0.0' is not loopback"),
        ('[broadcaster]\ntokens_file = "nope"\n', "broadcaster.tokens_file: cannot read"),
        ('[broadcaster]\ntls_cert_file = "c.pem"\n', "broadcaster.tls_key_file: expected a file"),
        ('[broadcaster]\ntls_cert_file = "c"\ntls_key_file = "k"\n', "tls_cert_file/tls_key_file"),
        ('[broadcaster]\ngroups = ["db"]\n', "'db' is the daemon's own group"),
        ('[broadcaster]\nallowed_origins = ["evil"]\n', "broadcaster.allowed_origins: expected"),
        ('[broadcaster]\ngroups = ["a b"]\n', "broadcaster.groups[0]"),
    ],
)
def test_the_public_port_is_checked_before_anything_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    expected: str,
) -> None:
    monkeypatch.delenv("USERSTREAMD_TOKENS", raising=False)
    assert expected in _error_of(tmp_path, text, capsys)


def test_every_mistake_is_reported_with_its_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[daemon]\nlog_levle = "debug"\n\n[broadcaster]\nport = "8765"\n\n'
        "[producer]\nrate_per_s = 0\npage_size = 5\n"
    )
    assert main(["check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"userstreamd: config error: {path}:2: daemon.log_levle: unknown key; did you mean 'log_level'?",
        f"userstreamd: config error: {path}:5: broadcaster.port: expected `int`, got `str`",
        f"userstreamd: config error: {path}:8: producer.rate_per_s: expected `float` > 0.0",
        f"userstreamd: config error: {path}:9: producer.page_size: unknown key; it belongs in [randomuser]",
    ]


def test_type_range_and_rule_mistakes_are_all_reported_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule (the 18-character seed) is checked even while other keys are refused, so
    that one run of check names every mistake (issue 22 item 9)."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[producer]\nrate_per_s = "fast"\nseed = "abcdefghijklmnopqr"\n\n'
        "[broadcaster]\nport = 70000\n"
    )
    assert main(["check", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(
        f"userstreamd: config error: {path}:2: producer.rate_per_s: expected `float`, got `str`"
    )
    assert lines[1].startswith(
        f"userstreamd: config error: {path}:3: producer.seed: expected any length but 18 "
        "characters, got 'abcdefghijklmnopqr'"
    )
    assert lines[2] == (
        f"userstreamd: config error: {path}:6: broadcaster.port: expected `int` <= 65535"
    )


def test_a_rule_about_a_refused_value_is_left_out(tmp_path: Path) -> None:
    """restart_delay_min_s is refused: comparing max_s with its default would be a
    mistake the file does not hold."""
    path = tmp_path / "c.toml"
    path.write_text('[supervisor]\nrestart_delay_min_s = "soon"\nrestart_delay_max_s = 0.01\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).splitlines() == [
        f"{path}:2: supervisor.restart_delay_min_s: expected `float`, got `str`"
    ]


def test_a_cross_key_rule_still_runs_and_points_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[consumers]\nreconnect_min_s = 9.0\n\nreconnect_max_s = 1.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(f"{path}:4: consumers.reconnect_max_s: expected >=")


def test_the_environment_overrides_any_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[broadcaster]\nport = 8765\n\n[database]\ndsn = "host=a"\n')
    environ = {
        "USERSTREAMD_BROADCASTER_PORT": "9000",
        "USERSTREAMD_PRODUCER_NAT": "US, gb",
        "USERSTREAMD_CONSUMERS_PROCESSES": "auto",
        "USERSTREAMD_DAEMON_LOG_FORMAT": "json",
        "USERSTREAMD_DATABASE_DSN": "host=b port=5433",
        "USERSTREAMD_RANDOMUSER_INC": '["name", "login"]',
        "USERSTREAMD_PRODUCER_KEEP_CREDENTIALS": "true",
        # Variables of other tables are not overrides, and not errors.
        "USERSTREAMD_DB_PASSWORD": "x",
        "USERSTREAMD_TOKENS": "x",
        "USERSTREAMD_TEST_DSN": "x",
    }
    config = load_config(path, environ=environ)
    assert config.broadcaster.port == 9000
    assert config.producer.nat == ["US", "gb"]
    assert config.consumers.processes == "auto"
    assert config.daemon.log_format == "json"
    assert config.database.dsn == "host=b port=5433"
    assert config.randomuser.inc == ["name", "login"]
    assert config.producer.keep_credentials is True
    assert load_config(path, environ={}).broadcaster.port == 8765


def test_a_bad_environment_override_is_reported_by_its_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[broadcaster]\nport = 70000\n")
    environ = {
        "USERSTREAMD_CONSUMERS_COUNT": "many",
        "USERSTREAMD_BROADCASTER_PORTT": "1",
        "USERSTREAMD_PRODUCERS_RATE_PER_S": "5",
    }
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert str(caught.value).splitlines() == [
        f"{path}:2: broadcaster.port: expected `int` <= 65535",
        "$USERSTREAMD_BROADCASTER_PORTT: broadcaster.portt: unknown key; did you mean 'port'?",
        "$USERSTREAMD_CONSUMERS_COUNT: consumers.count: expected `int`, got `str`",
        "$USERSTREAMD_PRODUCERS_RATE_PER_S: producers: unknown table; did you mean 'producer'?",
    ]
    # A rule broken by an override names the variable, not the file.
    environ = {"USERSTREAMD_RANDOMUSER_URL": "ftp://x/api/1.4/"}
    with pytest.raises(ConfigError, match=r"^\$USERSTREAMD_RANDOMUSER_URL: randomuser.url: "):
        load_config(REPO / "config.toml", environ=environ)


def test_check_effective_fills_defaults_marks_overrides_and_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[database]\ndsn = "postgresql://ingest:s3cret@db.example:5432/users"\n'
        "[producer]\nrate_per_s = 50\n"
    )
    monkeypatch.setenv("USERSTREAMD_BROADCASTER_PORT", "9000")
    assert main(["check", "--config", str(path), "--effective"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert 'dsn = "postgresql://ingest:***@db.example:5432/users"' in out
    assert "port = 9000  # from $USERSTREAMD_BROADCASTER_PORT" in out
    # It is TOML, and loading it gives the same configuration (but for the masked secret).
    effective = tmp_path / "effective.toml"
    effective.write_text(out)
    reloaded, original = load_config(effective), load_config(path)
    assert tomllib.loads(out)["producer"]["rate_per_s"] == 50
    for table in ("daemon", "producer", "randomuser", "broadcaster", "consumers", "supervisor"):
        assert getattr(reloaded, table) == getattr(original, table), table
    assert reloaded.database.dsn == "postgresql://ingest:***@db.example:5432/users"


def test_the_packaged_default_config_is_the_shipped_one() -> None:
    assert (REPO / "userstreamd" / "config.toml").read_text() == (REPO / "config.toml").read_text()


def test_a_role_alone_needs_the_nats_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["--config", str(path), "run", "--role", "broadcaster"]) == 2
    err = capsys.readouterr().err
    assert f'{path}: run --role broadcaster: expected [cluster] bus = "nats"' in err
    assert not (tmp_path / "state").exists()


def test_an_unreadable_nats_credential_is_a_config_error_before_anything_starts(
    tmp_path: Path,
) -> None:
    """A real process: exit 2 naming the file, with no NATS server to reach at all."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[http]\nenabled = false\n'
        '[cluster]\nbus = "nats"\nservers = ["nats://127.0.0.1:9"]\n'
        'credentials_file = "missing.creds"\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "userstreamd",
            "--config",
            str(config),
            "run",
            "--role",
            "broadcaster",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "[cluster]: cannot read a credential" in result.stderr
    assert "missing.creds" in result.stderr


def test_the_nats_password_comes_from_the_environment_else_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from userstreamd.topology.nats.bus import connect_options

    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nbus = "nats"\nuser = "userstreamd"\n')
    config = load_config(path)
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "nats-password").write_text("from systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    monkeypatch.delenv("USERSTREAMD_NATS_PASSWORD", raising=False)
    assert connect_options(config, "test")["password"] == "from systemd"
    monkeypatch.setenv("USERSTREAMD_NATS_PASSWORD", "from the environment")
    assert connect_options(config, "test")["password"] == "from the environment"
    assert "token" not in connect_options(config, "test")


@pytest.mark.e2e
def test_only_roles_that_serve_websocket_clients_need_their_tokens(tmp_path: Path) -> None:
    """A real process each: the consumer gets past its config (and waits for NATS, here
    unreachable); the broadcaster, with auth on and no token, exits 2 at once."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
        '[http]\nenabled = false\n[broadcaster]\nhost = "0.0.0.0"\nauth = "token"\n'
        'tokens_env = "NO_SUCH_VARIABLE"\n'
        '[database]\ndsn = "postgresql://nobody@127.0.0.1:9/none"\n'
        '[cluster]\nbus = "nats"\nservers = ["nats://127.0.0.1:9"]\n'
    )
    command = [sys.executable, "-m", "userstreamd", "--config", str(config), "run", "--role"]
    refused = subprocess.run([*command, "broadcaster"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "token" in refused.stderr
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        consumer = subprocess.Popen([*command, "consumer"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: '"nats.unreachable"' in log.read_text() or consumer.poll() is not None,
            30,
            "the consumer tried NATS",
        )
        assert consumer.poll() is None, log.read_text()
    finally:
        consumer.kill()
        consumer.wait(10)


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["silent", "garbage"])
def test_a_nats_server_that_says_nothing_or_garbage_is_waited_out(
    tmp_path: Path, server: str
) -> None:
    """A real process against a TCP port that accepts and then never speaks NATS (or
    floods garbage): the role logs that NATS is unreachable, keeps trying, and stays up."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if server == "garbage":
                with contextlib.suppress(OSError):
                    conn.sendall(b"\x16\x03\x01 NOT NATS \xff\xfe\r\n" * 2000)
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
        '[http]\nenabled = false\n[database]\ndsn = "postgresql://nobody@127.0.0.1:9/none"\n'
        f'[cluster]\nbus = "nats"\nservers = ["nats://127.0.0.1:{port}"]\n'
        "connect_timeout_s = 1.0\n"
    )
    log = tmp_path / "role.log"
    command = [sys.executable, "-m", "userstreamd", "--config", str(config), "run"]
    with log.open("wb") as out:
        role = subprocess.Popen([*command, "--role", "consumer"], stdout=out, stderr=out)
    try:
        wait_until(
            lambda: '"nats.unreachable"' in log.read_text() or role.poll() is not None,
            30,
            "the role said NATS is unreachable",
        )
        time.sleep(1.5)  # (and is still trying)
        assert role.poll() is None, log.read_text()[-2000:]
    finally:
        role.kill()
        role.wait(10)
        stop.set()
        thread.join(5)
        listener.close()
