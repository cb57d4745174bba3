"""One TOML file, typed and strict.

Each TOML table is a frozen msgspec struct that forbids unknown fields, so a typo is an
error rather than a silently ignored key. Every error names the file, the key and what
was expected; `load_config` raises `ConfigError` before anything starts.

The defaults below are the daemon's embedded defaults; the shipped ``config.toml``
documents each key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .errors import ConfigError
from .sources.fields import FIELDS
from .sources.randomuser import reserved_seed_reason

DEFAULT_RANDOMUSER_URL = "https://randomuser.me/api/1.4/"
DEFAULT_PORT = 8765
DEFAULT_PASSWORD_ENV = "USERSTREAMD_DB_PASSWORD"
DEFAULT_TOKENS_ENV = "USERSTREAMD_TOKENS"
# fmt: off
NATIONALITIES = frozenset((
    "AU", "BR", "CA", "CH", "DE", "DK", "ES", "FI", "FR", "GB", "IE",
    "IN", "IR", "MX", "NL", "NO", "NZ", "RS", "TR", "UA", "US",
))
# fmt: on

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
LogLevel = Literal["debug", "info", "warning", "error"]


class _Table(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class DaemonConfig(_Table, frozen=True):
    state_dir: str = "state"
    log_level: LogLevel = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    stats_interval_s: Positive = 60.0


class ProducerConfig(_Table, frozen=True):
    source: Literal["randomuser", "synthetic"] = "randomuser"
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 1.0
    fallback: Literal["synthetic", "none"] = "synthetic"
    seed: str = ""
    stop_at_position: Annotated[int, msgspec.Meta(ge=0)] = 0
    nat: list[str] = msgspec.field(default_factory=list)
    keep_credentials: bool = False
    log_each_user_below_per_s: NonNegative = 5.0


class RandomUserConfig(_Table, frozen=True):
    url: str = DEFAULT_RANDOMUSER_URL
    timeout_s: Positive = 10.0
    page_size: Annotated[int, msgspec.Meta(ge=0, le=5000)] = 0
    failures_before_fallback: Annotated[int, msgspec.Meta(ge=1)] = 3
    probe_interval_s: Positive = 30.0
    retry_max_s: Positive = 30.0
    inc: list[str] = msgspec.field(default_factory=list)
    exc: list[str] = msgspec.field(default_factory=list)
    budget_users: Annotated[int, msgspec.Meta(ge=1)] = 20_000
    budget_window_s: Positive = 300.0


GroupName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class BroadcasterConfig(_Table, frozen=True):
    host: str = "127.0.0.1"
    port: Port = DEFAULT_PORT
    buffer_messages: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    buffer_bytes: Annotated[int, msgspec.Meta(ge=65536)] = 256 * 2**20
    client_lag_max: Annotated[int, msgspec.Meta(ge=2)] = 10_000
    # who may connect
    auth: Literal["auto", "token", "none"] = "auto"
    tokens_file: str = ""
    tokens_env: str = DEFAULT_TOKENS_ENV
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # groups strangers may join (never consumers.group)
    groups: list[GroupName] = msgspec.field(default_factory=list)
    allow_ad_hoc_groups: bool = False
    group_lag_max: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    ack_timeout_s: Positive = 60.0
    # limits
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 256
    handshake_timeout_s: Positive = 10.0
    ping_interval_s: Positive = 20.0
    pong_timeout_s: Positive = 20.0
    close_timeout_s: Positive = 5.0
    max_message_bytes: Annotated[int, msgspec.Meta(ge=256, le=16 * 2**20)] = 65536
    max_messages_per_s: Positive = 100.0


class ConsumersConfig(_Table, frozen=True):
    count: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    processes: bool | Literal["auto"] = "auto"
    group: GroupName = "db"
    window: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 500
    batch_interval_s: Positive = 0.25
    reconnect_min_s: Positive = 0.1
    reconnect_max_s: Positive = 5.0
    max_lead: Annotated[int, msgspec.Meta(ge=1)] = 20_000


class DatabaseConfig(_Table, frozen=True):
    dsn: str = ""
    password_env: str = DEFAULT_PASSWORD_ENV
    milestone_every: Annotated[int, msgspec.Meta(ge=1)] = 1000
    connect_timeout_s: Annotated[int, msgspec.Meta(ge=2)] = 5  # libpq: whole seconds, >= 2
    statement_timeout_s: NonNegative = 30.0
    stall_warning_s: Positive = 5.0


class SupervisorConfig(_Table, frozen=True):
    restart_delay_min_s: Positive = 0.1
    restart_delay_max_s: Positive = 30.0
    restart_reset_after_s: Positive = 30.0
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    max_restarts_window_s: Positive = 60.0
    drain_timeout_s: Positive = 10.0
    stop_timeout_s: Positive = 10.0


class Config(_Table, frozen=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    producer: ProducerConfig = msgspec.field(default_factory=ProducerConfig)
    randomuser: RandomUserConfig = msgspec.field(default_factory=RandomUserConfig)
    broadcaster: BroadcasterConfig = msgspec.field(default_factory=BroadcasterConfig)
    consumers: ConsumersConfig = msgspec.field(default_factory=ConsumersConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    # Where the file was read from: relative paths in it are relative to its folder.
    path: str = ""

    @property
    def state_path(self) -> Path:
        """Relative state_dir: under systemd's $STATE_DIRECTORY when set, else next to the
        config file."""
        systemd_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        base = Path(systemd_state or (Path(self.path).parent if self.path else Path.cwd()))
        return (base / self.daemon.state_dir).resolve()

    def resolve(self, path: str) -> Path:
        """A path from the file: relative ones are relative to the file's folder."""
        return (Path(self.path).parent if self.path else Path.cwd()) / path

    @property
    def consumer_processes(self) -> bool:
        """Consumers run as child processes: "auto" means when there is more than one."""
        processes = self.consumers.processes
        return self.consumers.count > 1 if processes == "auto" else processes

    def db_password(self) -> str | None:
        """The DB password: the environment variable the config names, else the systemd
        credential ``db-password`` (LoadCredential=), else None."""
        from .systemd import read_credential

        if self.database.password_env and (password := os.environ.get(self.database.password_env)):
            return password
        return read_credential("db-password")


