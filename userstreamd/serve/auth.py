"""Who may connect to the public WebSocket port, and what each token may do.

Tokens never sit in ``config.toml``. They come from, in this order and all together:
``broadcaster.tokens_file``, the environment variable ``broadcaster.tokens_env``
(``USERSTREAMD_TOKENS``), and the systemd credential ``ws-tokens``. One token per line::

    # name       token (16+ printable characters)      permissions
    dashboard    8c1e0f3b6a4d4e2f9b7a1c5d3e6f0a2b      read
    audit        f0e1d2c3b4a5968778695a4b3c2d1e0f      read group:audit

A client presents its token in an ``Authorization: Bearer TOKEN`` header, or, where it
cannot set headers (browsers), as ``?token=TOKEN``. Permissions: ``read`` (the plain
stream) and ``group:NAME`` (join that group and acknowledge). Each presented token is
compared with every configured one in constant time (`hmac.compare_digest`); logs name
the token by its *name*, never its value.

``broadcaster.auth``: ``token`` requires a token; ``none`` admits anyone (with a
warning when the port is not loopback); ``auto`` (the default) requires one when any
token is configured or the port listens beyond loopback, and then refuses to start
without tokens.

A tokens file that its group or others may read is used, with a warning at load
(``broadcaster.tokens_file_exposed``, naming the file and its mode), as ssh warns about
a private key. Guessing is slowed per address (`Lockouts`): after `FREE_FAILURES` wrong
tokens, each further one locks the address (an IPv6 /64) out, for 0.5-1 s the first
time, then 1-2 s, ... up to 30-60 s (`LOCKOUT`, the one backoff: equal jitter under a
ceiling doubling from 1 s to 60 s). A locked-out address is answered 429 with
``retry-after`` at accept, and again before its token is looked at on a connection it
opened before (`edge.Edge`). The count is per process: each fan-out worker
(``broadcaster.workers``) keeps its own, so N workers are N independent budgets.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ..backoff import Backoff, Delays
from ..config import Config, is_loopback
from ..credentials import read_credential
from ..errors import ConfigError
from ..logs import get_logger

CREDENTIAL = "ws-tokens"
MIN_TOKEN_CHARS = 16
_TOKEN = re.compile(r"^[!-~]+$")  # printable ASCII, no spaces
_PERMISSION = re.compile(r"^(read|group:[A-Za-z0-9_.-]{1,64})$")
FREE_FAILURES = 5  # wrong tokens an address may present before it is slowed down
LOCKOUT = Backoff(min_s=1.0, max_s=60.0)
LOCKOUT_ADDRESSES_MAX = 4096  # addresses remembered (the one failed longest ago goes first)
LOCKOUT_FORGET_S = 600.0  # an address with no failure for this long starts afresh


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    permissions: frozenset[str]

    def may_read(self) -> bool:
        return "read" in self.permissions

    def may_join(self, group: str) -> bool:
        return f"group:{group}" in self.permissions


@dataclass(frozen=True)
class Tokens:
    """The configured tokens; `required` False means anyone may read."""

    tokens: tuple[Token, ...]
    required: bool

    def find(self, presented: str) -> Token | None:
        """The token `presented` matches, compared with each one in constant time."""
        found = None
        given = presented.encode()
        for token in self.tokens:
            if hmac.compare_digest(given, token.secret.encode()):
                found = token
        return found

    def secrets(self) -> list[str]:
        return [t.secret for t in self.tokens]


def parse_tokens(text: str, where: str) -> list[Token]:
    """Tokens from `text` (one per line); ConfigError names `where` and the line, never
    the token."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = [] if line.lstrip().startswith("#") else line.split()
        if not fields:
            continue
        at = f"{where}, line {number}"
        if len(fields) < 3:
            raise ConfigError(
                f"{at}: expected 'NAME TOKEN PERMISSION...', got {len(fields)} fields"
            )
        name, secret, permissions = fields[0], fields[1], fields[2:]
        if len(secret) < MIN_TOKEN_CHARS or not _TOKEN.match(secret):
            raise ConfigError(
                f"{at}: token {name!r}: expected at least {MIN_TOKEN_CHARS} printable characters"
            )
        bad = [p for p in permissions if not _PERMISSION.match(p)]
        if bad:
            raise ConfigError(
                f"{at}: token {name!r}: unknown permission {bad[0]!r}, expected read or group:NAME"
            )
        tokens.append(Token(name, secret, frozenset(permissions)))
    return tokens


