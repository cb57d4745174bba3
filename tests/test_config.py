"""The config file: strict, typed, and explained when wrong - before anything starts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from userstreamd.cli import main
from userstreamd.config import Config, load_config

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
