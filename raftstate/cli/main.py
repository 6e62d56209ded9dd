"""``raftstate``: run nodes and clusters, talk to devices, simulate, benchmark.

Client commands take their endpoints from ``--endpoints`` or
``RAFTSTATE_ENDPOINTS`` (default: the local cluster's 127.0.0.1:7001-7003)
and their credentials from ``--ca``/``--token-file``/``--cert``/``--key`` or
``RAFTSTATE_CA``, ``RAFTSTATE_TOKEN`` (or ``RAFTSTATE_CERT``/``RAFTSTATE_KEY``),
as ``raftstate cluster up`` prints; those flags go before or after the
command (:mod:`raftstate.cli.clientflags`). Every number a flag takes is
range-checked while parsing: a bad one is a one-line error naming the flag,
exit status 2 (:mod:`raftstate.cli.argtypes`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from raftstate.cli import clientflags
from raftstate.cli.argtypes import (
    COUNT,
    PORT,
    SECONDS,
    UINT64_MAX,
    CliParser,
    Integer,
    build_all,
    fail,
    key_value,
    lazy,
)
from raftstate.cli.clientflags import add_client_flags
from raftstate.cli.words import plural
from raftstate.errors import ConfigError, RaftStateError
from raftstate.model import TTL_MAX_S

#: The most nodes ``cluster up`` starts (Raft clusters are 3, 5 or 7 voters).
CLUSTER_UP_MAX_SIZE = 9


def _kv(items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Repeated ``--set KEY=VALUE`` pairs (parsed by ``key_value``); later wins."""
    return dict(items)


def cmd_node(args: argparse.Namespace) -> int:
    from raftstate.config import NodeConfig
    from raftstate.node import run_node

    try:
        cfg = NodeConfig.load(args.config, flags=_kv(args.set))
    except ConfigError as err:
        print(f"raftstate node: {err.message}", file=sys.stderr)
        return 2
    return run_node(cfg)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftstate.cli.clusterup import cluster_up

    return cluster_up(args)


def cmd_status(args: argparse.Namespace) -> int:
    from raftstate.cli.status import status_main

    return status_main(args)


def cmd_device(args: argparse.Namespace) -> int:
    from raftstate.model import Consistency, OnlineFilter
    from raftstate.sdk import DeviceClient

    consistency = (
        Consistency.SERIALIZABLE
        if getattr(args, "serializable", False)
        else Consistency.LINEARIZABLE
    )
    with DeviceClient(
        args.endpoints, deadline_s=args.deadline, credentials=args.credentials
    ) as client:
        try:
            if args.device_cmd == "heartbeat":
                ack = client.heartbeat(args.device_id, _kv(args.set), seq=args.seq, ttl_s=args.ttl)
                print(json.dumps(asdict(ack)))
            elif args.device_cmd == "delete":
                res = client.delete(args.device_id)
                print(json.dumps(asdict(res)))
            elif args.device_cmd == "get":
                dev = client.get(args.device_id, consistency)
                print(json.dumps(asdict(dev), indent=2))
            else:
                online = {"online": OnlineFilter.ONLINE, "offline": OnlineFilter.OFFLINE}.get(
                    args.state, OnlineFilter.ALL
                )
                n = 0
                for dev in client.iter_devices(
                    args.prefix,
                    online=online,
                    consistency=consistency,
                    page_size=min(args.limit, 1000),
                ):
                    print(json.dumps(asdict(dev)))
                    n += 1
                    if n >= args.limit:
                        break
                print(plural(n, "device"), file=sys.stderr)
        except RaftStateError as err:
            print(
                f"raftstate device {args.device_cmd}: {type(err).__name__}: {err.message}",
                file=sys.stderr,
            )
            return 1
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    from raftstate.cli.auth import auth_main

    return auth_main(args, args.endpoints)