@dataclass
class _Failures:
    count: int
    last: float
    locked_until: float
    delays: Delays


class Lockouts:
    """Wrong tokens per client address, and how long each is locked out.

    A success does not clear an address (a client holding one token could otherwise
    guess another between successes); a quiet `LOCKOUT_FORGET_S` does. At most
    `LOCKOUT_ADDRESSES_MAX` addresses are remembered."""

    def __init__(self) -> None:
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()
        self.lockouts = 0  # times an address was locked out

    @staticmethod
    def _key(ip: str) -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if address.version == 6:  # (one host has a /64 to choose from)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return ip

    def locked_for(self, ip: str) -> float:
        """Seconds `ip` is still locked out (0: it may try)."""
        failures = self._by_address.get(self._key(ip))
        return 0.0 if failures is None else max(0.0, failures.locked_until - trio.current_time())

    def failed(self, ip: str) -> float:
        """`ip` presented a wrong token: the lockout it earns (0: none yet)."""
        now, key = trio.current_time(), self._key(ip)
        failures = self._by_address.pop(key, None)
        if failures is None or now - failures.last > LOCKOUT_FORGET_S:
            failures = _Failures(0, now, 0.0, LOCKOUT.delays())
        self._by_address[key] = failures  # (the most recent last)
        while len(self._by_address) > LOCKOUT_ADDRESSES_MAX:
            self._by_address.popitem(last=False)
        failures.count += 1
        failures.last = now
        if failures.count <= FREE_FAILURES:
            return 0.0
        self.lockouts += 1
        wait = failures.delays.next_s()
        failures.locked_until = now + wait
        return wait

    def __len__(self) -> int:
        return len(self._by_address)


def load_tokens(config: Config) -> Tokens:
    """Read every token source and decide whether tokens are required; ConfigError when
    a source is unreadable or malformed, or when the port would be open to anyone
    beyond loopback without ``auth = "none"``."""
    b = config.broadcaster
    tokens: list[Token] = []
    if b.tokens_file:
        path = config.resolve(b.tokens_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise ConfigError(
                f"{config.path}: broadcaster.tokens_file: cannot read {path}: {exc.strerror}"
            ) from None
        tokens += parse_tokens(text, str(path))
        if mode & 0o077:
            get_logger().warning(
                "broadcaster.tokens_file_exposed",
                file=str(path),
                mode=f"{mode:04o}",
                hint=f"its group or others may read the tokens: chmod 600 {path}",
            )
    if b.tokens_env and (from_env := os.environ.get(b.tokens_env)):
        tokens += parse_tokens(from_env.replace(";", "\n"), f"${b.tokens_env}")
    if credential := read_credential(CREDENTIAL):
        tokens += parse_tokens(credential, f"credential {CREDENTIAL}")
    names = [t.name for t in tokens]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{config.path}: broadcaster: token name {duplicate!r} is used twice")
    if b.auth == "none":
        return Tokens((), required=False)
    if b.auth == "token" or tokens or not is_loopback(b.host):
        if not tokens:
            why = 'auth = "token"' if b.auth == "token" else f"host {b.host!r} is not loopback"
            raise ConfigError(
                f"{config.path}: broadcaster.auth: {why} but no token is configured "
                f"(broadcaster.tokens_file, ${b.tokens_env} or the {CREDENTIAL} credential); "
                'set auth = "none" to allow anyone'
            )
        return Tokens(tuple(tokens), required=True)
    return Tokens((), required=False)
