"""The command line: every command's --help, init-config, and where --config may go."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from userstreamd.commands.cli import _parser, main
from userstreamd.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


PUBLIC = ["run", "check", "init-config", "tail", "db", "bench"]


def test_the_commands_are_listed_but_the_internal_one_is_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert set(_commands()) == {*PUBLIC, "consumer-worker", "fanout-worker"}
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in PUBLIC:
        assert f"\n    {name} " in out, name
    assert "consumer-worker" not in out and "fanout-worker" not in out


@pytest.mark.parametrize("name", PUBLIC)
def test_each_commands_help_shows_every_option_and_examples(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: userstreamd {name} ")
    assert f"\nexamples:\n  userstreamd {name}" in out
    for action in _commands()[name]._actions:
        if action.option_strings:
            names = action.option_strings
        else:  # a positional: its metavar, or each of its choices
            names = [action.metavar] if action.metavar else list(action.choices or ())
        assert names, action
        for option in names:
            assert option in out, option


def test_the_installed_script_answers_help() -> None:
    """The real entry point, as a process: `python -m userstreamd db --help`."""
    result = subprocess.run(
        [sys.executable, "-m", "userstreamd", "db", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "migrate" in result.stdout


def test_config_goes_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[producer]\nrate_per_s = 5\n")
    assert main(["--config", str(path), "check"]) == 0
    assert main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n" * 2


def test_init_config_writes_the_shipped_file_and_never_overwrites_by_surprise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.toml"
    shipped = (REPO / "config.toml").read_text()
    assert main(["init-config", str(path)]) == 0
    assert path.read_text() == shipped
    assert load_config(path).producer.rate_per_s == 1.0

    path.write_text("# mine\n")
    assert main(["init-config", str(path)]) == 1
    assert "exists; use --force" in capsys.readouterr().err
    assert path.read_text() == "# mine\n"
    assert main(["init-config", str(path), "--force"]) == 0
    assert path.read_text() == shipped

    capsys.readouterr()
    assert main(["init-config", "-"]) == 0
    assert capsys.readouterr().out == shipped


def test_init_config_into_a_missing_folder_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init-config", str(tmp_path / "no" / "c.toml")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_check_on_the_shipped_config_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(REPO / "config.toml")]) == 0
    assert capsys.readouterr().out == f"{REPO / 'config.toml'}: ok\n"
