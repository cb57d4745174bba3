"""The command line: ``userstreamd [--config FILE] [COMMAND] [OPTIONS]``; one function per
command. Without a command it runs the daemon. ``consumer-worker`` and ``fanout-worker`` are
internal (the daemon starts them) and hidden from ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import trio

from .. import __version__
from ..config import ROLES, Config, load_config
from ..errors import ConfigError
from ..logs import add_secrets, configure_logging, dsn_secrets, get_logger
from ..runtime.supervisor import describe

DEFAULT_CONFIG = "config.toml"
TOKEN_ENV = "USERSTREAMD_TOKEN"


def _run_logged(main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run(main); a crash is one JSON log line with its traceback, and exit code 1."""
    try:
        return trio.run(main, *args)
    except Exception as exc:
        get_logger().error("daemon.failed", error=describe(exc), exc_info=exc)
        return 1


def _config(
    args: argparse.Namespace, *, public_port: bool = False, logs: TextIO | None = None
) -> Config:
    """The config file (and, for the commands that open the public port, the tokens and
    TLS files it names), logging set up from it (to `logs`, else stdout); ConfigError
    before anything starts."""
    config = load_config(args.config)
    if public_port:
        from ..serve.auth import load_tokens
        from ..serve.edge import tls_context

        args.tokens, args.ssl_context = load_tokens(config), tls_context(config)
    if config.cluster.bus == "nats":
        from ..topology.nats.bus import checked_options

        checked_options(config)
    configure_logging(config.daemon.log_level, config.daemon.log_format, logs)
    add_secrets(config.db_password(), *dsn_secrets(config.database.dsn))
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM."""
    from ..runtime.daemon import run_daemon

    role = getattr(args, "role", "all")
    serves = role in ("all", "broadcaster")  # (only then are tokens and TLS files needed)
    config = _config(args, public_port=serves)
    if role != "all" and config.cluster.bus != "nats":
        raise ConfigError(
            f'{config.path}: run --role {role}: expected [cluster] bus = "nats" '
            f"(each role on its own needs the NATS bus), got {config.cluster.bus!r}"
        )
    if not serves:
        from ..serve.auth import Tokens

        args.tokens, args.ssl_context = Tokens((), required=False), None
    add_secrets(*args.tokens.secrets())
    return _run_logged(run_daemon, config, args.tokens, args.ssl_context, role)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config file (and the tokens and TLS files it names) and say so."""
    config = _config(args, public_port=True, logs=sys.stderr)
    if args.effective:
        from ..config import effective_toml

        print(effective_toml(config), end="")
    else:
        print(f"{config.path}: ok")
    return 0


