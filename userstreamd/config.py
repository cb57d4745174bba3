"""One TOML file, typed and strict.

Each TOML table is a frozen msgspec struct; a key it does not have is an error (with a
suggestion), never silently ignored. `load_config` reports every problem at once, each
naming the file, the line, the key and what was expected, in one `ConfigError` before
anything starts. Any key may be overridden by an environment variable
``USERSTREAMD_<TABLE>_<KEY>`` (``USERSTREAMD_BROADCASTER_PORT=9000``).

The defaults below are the daemon's embedded defaults; the shipped ``config.toml``
documents each key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
import tomli_w

from .errors import ConfigError
from .sources.fields import FIELDS
from .sources.seeds import reserved_seed_reason

DEFAULT_RANDOMUSER_URL = "https://randomuser.me/api/1.4/"
DEFAULT_PORT = 8765
DEFAULT_HTTP_PORT = 8766
DEFAULT_PASSWORD_ENV = "USERSTREAMD_DB_PASSWORD"
DEFAULT_READER_PASSWORD_ENV = "USERSTREAMD_GRAFANA_PASSWORD"
READER_CREDENTIAL = "grafana-password"
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
    coalesce_ms: Annotated[float, msgspec.Meta(ge=0, le=100)] = 2.0
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
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
    ad_hoc_group_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    group_lag_max: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    ack_timeout_s: Positive = 60.0
    # limits
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 256
    handshake_timeout_s: Positive = 10.0
    ping_interval_s: Positive = 20.0
    pong_timeout_s: Positive = 20.0
    close_timeout_s: Positive = 5.0
    write_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    max_message_bytes: Annotated[int, msgspec.Meta(ge=256, le=16 * 2**20)] = 65536
    max_messages_per_s: Positive = 100.0


class HistoryConfig(_Table, frozen=True):
    page_users: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    rate_per_s: Annotated[float, msgspec.Meta(gt=0)] = 50_000.0  # users a second, per client
    total_rate_per_s: Annotated[float, msgspec.Meta(gt=0)] = 15_000.0  # all replays together
    max_replays: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    connections: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2


class ConsumersConfig(_Table, frozen=True):
    count: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    processes: bool | Literal["auto"] = "auto"
    group: GroupName = "db"
    window: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 500
    batch_interval_s: NonNegative = 0.0  # 0: group commit, no wait
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
    # the embedded server's TCP listener for Grafana (0: none, a Unix socket only)
    listen_host: str = "127.0.0.1"
    listen_port: Port = 0
    reader_password_env: str = DEFAULT_READER_PASSWORD_ENV


class SupervisorConfig(_Table, frozen=True):
    restart_delay_min_s: Positive = 0.1
    restart_delay_max_s: Positive = 30.0
    restart_reset_after_s: Positive = 30.0
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    max_restarts_window_s: Positive = 60.0
    drain_timeout_s: Positive = 10.0
    stop_timeout_s: Positive = 10.0


class HttpConfig(_Table, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = DEFAULT_HTTP_PORT
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 32
    read_timeout_s: Positive = 5.0
    write_timeout_s: Positive = 5.0


ROLES = ("all", "producer", "broadcaster", "consumer")  # `run --role`; one alone needs NATS
NatsName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


class ClusterConfig(_Table, frozen=True):
    bus: Literal["embedded", "nats"] = "embedded"
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: NatsName = "USERSTREAM"
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 3
    max_messages: Annotated[int, msgspec.Meta(ge=1000)] = 10_000_000
    max_age_s: Positive = 7 * 86400.0
    duplicate_window_s: Positive = 120.0
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 5.0
    ack_wait_s: Annotated[float, msgspec.Meta(ge=1)] = 30.0
    connect_timeout_s: Positive = 5.0
    # credentials
    credentials_file: str = ""
    user: str = ""
    password_env: str = "USERSTREAMD_NATS_PASSWORD"
    token_env: str = "USERSTREAMD_NATS_TOKEN"
    # TLS
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


class Config(_Table, frozen=True):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    producer: ProducerConfig = msgspec.field(default_factory=ProducerConfig)
    randomuser: RandomUserConfig = msgspec.field(default_factory=RandomUserConfig)
    broadcaster: BroadcasterConfig = msgspec.field(default_factory=BroadcasterConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    consumers: ConsumersConfig = msgspec.field(default_factory=ConsumersConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
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
        from .credentials import read_credential

        if self.database.password_env and (password := os.environ.get(self.database.password_env)):
            return password
        return read_credential("db-password")

    def reader_password(self) -> str | None:
        """The password of the embedded server's read-only role (``listen_port``): the
        environment variable ``database.reader_password_env`` names, else the systemd
        credential ``grafana-password``, else None."""
        from .credentials import read_credential

        variable = self.database.reader_password_env
        if variable and (password := os.environ.get(variable)):
            return password
        return read_credential(READER_CREDENTIAL)


_ORIGIN = re.compile(r"^(\*|[a-z][a-z0-9+.-]*://[^/?#\s]+|null)$")
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<at>[^`]*)`)?$")
ENV_PREFIX = "USERSTREAMD_"


@dataclass(frozen=True)
class Problem:
    """One mistake: where (the file, or the environment variable), the dotted key, what
    was expected, and the line in the file when known."""

    where: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        at = f"{self.where}:{self.line}" if self.line else self.where
        return f"{at}: {self.key}: {self.message}"


def _tables() -> dict[str, dict[str, Any]]:
    """{table: {key: type}}, from the structs above."""
    return {
        name: get_type_hints(table, include_extras=True)
        for name, table in get_type_hints(Config).items()
        if isinstance(table, type) and issubclass(table, _Table)
    }


TABLES = _tables()


def _did_you_mean(name: str, table: str | None) -> str:
    """A suggestion for a misspelled key (or table, when `table` is None)."""
    candidates = list(TABLES) if table is None else list(TABLES[table])
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if table is not None:  # a key written in the wrong table
        elsewhere = [t for t, keys in TABLES.items() if name in keys]
        if elsewhere:
            return f"; it belongs in [{elsewhere[0]}]"
    return "; see config.toml"


def _explain(exc: msgspec.ValidationError) -> tuple[str, str]:
    """What a value's error says was expected, and where inside the value (``[0]``)."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    return match["at"] or "", match["what"][0].lower() + match["what"][1:]