def cmd_rendezvous(args: argparse.Namespace) -> int:
    from raftstate.cli.rendezvous import rendezvous_main

    return rendezvous_main(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from raftstate.cli.simulate import simulate

    return simulate(args.endpoints, args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.run import bench_main

    return bench_main(args)


def _needs_repository(err: ImportError) -> int:
    print(
        f"raftstate bench: {err}; the benchmark lives in the repository's bench/ package: "
        "run it from a checkout installed with pip install -e '.[test]'",
        file=sys.stderr,
    )
    return 2


def cmd_chaos_bench(args: argparse.Namespace) -> int:
    from chaos.bench import bench_main as chaos_bench_main

    return chaos_bench_main(args)


def _needs_test_extras(err: ImportError) -> int:
    print(
        f"raftstate chaos: {err}; install the test extras: pip install -e '.[test]'",
        file=sys.stderr,
    )
    return 2


def cmd_secret(args: argparse.Namespace) -> int:
    """Print a fresh secret for cluster_secret, rendezvous_secret or a token key."""
    from raftstate.secretcheck import generate_secret

    print(generate_secret())
    return 0


def _build_rendezvous(rz: argparse.ArgumentParser) -> None:
    from raftstate.cli.rendezvous import add_arguments

    add_arguments(rz)
    rz.set_defaults(fn=cmd_rendezvous)


def _build_bench(bench: argparse.ArgumentParser) -> None:
    try:  # bench/ sits next to raftstate/ in the repository, not in the runtime
        from bench.run import add_bench_arguments
    except ImportError as err:
        missing_bench = err
        bench.set_defaults(fn=lambda _args: _needs_repository(missing_bench))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(fn=cmd_bench)


def _build_chaos(chaos: argparse.ArgumentParser) -> None:
    chsub = chaos.add_subparsers(dest="chaos_cmd", required=True)
    cbench = chsub.add_parser(
        "bench", help="heartbeat latency and success rate under chaos/profiles.toml profiles"
    )
    try:
        from chaos.bench import add_arguments as add_chaos_bench_arguments
    except ImportError as err:  # toxiproxy-python is a test extra
        missing = err
        cbench.set_defaults(fn=lambda _args: _needs_test_extras(missing))
    else:
        add_chaos_bench_arguments(cbench)
        cbench.set_defaults(fn=cmd_chaos_bench)
    cflood = chsub.add_parser(
        "flood",
        help="8 KiB heartbeats into leader and follower, kill -9 the leader, restart all; "
        "check nothing acknowledged was lost",
    )
    from chaos.floodrun import add_arguments as add_flood_arguments
    from chaos.floodrun import main as flood_main

    add_flood_arguments(cflood)
    cflood.set_defaults(fn=flood_main)


def build_parser(lazily: bool = True) -> argparse.ArgumentParser:
    """The ``raftstate`` parser. ``lazily``: the options of the heavier
    commands (bench, chaos, rendezvous) are added only once the command is
    chosen, so that every other command starts quickly; ``False`` builds
    them all now (for tools that inspect every option)."""
    p = CliParser(
        prog="raftstate",
        description="Run nodes and clusters, talk to devices, simulate, benchmark.",
    )
    add_client_flags(p, outer=True)
    sub = p.add_subparsers(dest="cmd", required=True)

    node = sub.add_parser("node", help="run one node")
    node.add_argument("--config", required=True, help="TOML config file")
    node.add_argument(
        "--set",
        action="append",
        default=[],
        type=key_value,
        metavar="FIELD=VALUE",
        help="override a config field (environment RAFTSTATE_<FIELD> wins)",
    )
    node.set_defaults(fn=cmd_node)

    cl = sub.add_parser("cluster", help="local clusters")
    clsub = cl.add_subparsers(dest="cluster_cmd", required=True)
    up = clsub.add_parser("up", help="start a local cluster and show its status until Ctrl-C")
    up.add_argument("--dir", default=".raftstate", help="state directory (default .raftstate)")
    up.add_argument(
        "--size",
        type=Integer(1, CLUSTER_UP_MAX_SIZE),
        metavar="N",
        default=3,
        help=f"nodes, 1-{CLUSTER_UP_MAX_SIZE} (default 3)",
    )
    up.add_argument(
        "--grpc-port",
        type=PORT,
        metavar="PORT",
        default=7001,
        help="first gRPC port; node i gets this + i, and + 50 for mTLS (default 7001)",
    )
    up.add_argument(
        "--raft-port",
        type=PORT,
        metavar="PORT",
        default=7101,
        help="first Raft port; node i gets this + i (default 7101)",
    )
    up.add_argument(
        "--durability",
        choices=["process-crash", "fsync"],
        default=None,
        help="when a heartbeat counts as kept (default process-crash; fixed at the first up)",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without authentication (loopback demos only; says so loudly)",
    )
    up.add_argument(
        "--for-seconds",
        type=SECONDS,
        metavar="S",
        default=None,
        help="stop by itself after this long (for scripts)",
    )
    up.set_defaults(fn=cmd_cluster_up)

    st = sub.add_parser("status", help="show every node's view of the cluster")
    st.add_argument("--json", action="store_true", help="print the raw status of every node")
    add_client_flags(st, outer=False)
    st.set_defaults(fn=cmd_status, client=True)

    dev = sub.add_parser("device", help="send a heartbeat, get, list or delete devices")
    add_client_flags(dev, outer=True)
    dsub = dev.add_subparsers(dest="device_cmd", required=True)
    device_help = {
        "heartbeat": "send one heartbeat; prints the ack",
        "get": "print one device",
        "list": "print devices, one JSON line each (the count on stderr)",
        "delete": "delete a device (operator/admin; idempotent)",
    }
    for name, helptext in device_help.items():
        d = dsub.add_parser(name, help=helptext)
        add_client_flags(d, outer=False)
        if name in ("heartbeat", "get", "delete"):
            d.add_argument("device_id")
        if name == "heartbeat":
            d.add_argument(
                "--set",
                action="append",
                default=[],
                type=key_value,
                metavar="KEY=VALUE",
                help="a reported key (repeat)",
            )
            d.add_argument(
                "--seq",
                type=Integer(1, UINT64_MAX),
                default=None,
                help="1 to 2^64-1, increasing per device (default: unix time in microseconds)",
            )
            d.add_argument(
                "--ttl",
                type=Integer(0, TTL_MAX_S),
                default=None,
                help=f"seconds online after this, 0 to {TTL_MAX_S} (0: keep the previous)",
            )
        elif name != "delete":
            d.add_argument(
                "--serializable",
                action="store_true",
                help="read the node's local state (may be stale)",
            )
        if name == "list":
            d.add_argument("--prefix", default="", help="only ids starting with this")
            d.add_argument(
                "--state",
                choices=["all", "online", "offline"],
                default="all",
                help="online: no committed expiry since its last heartbeat (default all)",
            )
            d.add_argument(
                "--limit", type=COUNT, default=1000, help="print at most this many (default 1000)"
            )
        d.set_defaults(fn=cmd_device, client=True)

    from raftstate.cli.watch import add_watch_parser

    add_watch_parser(sub)

    sec = sub.add_parser(
        "secret", help="print a new secret (32 random bytes, URL-safe base64) for a config"
    )
    sec.set_defaults(fn=cmd_secret)

    from raftstate.cli.auth import add_auth_parser

    add_auth_parser(sub)
    sub.choices["auth"].set_defaults(fn=cmd_auth, client=True)

    lazy(
        sub, "rendezvous", _build_rendezvous, help="run the ICE rendezvous service for NATed nodes"
    )

    from raftstate.cli.lab import add_lab_parser

    add_lab_parser(sub)

    sim = sub.add_parser("simulate", help="run a device fleet against the cluster")
    add_client_flags(sim, outer=False)
    sim.add_argument("--devices", type=COUNT, default=100, help="devices (default 100)")
    sim.add_argument(
        "--interval", type=SECONDS, default=1.0, help="seconds between heartbeats (default 1)"
    )
    sim.add_argument(
        "--duration", type=SECONDS, default=None, help="seconds (default: until Ctrl-C)"
    )
    sim.add_argument("--prefix", default="sim-", help="device id prefix (default sim-)")
    sim.add_argument(
        "--gateways",
        type=Integer(0),
        default=0,
        help="simulate this many gateways, each sending its devices' heartbeats in batches "
        "(default 0: devices send their own)",
    )
    sim.add_argument(
        "--devices-per-gateway",
        type=COUNT,
        default=100,
        help="devices behind each gateway (default 100)",
    )
    sim.set_defaults(fn=cmd_simulate, client=True)

    lazy(
        sub,
        "bench",
        _build_bench,
        help="benchmark heartbeats (optionally against etcd; needs the repository)",
    )
    lazy(sub, "chaos", _build_chaos, help="weak-network chaos runs (needs the test extras)")
    if not lazily:
        build_all(p)
    return p


def check_cluster_up_ports(args: argparse.Namespace) -> None:
    """Every port ``cluster up`` derives from its base ports must exist
    (exit 2 and one line naming the flag otherwise)."""
    from raftstate.cli.clusterup import MTLS_PORT_OFFSET

    last = args.size - 1
    top = (
        ("--grpc-port", args.grpc_port + last + (0 if args.insecure else MTLS_PORT_OFFSET)),
        ("--raft-port", args.raft_port + last),
    )
    for flag, port in top:
        if port > 65535:
            fail(
                "raftstate cluster up",
                f"{flag}: with --size {args.size} the ports reach {port}, past 65535",
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clientflags.resolve(args)
    if getattr(args, "cluster_cmd", None) == "up":
        check_cluster_up_ports(args)
    try:
        rc: Any = args.fn(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
