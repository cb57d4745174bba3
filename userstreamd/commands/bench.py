"""``userstreamd bench``: the benchmarks (`userstreamd.bench`), a tool beside the daemon.
The bench package and its dependencies (the ``bench`` extra) are imported only when the
command runs; without them it says what to install and exits 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..logs import configure_logging
from ..topology import TOPOLOGIES
from .parsing import add_command


def run(args: argparse.Namespace) -> int:
    """Measure each stage, or the real daemon end to end (e2e), fanning out (fanout) or
    serving a resume from the stream's beginning (replay)."""
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
                idle_s=args.idle_seconds,
                stalled=args.stalled,
                compare=args.compare,
                install_node_ws=not args.no_install,
                progress=progress,
            )
            bench.print_fanout(report)
        elif mode == "replays":
            history = {"max_replays": args.max_replays} if args.max_replays else {}
            if args.total_rate:
                history["total_rate_per_s"] = args.total_rate
            report = bench.run_replay_load(
                replays=args.clients, back=args.back, window_s=args.window, history=history
            )
            bench.print_replay_load(report)
        elif mode == "replay":
            report = bench.run_replay(
                bus=args.bus,
                users=args.replay_users,
                buffer_messages=args.buffer_messages,
                progress=progress,
            )
            bench.print_replay(report)
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


def add_parser(commands: Any) -> argparse.ArgumentParser:
    bench = add_command(
        commands,
        "bench",
        run,
        "  userstreamd bench\n"
        "  userstreamd bench --users 5000 --repeat 1 --json bench.json --plot bench.png\n"
        "  userstreamd bench e2e --duration 60 --json e2e.json\n"
        "  userstreamd bench e2e --bus nats --duration 30\n"
        "  userstreamd bench fanout --clients 100 --rate 1000 --compare\n"
        "  userstreamd bench fanout --clients 1000 --rate 100 --harness-procs 2\n"
        "  userstreamd bench fanout --clients 100 --rate 1000 --stalled 10 --compare\n"
        "  userstreamd bench fanout --bus nats --clients 100 --rate 1000\n"
        "  userstreamd bench replay --users 200000 --json replay.json\n"
        "  userstreamd bench replay --bus nats\n"
        "  userstreamd bench replays --clients 500 --back 100000 --json replays.json\n",
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
        choices=tuple(TOPOLOGIES),
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
        "harness process): delivered/s, latency, slow closes, memory per idle client, "
        "idle CPU and latency, what becomes of stalled clients",
        description="Start the real daemon as a child process and connect N plain "
        "WebSocket clients from a harness process; memory per idle client at 1 user/s, "
        "and for --idle-seconds the server's CPU and the latency of those idle users; "
        "then users delivered per second, produced -> received latency and slow closes at "
        "R users/s. With --stalled K, K more clients connect before that and never read: "
        "how many the server closes, how (close code, or none) and when, how many stay "
        "open. --compare runs the same against reference servers (Python websockets, "
        "and Node ws when node is on the PATH). With --bus nats: a local 3-node NATS "
        "JetStream cluster, one producer process and two broadcaster processes (run "
        "--role), the clients split evenly between the two.",
    )
    fanout_mode.add_argument(
        "--bus",
        choices=tuple(TOPOLOGIES),
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
        "--idle-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds the idle clients are measured at 1 user/s: server CPU, latency "
        "(default: 5; 0: not measured)",
    )
    fanout_mode.add_argument(
        "--stalled",
        type=int,
        default=0,
        metavar="K",
        help="also K clients that never read (small receive buffer): how and when the "
        "server closes them, counted in no other figure (default: 0)",
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
    replay_mode = modes.add_parser(
        "replay",
        help="the real daemon serving a client that resumes from the stream's beginning: "
        "users/s and seconds until it holds every stored user, batched and not",
        description="Start the real daemon (synthetic source) as a child process and let "
        "it store N users (the embedded bus: committed into PostgreSQL; with --bus nats: "
        "in the JetStream stream of a local 3-node cluster, a producer and broadcasters "
        "as processes), then slow it to 1 user/s. One WebSocket client resumes with "
        "?epoch=E&since=0&batch=1000, then again without batch: users per second and "
        "seconds until it holds seqs 1..N, the gaps it was sent, and whether the seqs "
        "were consecutive.",
    )
    replay_mode.add_argument(
        "--bus",
        choices=tuple(TOPOLOGIES),
        default="embedded",
        help="embedded: one daemon, the history in PostgreSQL; nats: the history in the "
        "JetStream stream (default: embedded)",
    )
    replay_mode.add_argument(
        "--users",
        dest="replay_users",
        type=int,
        default=200_000,
        help="users stored, then replayed (default: 200000)",
    )
    replay_mode.add_argument(
        "--buffer-messages",
        type=int,
        metavar="K",
        help="the broadcasters' replay buffer (broadcaster.buffer_messages): the users "
        "before the last K are read from the store (default: as configured by default, "
        "100000)",
    )
    replay_mode.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    replays_mode = modes.add_parser(
        "replays",
        help="many clients resuming from far back at once: the commit rate, the live "
        "clients' latency and the daemon's RSS without and with them",
        description="Start the real daemon (embedded bus, synthetic source), fill its "
        "stream with BACK + 10,000 users, slow it to 1,000 users/s, then measure two "
        "windows: without replays, and with CLIENTS clients resuming BACK users behind "
        "the live end at once (in a process of their own, reading and dropping bytes).",
    )
    replays_mode.add_argument("--clients", type=int, default=500, help="default: 500")
    replays_mode.add_argument(
        "--back", type=int, default=100_000, help="users behind the live end (default: 100000)"
    )
    replays_mode.add_argument(
        "--window", type=float, default=30.0, help="seconds per window (default: 30)"
    )
    replays_mode.add_argument(
        "--max-replays", type=int, help="history.max_replays (default: the config's default)"
    )
    replays_mode.add_argument(
        "--total-rate", type=float, help="history.total_rate_per_s (default: the config's)"
    )
    replays_mode.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return bench