def _key_lines(text: str) -> dict[str, int]:
    """The line each table header and each key is written on: {"producer": 3,
    "producer.rate_per_s": 4} (a plain scan: dotted and inline-table keys are not found)."""
    found: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        if header := re.match(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]", line):
            table = header[1]
            found.setdefault(table, number)
        elif key := re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", line):
            found.setdefault(f"{table}.{key[1]}" if table else key[1], number)
    return found


def _env_value(raw: str, kind: Any) -> Any:
    """An environment variable's text as the key's type: strings as they are, lists
    comma-separated (or a TOML array), anything else as a TOML value."""
    info = msgspec.inspect.type_info(kind)
    if isinstance(info, msgspec.inspect.StrType):
        return raw
    if isinstance(info, msgspec.inspect.ListType) and not raw.lstrip().startswith("["):
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw  # then validation says what was expected


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, str], list[Problem]]:
    """``USERSTREAMD_<TABLE>_<KEY>`` variables: {dotted key: variable}, and the variables
    that look like overrides but name no key (variables of other tables, such as
    ``USERSTREAMD_DB_PASSWORD``, are not overrides)."""
    found: dict[str, str] = {}
    problems = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX):
            continue
        table, _, key = variable[len(ENV_PREFIX) :].lower().partition("_")
        if table not in TABLES:
            close = difflib.get_close_matches(table, list(TABLES), n=1, cutoff=0.8)
            if close and key:
                problems.append(
                    Problem(f"${variable}", table, f"unknown table; did you mean {close[0]!r}?")
                )
            continue
        if key not in TABLES[table]:
            problems.append(
                Problem(f"${variable}", f"{table}.{key}", "unknown key" + _did_you_mean(key, table))
            )
            continue
        found[f"{table}.{key}"] = variable
    return found, problems


def _validate(
    document: dict[str, Any],
    source: Path,
    lines: dict[str, int],
    overrides: dict[str, str],
    environ: Mapping[str, str],
) -> tuple[dict[str, Any], list[Problem]]:
    """Every problem in the file and in the environment's `overrides` (not just the
    first), and the valid rest with the overrides applied."""
    problems: list[Problem] = []
    valid: dict[str, Any] = {}
    for table, values in document.items():
        if table not in TABLES:
            problems.append(
                Problem(
                    str(source), table, "unknown key" + _did_you_mean(table, None), lines.get(table)
                )
            )
        elif not isinstance(values, dict):
            problems.append(
                Problem(str(source), table, "expected a table ([" + table + "])", lines.get(table))
            )
        else:
            valid[table] = {}
            for key, value in values.items():
                dotted = f"{table}.{key}"
                if key not in TABLES[table]:
                    message = "unknown key" + _did_you_mean(key, table)
                    problems.append(Problem(str(source), dotted, message, lines.get(dotted)))
                else:
                    valid[table][key] = (str(source), lines.get(dotted), value)
    for dotted, variable in overrides.items():
        table, key = dotted.split(".")
        value = _env_value(environ[variable], TABLES[table][key])
        valid.setdefault(table, {})[key] = (f"${variable}", None, value)
    checked: dict[str, Any] = {}
    for table, values in valid.items():
        checked[table] = {}
        for key, (where, line, value) in values.items():
            try:
                checked[table][key] = msgspec.convert(value, TABLES[table][key])
            except msgspec.ValidationError as exc:
                at, what = _explain(exc)
                problems.append(Problem(where, f"{table}.{key}{at}", what, line))
    return checked, problems


