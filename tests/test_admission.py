"""The handshake decision and the tokens behind it: pure logic, no sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
import trio

from userstreamd.config import Config, parse_config
from userstreamd.errors import ConfigError
from userstreamd.serve.admission import Policy, Refused, WrongToken, admit
from userstreamd.serve.auth import (
    FREE_FAILURES,
    LOCKOUT_ADDRESSES_MAX,
    Lockouts,
    Token,
    Tokens,
    load_tokens,
    parse_tokens,
)

READER = Token("dash", "r" * 20, frozenset({"read"}))
AUDITOR = Token("audit", "a" * 20, frozenset({"group:audit", "group:db"}))
TOKENS = Tokens((READER, AUDITOR), required=True)
OPEN = Policy(Tokens((), required=False), own_group="db", groups=frozenset({"audit"}))
LOCKED = Policy(
    TOKENS, own_group="db", groups=frozenset({"audit"}), allowed_origins=frozenset({"https://ok"})
)


def _bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


def _status(target: str, policy: Policy = OPEN, headers: list | None = None) -> int:
    with pytest.raises(Refused) as refused:
        admit(target, headers or [], policy, private=False)
    return refused.value.status


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/stream", 404),
        ("//[x", 400),
        ("/x?since=1", 404),
        ("http://evil/", 404),
        ("/?nope=1", 400),
        ("/?since=1", 400),
        ("/?epoch=e&since=-1", 400),
        ("/?epoch=e&since=1e9", 400),
        ("/?epoch=e&since=99999999999999999999999", 400),
        ("/?epoch=e&since=1&since=2", 400),
        ("/?epoch=<script>&since=1", 400),
        ("/?group=", 400),
        ("/?group=a%00b", 400),
        ("/?window=5", 400),
        ("/?group=audit&window=0", 400),
        ("/?group=audit&epoch=e&since=1", 400),
        ("/?" + "a" * 3000, 414),
        ("/?%zz", 400),
        ("/?a=1&&b", 400),
        ("/?batch=0", 400),
        ("/?batch=1001", 400),
        ("/?batch=ten", 400),
        ("/?batch=", 400),
        ("/?batch=2&batch=3", 400),
    ],
)
def test_malformed_paths_and_queries_are_refused_with_their_status(
    target: str, status: int
) -> None:
    assert _status(target) == status


def test_good_requests_are_admitted_with_what_they_asked_for() -> None:
    assert admit("/", [], OPEN, private=False).since is None
    resumed = admit("/?epoch=9c2f&since=41", [], OPEN, private=False)
    assert resumed.since == ("9c2f", 41) and resumed.who == "anonymous"
    member = admit("/?group=audit&window=50", [], OPEN, private=False)
    assert (member.group, member.window) == ("audit", 50)
    assert member.batch == 1  # one user per frame unless asked
    assert admit("/?batch=200", [], OPEN, private=False).batch == 200
    assert admit("/?group=db&batch=500", [], OPEN, private=True).batch == 500


def test_the_daemons_own_group_is_refused_on_the_public_port_whatever_the_token() -> None:
    assert _status("/?group=db") == 403
    assert _status("/?group=db", LOCKED, _bearer(AUDITOR.secret)) == 403  # holds group:db
    ad_hoc = Policy(OPEN.tokens, own_group="db", groups=frozenset(), allow_ad_hoc_groups=True)
    assert _status("/?group=db", ad_hoc) == 403
    assert admit("/?group=db", [], LOCKED, private=True).group == "db"  # the private socket


def test_unknown_groups_need_allow_ad_hoc_groups() -> None:
    assert _status("/?group=mine") == 403
    ad_hoc = Policy(OPEN.tokens, own_group="db", groups=frozenset(), allow_ad_hoc_groups=True)
    assert admit("/?group=mine", [], ad_hoc, private=False).group == "mine"


def test_tokens_decide_who_reads_and_who_joins() -> None:
    assert _status("/", LOCKED) == 401
    assert _status("/", LOCKED, _bearer("w" * 20)) == 401
    assert _status("/", LOCKED, [(b"authorization", b"Basic abc")]) == 401
    assert admit("/", _bearer(READER.secret), LOCKED, private=False).who == "dash"
    assert admit(f"/?token={READER.secret}", [], LOCKED, private=False).who == "dash"
    assert _status("/?group=audit", LOCKED, _bearer(READER.secret)) == 403  # read only
    assert _status("/", LOCKED, _bearer(AUDITOR.secret)) == 403  # may join, not read
    assert admit("/?group=audit", _bearer(AUDITOR.secret), LOCKED, private=False).who == "audit"


def test_browsers_from_origins_not_allowed_are_refused() -> None:
    ok = _bearer(READER.secret)
    assert _status("/", LOCKED, [*ok, (b"origin", b"https://evil.example")]) == 403
    assert admit("/", [*ok, (b"origin", b"https://ok")], LOCKED, private=False).who == "dash"
    assert admit("/", ok, LOCKED, private=False).who == "dash"  # no Origin: not a browser
    assert _status("/", OPEN, [(b"origin", b"null")]) == 403  # a local file, by default


def test_token_files_report_the_line_never_the_token(tmp_path: Path) -> None:
    good = "# comment\ndash  0123456789abcdef0123  read\n\naudit fedcba9876543210fedc read group:audit\n"
    tokens = parse_tokens(good, "t")
    assert [(t.name, sorted(t.permissions)) for t in tokens] == [
        ("dash", ["read"]),
        ("audit", ["group:audit", "read"]),
    ]
    for bad, expected in [
        ("x shortsecret9 read", "line 1: token 'x': expected at least 16"),
        ("x 0123456789abcdefXYZ write", "unknown permission 'write'"),
        ("\nx 0123456789abcdefXYZ", "line 2: expected 'NAME TOKEN PERMISSION...'"),
    ]:
        with pytest.raises(ConfigError, match=expected) as error:
            parse_tokens(bad, "tokens.txt")
        assert "0123456789abcdef" not in str(error.value)


def _config(tmp_path: Path, broadcaster: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(f"[broadcaster]\n{broadcaster}\n")
    return parse_config(path.read_bytes(), path)


def test_beyond_loopback_tokens_are_required_unless_auth_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USERSTREAMD_TOKENS", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert not load_tokens(_config(tmp_path, 'host = "127.0.0.1"')).required
    with pytest.raises(ConfigError, match=r"broadcaster.auth: host '0.0.0.0' is not loopback"):
        load_tokens(_config(tmp_path, 'host = "0.0.0.0"'))
    open_door = load_tokens(_config(tmp_path, 'host = "0.0.0.0"\nauth = "none"'))
    assert not open_door.required
    (tmp_path / "tokens").write_text("dash 0123456789abcdef0123 read\n")
    locked = load_tokens(_config(tmp_path, 'host = "0.0.0.0"\ntokens_file = "tokens"'))
    assert locked.required and locked.find("0123456789abcdef0123") is not None
    assert locked.find("0123456789abcdef0124") is None
    monkeypatch.setenv("USERSTREAMD_TOKENS", "web 0123456789abcdefWXYZ read")
    from_env = load_tokens(_config(tmp_path, ""))
    assert from_env.required, "a configured token turns auth on, loopback or not"
    with pytest.raises(ConfigError, match="tokens_file: cannot read"):
        load_tokens(_config(tmp_path, 'tokens_file = "missing"'))


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_a_tokens_file_its_group_or_others_may_read_is_warned_about_once_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, warned: bool
) -> None:
    monkeypatch.delenv("USERSTREAMD_TOKENS", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "tokens"
    path.write_text("dash 0123456789abcdef0123 read\n")
    os.chmod(path, mode)
    with structlog.testing.capture_logs() as logs:
        tokens = load_tokens(_config(tmp_path, 'tokens_file = "tokens"'))
    assert tokens.required, "still used: a warning, as ssh gives"
    exposed = [e for e in logs if e["event"] == "broadcaster.tokens_file_exposed"]
    if warned:
        assert len(exposed) == 1 and exposed[0]["log_level"] == "warning"
        assert exposed[0]["file"] == str(path) and exposed[0]["mode"] == f"{mode:04o}"
    else:
        assert exposed == []


def test_a_wrong_token_is_told_apart_from_none() -> None:
    with pytest.raises(WrongToken):
        admit("/?token=" + "x" * 20, [], LOCKED, private=False)
    with pytest.raises(Refused) as none:
        admit("/", [], LOCKED, private=False)
    assert none.value.status == 401 and not isinstance(none.value, WrongToken)


async def test_10000_wrong_tokens_at_657_per_s_are_slowed_to_a_handful(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The issue's guessing run: 10,000 wrong tokens from one address at 657/s. Without
    lockouts each is checked; with them, after FREE_FAILURES each further try waits a
    delay doubling up to 60 s, so few are ever checked. Another address is unaffected."""
    lockouts = Lockouts()
    checked = 0
    for _ in range(10_000):
        if not lockouts.locked_for("127.0.0.9"):
            checked += 1
            lockouts.failed("127.0.0.9")
        await trio.sleep(1 / 657)
    # (15.2 s: 5 free, then lockouts of [0.5, 1], [1, 2], [2, 4], [4, 8] s...)
    print(f"{checked} of 10,000 wrong tokens checked")
    assert FREE_FAILURES < checked <= FREE_FAILURES + 5, checked
    assert lockouts.locked_for("127.0.0.10") == 0
    assert lockouts.lockouts == checked - FREE_FAILURES
    await trio.sleep(601)  # a quiet 10 minutes: the address starts afresh
    assert all(lockouts.failed("127.0.0.9") == 0 for _ in range(FREE_FAILURES))


async def test_the_lockout_table_is_bounded_and_ipv6_counts_per_64() -> None:
    lockouts = Lockouts()
    for n in range(LOCKOUT_ADDRESSES_MAX + 100):
        lockouts.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(lockouts) == LOCKOUT_ADDRESSES_MAX
    for n in range(FREE_FAILURES + 1):  # one host, a new address from its /64 each time
        lockouts.failed(f"2001:db8::{n + 1:x}")
    assert lockouts.locked_for("2001:db8::ffff") > 0 and lockouts.locked_for("2001:db9::1") == 0