_ORIGIN = re.compile(r"^(\*|[a-z][a-z0-9+.-]*://[^/?#\s]+|null)$")
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<key>[^`]*)`)?$")


def _explain(path: Path, exc: msgspec.ValidationError) -> ConfigError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    key, what = match["key"] or "", match["what"]
    unknown = re.match(r"Object contains unknown field `(.*)`", what)
    if unknown:
        key = f"{key}.{unknown[1]}" if key else unknown[1]
        return ConfigError(f"{path}: {key}: unknown key (check the spelling; see config.toml)")
    return ConfigError(f"{path}: {key or '(top level)'}: {what[0].lower()}{what[1:]}")


def _check(path: Path, config: Config) -> None:
    """Rules a type cannot express."""
    if (reason := reserved_seed_reason(config.producer.seed)) is not None:
        raise ConfigError(
            f"{path}: producer.seed: expected any length but 18 characters, "
            f"got {config.producer.seed!r}: {reason}"
        )
    bad_nats = [n for n in config.producer.nat if n.upper() not in NATIONALITIES]
    if bad_nats:
        raise ConfigError(
            f"{path}: producer.nat: unknown nationality {bad_nats[0]!r}, "
            f"expected codes from {' '.join(sorted(NATIONALITIES))}"
        )
    ru = config.randomuser
    if not ru.url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: randomuser.url: expected an http(s) URL, got {ru.url!r}")
    if not ru.url.rstrip("/").endswith("/api/1.4"):
        raise ConfigError(
            f"{path}: randomuser.url: expected the version-pinned path /api/1.4/, got {ru.url!r}"
        )
    for key, fields in (("inc", ru.inc), ("exc", ru.exc)):
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"{path}: randomuser.{key}: unknown field {unknown[0]!r}, "
                f"expected names from {' '.join(sorted(FIELDS))}"
            )
    if "login" in ru.exc:
        raise ConfigError(
            f"{path}: randomuser.exc: login cannot be excluded (login.uuid is the row key)"
        )
    if ru.page_size > ru.budget_users:
        raise ConfigError(
            f"{path}: randomuser.page_size: expected <= budget_users ({ru.budget_users}), "
            f"got {ru.page_size}"
        )
    sup = config.supervisor
    if sup.restart_delay_max_s < sup.restart_delay_min_s:
        raise ConfigError(
            f"{path}: supervisor.restart_delay_max_s: expected >= restart_delay_min_s "
            f"({sup.restart_delay_min_s}), got {sup.restart_delay_max_s}"
        )
    b = config.broadcaster
    if bool(b.tls_cert_file) != bool(b.tls_key_file):
        missing = "tls_key_file" if b.tls_cert_file else "tls_cert_file"
        raise ConfigError(
            f"{path}: broadcaster.{missing}: expected a file too (TLS needs a certificate and "
            "its key)"
        )
    if config.consumers.group in b.groups:
        raise ConfigError(
            f"{path}: broadcaster.groups: {config.consumers.group!r} is the daemon's own group "
            "(consumers.group); it cannot be opened to public clients"
        )
    bad_origin = next((o for o in b.allowed_origins if not _ORIGIN.match(o)), None)
    if bad_origin is not None:
        raise ConfigError(
            f'{path}: broadcaster.allowed_origins: expected "*" or scheme://host[:port], '
            f"got {bad_origin!r}"
        )
    c = config.consumers
    if c.reconnect_max_s < c.reconnect_min_s:
        raise ConfigError(
            f"{path}: consumers.reconnect_max_s: expected >= reconnect_min_s "
            f"({c.reconnect_min_s}), got {c.reconnect_max_s}"
        )


def parse_config(text: bytes, path: Path) -> Config:
    try:
        config = msgspec.toml.decode(text, type=Config)
    except msgspec.ValidationError as exc:
        raise _explain(path, exc) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if config.path:
        raise ConfigError(f"{path}: path: unknown key (check the spelling; see config.toml)")
    config = msgspec.structs.replace(config, path=str(path.resolve()))
    _check(path, config)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    return parse_config(text, path)


# The keys SIGHUP applies to a running daemon; a change to any other key is logged as
# needing a restart and left alone.
RELOADABLE = frozenset({"daemon.log_level", "daemon.log_format", "producer.rate_per_s"})


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    a, b = msgspec.to_builtins(old), msgspec.to_builtins(new)
    return sorted(
        f"{table}.{key}"
        for table in a
        if isinstance(a[table], dict)
        for key in a[table].keys() | b[table].keys()
        if a[table].get(key) != b[table].get(key)
    )