def _rules(config: Config) -> Iterator[tuple[str, str]]:
    """Rules a type cannot express: (key, what was expected)."""
    if (reason := reserved_seed_reason(config.producer.seed)) is not None:
        yield (
            "producer.seed",
            f"expected any length but 18 characters, got {config.producer.seed!r}: {reason}",
        )
    bad_nats = [n for n in config.producer.nat if n.upper() not in NATIONALITIES]
    if bad_nats:
        yield (
            "producer.nat",
            f"unknown nationality {bad_nats[0]!r}, "
            f"expected codes from {' '.join(sorted(NATIONALITIES))}",
        )
    ru = config.randomuser
    if not ru.url.startswith(("http://", "https://")):
        yield "randomuser.url", f"expected an http(s) URL, got {ru.url!r}"
    elif not ru.url.rstrip("/").endswith("/api/1.4"):
        yield "randomuser.url", f"expected the version-pinned path /api/1.4/, got {ru.url!r}"
    for key, fields in (("inc", ru.inc), ("exc", ru.exc)):
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            yield (
                f"randomuser.{key}",
                f"unknown field {unknown[0]!r}, expected names from {' '.join(sorted(FIELDS))}",
            )
    if "login" in ru.exc:
        yield "randomuser.exc", "login cannot be excluded (login.uuid is the row key)"
    if ru.page_size > ru.budget_users:
        yield (
            "randomuser.page_size",
            f"expected <= budget_users ({ru.budget_users}), got {ru.page_size}",
        )
    sup = config.supervisor
    if sup.restart_delay_max_s < sup.restart_delay_min_s:
        yield (
            "supervisor.restart_delay_max_s",
            f"expected >= restart_delay_min_s ({sup.restart_delay_min_s}), "
            f"got {sup.restart_delay_max_s}",
        )
    b = config.broadcaster
    if bool(b.tls_cert_file) != bool(b.tls_key_file):
        missing = "tls_key_file" if b.tls_cert_file else "tls_cert_file"
        yield f"broadcaster.{missing}", "expected a file too (TLS needs a certificate and its key)"
    if config.consumers.group in b.groups:
        yield (
            "broadcaster.groups",
            f"{config.consumers.group!r} is the daemon's own group (consumers.group); "
            "it cannot be opened to public clients",
        )
    bad_origin = next((o for o in b.allowed_origins if not _ORIGIN.match(o)), None)
    if bad_origin is not None:
        yield (
            "broadcaster.allowed_origins",
            f'expected "*" or scheme://host[:port], got {bad_origin!r}',
        )
    h = config.http
    if h.enabled and h.port != 0 and h.port == b.port:
        yield "http.port", f"expected a port other than broadcaster.port ({b.port})"
    yield from _listener_rules(config)
    yield from _cluster_rules(config.cluster)
    c = config.consumers
    if c.reconnect_max_s < c.reconnect_min_s:
        yield (
            "consumers.reconnect_max_s",
            f"expected >= reconnect_min_s ({c.reconnect_min_s}), got {c.reconnect_max_s}",
        )


def url_host(host: str) -> str:
    """A host as a URL (or an address in a message) has it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listener_rules(config: Config) -> Iterator[tuple[str, str]]:
    """The embedded server's TCP listener: loopback only, and only for that server."""
    db, taken = config.database, {config.broadcaster.port, config.http.port} - {0}
    if not is_loopback(db.listen_host):
        yield (
            "database.listen_host",
            f"expected a loopback address (127.0.0.1, ::1 or localhost), got {db.listen_host!r}: "
            "the embedded server's listener is for a Grafana on this machine",
        )
    if db.listen_port and db.dsn:
        yield (
            "database.listen_port",
            f"expected 0 with database.dsn set, got {db.listen_port}: only the embedded server "
            "gets a listener (give Grafana a read-only role on your own server)",
        )
    elif db.listen_port in taken:
        yield "database.listen_port", f"expected a port other than {sorted(taken)}"