def cmd_init_config(args: argparse.Namespace) -> int:
    """Write the commented default config file."""
    from ..config import default_config_text

    text = default_config_text()
    if args.path == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.path)
    try:
        with path.open("w" if args.force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        print(f"userstreamd: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"userstreamd: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}; check it with: userstreamd check --config {path}")
    return 0


def _tail_url(args: argparse.Namespace) -> str:
    """--url, else the config file's broadcaster (when the file exists), else the default."""
    if args.url:
        return str(args.url)
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists():
        return "ws://127.0.0.1:8765/"
    broadcaster = load_config(args.config).broadcaster
    host = broadcaster.host if broadcaster.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    scheme = "wss" if broadcaster.tls_cert_file else "ws"
    return f"{scheme}://{host}:{broadcaster.port}/"


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the stream in the terminal, resuming after a disconnect."""
    from . import tail

    url = _tail_url(args)
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"userstreamd: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    return tail.run(
        url,
        json_lines=args.json,
        since=args.since,
        epoch=args.epoch,
        group=args.group,
        token=token,
        ca_file=args.ca_file,
    )


def cmd_db(args: argparse.Namespace) -> int:
    """Show the database's state, or apply its migrations."""
    from ..store import admin

    config = _config(args, logs=sys.stderr)  # stdout is for the report
    if args.action == "migrate":
        return admin.migrate(config)
    return admin.status(config, as_json=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure each stage, or the real daemon end to end (e2e) or fanning out (fanout)."""
    from .. import bench

    mode = getattr(args, "mode", None) or "stages"
    if (missing := bench.missing_extra()) is not None:
        print(f"userstreamd: bench: {missing}", file=sys.stderr)
        return 2
    if mode == "stages" and args.plot and (reason := bench.plot_available()) is not None:
        print(f"userstreamd: --plot: {reason}", file=sys.stderr)
        return 2
    if mode == "fanout" and args.compare:
        from ..bench.fanout_servers import LAUNCHERS

        if not LAUNCHERS[args.bus].compares:
            which = " or ".join(bus for bus, server in LAUNCHERS.items() if server.compares)
            print(
                f"userstreamd: bench fanout: --compare works with --bus {which} only",
                file=sys.stderr,
            )
            return 2
    configure_logging("warning", stream=sys.stderr)  # stdout is for the figures
    progress = sys.stderr.isatty()
    try:
        if mode == "e2e":
            report = bench.run_e2e(
                bus=args.bus,
                duration_s=args.duration,
                warmup_s=args.warmup,
                consumers=args.consumers,
                consumer_processes=args.consumer_processes,
                progress=progress,
            )
            bench.print_e2e(report)
        elif mode == "fanout":
            report = bench.run_fanout(
                bus=args.bus,
                clients=args.clients,
                rate_per_s=args.rate,
                duration_s=args.duration,
                warmup_s=args.warmup,
                harness_procs=args.harness_procs,
                compare=args.compare,
                install_node_ws=not args.no_install,
                progress=progress,
            )
            bench.print_fanout(report)
        else:
            report = bench.run_benchmarks(args.users, args.repeat, args.dsn, progress=progress)
            bench.print_report(report)
    except bench.BenchError as exc:
        print(f"userstreamd: bench {mode}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        bench.write_json(report, args.json)
    if mode == "stages" and args.plot:
        bench.write_plot(report, args.plot)
    return 0


def cmd_consumer_worker(args: argparse.Namespace) -> int:
    """Internal: one consumer as a child process of the daemon."""
    from ..runtime.workers import run_consumer_worker

    config = _config(args)
    return _run_logged(run_consumer_worker, config, args.worker, args.url, args.ready_fd)


def cmd_fanout_worker(args: argparse.Namespace) -> int:
    """Internal: one fan-out worker (a share of the public port) as a child process."""
    from ..serve.fanout import run_fanout_worker

    config = _config(args, public_port=True)
    add_secrets(*args.tokens.secrets())
    origins = [o for o in args.origins.split(",") if o]
    return _run_logged(
        run_fanout_worker,
        config,
        args.worker,
        args.upstream,
        args.port,
        origins,
        args.tokens,
        args.ssl_context,
        args.ready_fd,
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    pass


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], examples: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its docstring and `examples`; each one also takes
    --config, so it may come before or after the command's name."""
    summary = (handler.__doc__ or "").strip()
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary[0].lower() + summary[1:].rstrip("."),
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=_Help,
    )
    _config_option(parser, argparse.SUPPRESS)
    parser.set_defaults(handler=handler)
    return parser


def _config_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=default,
        metavar="FILE",
        help=f"TOML config file (default: {DEFAULT_CONFIG}); any key may be overridden by "
        "the environment variable USERSTREAMD_<TABLE>_<KEY>",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userstreamd",
        description="Stream random users from an API over WebSocket into PostgreSQL.",
        epilog="examples:\n"
        "  userstreamd --config config.toml            run the daemon\n"
        "  userstreamd check --config config.toml      validate a config file\n"
        "  userstreamd COMMAND --help                  a command's options and examples",
        formatter_class=_Help,
    )
    _config_option(parser, DEFAULT_CONFIG)
    parser.add_argument("--version", action="version", version=f"userstreamd {__version__}")
    parser.set_defaults(handler=cmd_run)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = _command(
        commands,
        "run",
        cmd_run,
        "  userstreamd run --config /etc/userstreamd/config.toml\n"
        "  userstreamd run --config cluster.toml --role broadcaster\n",
    )
    run.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help='which parts to run (default: all); one part needs [cluster] bus = "nats"',
    )

    check = _command(
        commands,
        "check",
        cmd_check,
        "  userstreamd check --config config.toml\n"
        "  USERSTREAMD_BROADCASTER_PORT=9000 userstreamd check --effective\n",
    )
    check.add_argument(
        "--effective",
        action="store_true",
        help="print the configuration in effect: defaults filled in, environment overrides "
        "applied and marked, secrets as ***",
    )

    init = _command(
        commands,
        "init-config",
        cmd_init_config,
        "  userstreamd init-config                     write ./config.toml\n"
        "  userstreamd init-config /etc/userstreamd/config.toml --force\n"
        "  userstreamd init-config - | less            print it\n",
    )
    init.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"where to write it (default: {DEFAULT_CONFIG}; - for standard output)",
    )
    init.add_argument("--force", action="store_true", help="overwrite PATH if it exists")

    tail = _command(
        commands,
        "tail",
        cmd_tail,
        "  userstreamd tail                            the config file's broadcaster\n"
        "  userstreamd tail --json | jq .user.email\n"
        "  userstreamd tail --url ws://host:8765/ --since 4200\n"
        f"  {TOKEN_ENV}=... userstreamd tail --group watchers\n",
    )
    tail.add_argument(
        "--url",
        help="the broadcaster's WebSocket URL (default: from the config file's [broadcaster], "
        "else ws://127.0.0.1:8765/)",
    )
    tail.add_argument("--json", action="store_true", help="print each user frame as JSON")
    tail.add_argument(
        "--since", type=int, metavar="SEQ", help="start after this seq (resume from there)"
    )
    tail.add_argument("--epoch", help="the epoch --since refers to (default: the current one)")
    tail.add_argument(
        "--group", metavar="NAME", help="join this consumer group as a member (and ack)"
    )
    tail.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"a file holding the token to present (default: ${TOKEN_ENV}, if set)",
    )
    tail.add_argument("--ca-file", metavar="FILE", help="CA certificates for a wss:// URL")

    db = _command(
        commands,
        "db",
        cmd_db,
        "  userstreamd db status\n"
        "  userstreamd db status --json | jq .rows\n"
        "  userstreamd db migrate --config /etc/userstreamd/config.toml\n",
    )
    db.add_argument(
        "action",
        choices=("status", "migrate"),
        help="status: rows, latest seq per epoch, checkpoints, ingest lag, dead letters; "
        "migrate: apply the pending schema migrations",
    )
    db.add_argument("--json", action="store_true", help="status as one JSON object")

    bench = _command(
        commands,
        "bench",
        cmd_bench,
        "  userstreamd bench\n"
        "  userstreamd bench --users 5000 --repeat 1 --json bench.json --plot bench.png\n"
        "  userstreamd bench e2e --duration 60 --json e2e.json\n"
        "  userstreamd bench e2e --bus nats --duration 30\n"
        "  userstreamd bench fanout --clients 100 --rate 1000 --compare\n"
        "  userstreamd bench fanout --clients 1000 --rate 100 --harness-procs 2\n"
        "  userstreamd bench fanout --bus nats --clients 100 --rate 1000\n",
    )
    bench.add_argument(
        "--users", type=int, default=20_000, help="users per benchmark (default: 20000)"
    )
    bench.add_argument(
        "--repeat", type=int, default=3, help="runs per benchmark, best wins (default: 3)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the figures as a PNG")
    bench.add_argument("--dsn", default="", help="PostgreSQL to insert into (default: embedded)")
    modes = bench.add_subparsers(
        title="modes (default: each stage in-process, with the options above)",
        dest="mode",
        metavar="MODE",
    )
    e2e_mode = modes.add_parser(
        "e2e",
        help="the real daemon: sustained users committed per second (zero loss checked), "
        "produced -> committed latency at 1,000 users/s, CPU and memory per process",
        description="Start the real daemon (synthetic source, embedded PostgreSQL) as a "
        "child process: users committed per second with the producer asking 50,000/s, "
        "zero loss checked in the database; then produced -> committed latency at "
        "1,000 users/s; CPU and peak memory of each process. With --bus nats: a local "
        "3-node NATS JetStream cluster (R3 stream), the producer and the consumers as "
        "separate processes (run --role), one embedded PostgreSQL for all; users "
        "committed and published per second.",
    )
    e2e_mode.add_argument(
        "--bus",
        choices=("embedded", "nats"),
        default="embedded",
        help="embedded: one daemon; nats: the parts as processes on a local NATS "
        "cluster (default: embedded)",
    )
    e2e_mode.add_argument(
        "--duration",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds measured at full speed; the latency run takes min(S, 20) (default: 20)",
    )
    e2e_mode.add_argument(
        "--warmup", type=float, default=3.0, metavar="S", help="seconds before (default: 3)"
    )
    e2e_mode.add_argument(
        "--consumers",
        type=int,
        default=2,
        help="consumers (embedded: each a process of its own; default: 2)",
    )
    e2e_mode.add_argument(
        "--consumer-processes",
        type=int,
        metavar="P",
        help="with --bus nats: the consumers spread over P processes (run --role consumer), "
        "in-process consumers in each (default: one process per consumer, the faster on "
        "2 cores)",
    )
    e2e_mode.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    fanout_mode = modes.add_parser(
        "fanout",
        help="the real daemon broadcasting to N plain WebSocket clients (a separate "
        "harness process): delivered/s, latency, slow closes, memory per idle client",
        description="Start the real daemon as a child process and connect N plain "
        "WebSocket clients from a harness process; memory per idle client at 1 user/s, "
        "then users delivered per second, produced -> received latency and slow closes at "
        "R users/s. --compare runs the same against reference servers (Python websockets, "
        "and Node ws when node is on the PATH). With --bus nats: a local 3-node NATS "
        "JetStream cluster, one producer process and two broadcaster processes (run "
        "--role), the clients split evenly between the two.",
    )
    fanout_mode.add_argument(
        "--bus",
        choices=("embedded", "nats"),
        default="embedded",
        help="embedded: one daemon; nats: a producer and 2 broadcasters as processes on a "
        "local NATS cluster (default: embedded)",
    )
    fanout_mode.add_argument("--clients", type=int, default=100, help="clients (default: 100)")
    fanout_mode.add_argument(
        "--rate", type=float, default=1000.0, help="users per second (default: 1000)"
    )
    fanout_mode.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="seconds measured (default: 10)"
    )
    fanout_mode.add_argument(
        "--warmup", type=float, default=2.0, metavar="S", help="seconds before (default: 2)"
    )
    fanout_mode.add_argument(
        "--harness-procs",
        type=int,
        default=1,
        metavar="P",
        help="client processes sharing the clients (default: 1)",
    )
    fanout_mode.add_argument(
        "--compare",
        action="store_true",
        help="also measure Python websockets.broadcast() and Node ws (when node is on the "
        "PATH; ws is installed once with npm into ~/.cache/userstreamd/node if missing)",
    )
    fanout_mode.add_argument(
        "--no-install", action="store_true", help="with --compare: never run npm"
    )
    fanout_mode.add_argument("--json", metavar="FILE", help="also write the figures as JSON")

    # Internal, started by the daemon: no help=, so it is not listed.
    consumer = _worker_command(commands, "consumer", cmd_consumer_worker)
    consumer.add_argument("--url", required=True)
    fanout = _worker_command(commands, "fanout", cmd_fanout_worker)
    fanout.add_argument("--upstream", required=True)
    fanout.add_argument("--port", type=int, required=True)
    fanout.add_argument("--origins", default="")
    return parser


def _worker_command(
    commands: Any,
    kind: str,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """An internal ``KIND-worker`` command, as `workers.run_worker_process` starts it."""
    command = commands.add_parser(f"{kind}-worker")
    _config_option(command, argparse.SUPPRESS)
    command.set_defaults(handler=handler)
    command.add_argument("--worker", type=int, required=True)
    command.add_argument("--ready-fd", type=int, required=True)
    return command


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for problem in str(exc).splitlines():
            print(f"userstreamd: config error: {problem}", file=sys.stderr)
        return 2