_NATS_URL = re.compile(r"^(nats|tls)://[^/?#\s]+$")


def _cluster_rules(cl: ClusterConfig) -> Iterator[tuple[str, str]]:
    if not cl.servers:
        yield "cluster.servers", "expected at least one server URL"
    bad = next((url for url in cl.servers if not _NATS_URL.match(url)), None)
    if bad is not None:
        yield "cluster.servers", f"expected nats://host:port or tls://host:port, got {bad!r}"
    if bool(cl.tls_cert_file) != bool(cl.tls_key_file):
        missing = "tls_key_file" if cl.tls_cert_file else "tls_cert_file"
        yield f"cluster.{missing}", "expected a file too (a client certificate needs its key)"
    if cl.credentials_file and cl.user:
        yield "cluster.user", "expected either credentials_file or user, not both"


Rules = Callable[["Config"], Iterable[tuple[str, str]]]


def parse_config(
    text: bytes,
    path: Path,
    environ: Mapping[str, str] | None = None,
    rules: Rules | None = None,
) -> Config:
    """The config in `text` (read from `path`), with the environment's overrides applied;
    ConfigError listing every problem, one per line, each with file, key and line.
    `rules` adds checks of the whole config (the chosen topology's: `topology.config_rules`)."""
    environ = os.environ if environ is None else environ
    try:
        source = text.decode("utf-8")
        document = tomllib.loads(source)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    lines = _key_lines(source)
    overrides, problems = env_overrides(environ)
    values, found = _validate(document, path, lines, overrides, environ)
    problems += found
    config = msgspec.convert(values, Config)  # each value was checked on its own
    config = msgspec.structs.replace(config, path=str(path.resolve()))
    # The rules run on whatever parsed (a refused value is its default here), so that one
    # run reports every mistake; a rule about a refused key, or naming one, would be
    # about a value the file does not hold, and is left out.
    refused = {p.key.partition("[")[0] for p in problems}
    for key, message in [*_rules(config), *(rules(config) if rules else ())]:
        if key in refused or any(_names(key, message, other) for other in refused):
            continue
        if key in overrides:
            problems.append(Problem(f"${overrides[key]}", key, message))
        else:
            problems.append(Problem(str(path), key, message, lines.get(key)))
    if problems:
        problems.sort(key=lambda p: (p.where != str(path), p.line or 0, p.key))
        raise ConfigError("\n".join(map(str, problems)))
    return config


def _names(key: str, message: str, refused: str) -> bool:
    """Whether the rule about `key` names the `refused` key in its message: dotted
    ("broadcaster.port"), or bare ("budget_users") when both are of one table."""
    table, _, bare = refused.rpartition(".")
    same_table = key.partition(".")[0] == table
    return re.search(rf"\b{re.escape(refused)}\b", message) is not None or (
        same_table and re.search(rf"(?<![\w.]){re.escape(bare)}\b", message) is not None
    )


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    rules: Rules | None = None,
) -> Config:
    """Read and validate the config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    return parse_config(text, path, environ, rules)


def effective_toml(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The configuration in effect, as TOML: every key (defaults filled in), each
    environment override marked, the database password as ***."""
    from .logs import redact

    overrides, _ = env_overrides(os.environ if environ is None else environ)
    out = [
        f"# The configuration in effect for {config.path}:",
        "# defaults filled in, environment overrides marked, secrets as ***.",
    ]
    for table, values in msgspec.to_builtins(config).items():
        if table not in TABLES:
            continue
        out += ["", f"[{table}]"]
        for key, value in values.items():
            if f"{table}.{key}" == "database.dsn":
                value = redact(value)
            line = tomli_w.dumps({key: value}).rstrip("\n")  # (every key is a scalar or list)
            if variable := overrides.get(f"{table}.{key}"):
                line += f"  # from ${variable}"
            out.append(line)
    return "\n".join(out) + "\n"


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    """A config file from {table: {key: value}}: what `bench` and the tests write. Any
    value TOML can hold round-trips through `tomllib` (tomli-w writes it)."""
    return tomli_w.dumps(tables)


def default_config_text() -> str:
    """The commented default config file (the same as the repository's config.toml)."""
    return resources.files(__package__).joinpath("config.toml").read_text(encoding="utf-8")


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
