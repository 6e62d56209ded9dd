"""``raftstate``: run nodes and clusters, talk to devices, simulate, benchmark.

Client commands take their endpoints from ``--endpoints`` or
``RAFTSTATE_ENDPOINTS`` (default: the local cluster's 127.0.0.1:7001-7003)
and their credentials from ``RAFTSTATE_CA``, ``RAFTSTATE_TOKEN`` (or
``RAFTSTATE_CERT``/``RAFTSTATE_KEY``), as ``raftstate cluster up`` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from raftstate.errors import ConfigError, RaftStateError

DEFAULT_ENDPOINTS = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"


def _endpoints(args: argparse.Namespace) -> str:
    return str(args.endpoints or os.environ.get("RAFTSTATE_ENDPOINTS") or DEFAULT_ENDPOINTS)


def _kv(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"raftstate: {what} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_node(args: argparse.Namespace) -> int:
    from raftstate.config import NodeConfig
    from raftstate.node import run_node

    try:
        cfg = NodeConfig.load(args.config, flags=_kv(args.set, "--set"))
    except ConfigError as err:
        print(f"raftstate node: {err.message}", file=sys.stderr)
        return 2
    return run_node(cfg)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from raftstate.cli.clusterup import cluster_up

    return cluster_up(args)


def cmd_status(args: argparse.Namespace) -> int:
    from raftstate.sdk import DeviceClient

    with DeviceClient(_endpoints(args)) as client:
        rows = []
        for endpoint in client._client.endpoints:  # noqa: SLF001 - listing configured endpoints
            try:
                st = client.status(endpoint)
            except RaftStateError as err:
                rows.append({"endpoint": endpoint, "error": err.message})
                continue
            rows.append({"endpoint": endpoint, **asdict(st)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'endpoint':<22} {'node':<6} {'role':<10} {'term':>5} {'commit':>8} "
        f"{'applied':>8} {'revision':>9} {'devices':>8} leader"
    )
    healthy = 0
    for r in rows:
        if "error" in r:
            print(f"{r['endpoint']:<22} unreachable: {r['error']}")
            continue
        healthy += 1
        print(
            f"{r['endpoint']:<22} {r['node_id']:<6} {r['role']:<10} {r['term']:>5} "
            f"{r['commit_index']:>8} {r['last_applied']:>8} {r['revision']:>9} "
            f"{r['devices']:>8} {r['leader_id'] or '-'}"
        )
    _print_integrity(rows)
    _print_links(rows)
    leaders = {r.get("leader_id") for r in rows if "error" not in r}
    leader = leaders.pop() if len(leaders) == 1 else ""
    print(f"{healthy}/{len(rows)} nodes answering; leader: {leader or 'none agreed'}")
    return 0 if healthy and leader else 1


def _print_integrity(rows: list[dict[str, Any]]) -> None:
    """Failed Raft ticks and catch-up after lost data, per node (if any)."""
    for r in rows:
        if r.get("tick_failures"):
            print(
                f"{r['node_id']}: {r['tick_failures']} failed Raft ticks; "
                f"last: {r['last_tick_error']}"
            )
        if r.get("catching_up"):
            print(f"{r['node_id']}: catching up after lost data (not voting until caught up)")


def _print_links(rows: list[dict[str, Any]]) -> None:
    """Per-peer transport links as each node sees them (UDP transport only)."""
    links = [
        (r["node_id"], m)
        for r in rows
        if "error" not in r
        for m in r["members"]
        if m["path"] and m["node_id"] != r["node_id"]
    ]
    if not links:
        return
    print(
        f"\n{'link':<16} {'path':<7} {'up':<3} {'rtt ms':>7} {'loss':>6} {'retx':>7} "
        f"{'sessions':>8} {'paths':>5}  resent/sent (leader)"
    )
    for src, m in links:
        print(
            f"{src + ' -> ' + m['node_id']:<16} {m['path']:<7} "
            f"{'yes' if m['connected'] else 'no':<3} {m['rtt_ms']:>7.2f} "
            f"{m['loss_rate']:>6.1%} {m['retransmissions']:>7} {m['sessions']:>8} {m['paths']:>5}  "
            + (f"{m['entries_resent']}/{m['entries_sent']}" if int(m["entries_sent"]) else "-")
        )
    for r in rows:
        drops = r.get("transport_drops") or {}
        if drops:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()))
            print(f"{r['node_id']}: dropped datagrams: {counts}")
    print()


def cmd_device(args: argparse.Namespace) -> int:
    from raftstate.model import Consistency, OnlineFilter
    from raftstate.sdk import DeviceClient

    consistency = (
        Consistency.SERIALIZABLE
        if getattr(args, "serializable", False)
        else Consistency.LINEARIZABLE
    )
    with DeviceClient(_endpoints(args), deadline_s=args.deadline) as client:
        try:
            if args.device_cmd == "heartbeat":
                ack = client.heartbeat(
                    args.device_id, _kv(args.set, "--set"), seq=args.seq, ttl_s=args.ttl
                )
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
                print(f"{n} devices", file=sys.stderr)
        except RaftStateError as err:
            print(
                f"raftstate device {args.device_cmd}: {type(err).__name__}: {err.message}",
                file=sys.stderr,
            )
            return 1
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    from raftstate.cli.auth import auth_main

    return auth_main(args, _endpoints(args))


def cmd_rendezvous(args: argparse.Namespace) -> int:
    from raftstate.cli.rendezvous import rendezvous_main

    return rendezvous_main(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from raftstate.cli.simulate import simulate

    if args.gateways < 0 or args.devices_per_gateway < 1:
        print(
            "raftstate simulate: --gateways must be >= 0, --devices-per-gateway >= 1",
            file=sys.stderr,
        )
        return 2

    return simulate(_endpoints(args), args)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftstate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    node = sub.add_parser("node", help="run one node")
    node.add_argument("--config", required=True, help="TOML config file")
    node.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field (environment RAFTSTATE_<FIELD> wins)",
    )
    node.set_defaults(fn=cmd_node)

    cl = sub.add_parser("cluster", help="local clusters")
    clsub = cl.add_subparsers(dest="cluster_cmd", required=True)
    up = clsub.add_parser("up", help="start a local cluster and show its status until Ctrl-C")
    up.add_argument("--dir", default=".raftstate", help="state directory (default .raftstate)")
    up.add_argument("--size", type=int, default=3)
    up.add_argument("--grpc-port", type=int, default=7001, help="first gRPC port")
    up.add_argument("--raft-port", type=int, default=7101, help="first Raft port")
    up.add_argument("--durability", choices=["process-crash", "fsync"], default=None)
    up.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without authentication (loopback demos only; says so loudly)",
    )
    up.add_argument(
        "--for-seconds",
        type=float,
        default=None,
        help="stop by itself after this long (for scripts)",
    )
    up.set_defaults(fn=cmd_cluster_up)

    for name, fn, helptext in (("status", cmd_status, "show every node's view of the cluster"),):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument(
            "--endpoints",
            help=f"comma-separated (env RAFTSTATE_ENDPOINTS; default {DEFAULT_ENDPOINTS})",
        )
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=fn)

    dev = sub.add_parser("device", help="send a heartbeat, get, list or delete devices")
    dsub = dev.add_subparsers(dest="device_cmd", required=True)
    for name in ("heartbeat", "get", "list", "delete"):
        d = dsub.add_parser(name)
        d.add_argument("--endpoints")
        d.add_argument("--deadline", type=float, default=10.0, help="seconds, retries included")
        if name in ("heartbeat", "get", "delete"):
            d.add_argument("device_id")
        if name == "heartbeat":
            d.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="a reported key (repeat)",
            )
            d.add_argument("--seq", type=int, default=None)
            d.add_argument("--ttl", type=int, default=None, help="seconds online after this")
        elif name != "delete":
            d.add_argument(
                "--serializable",
                action="store_true",
                help="read the node's local state (may be stale)",
            )
        if name == "list":
            d.add_argument("--prefix", default="")
            d.add_argument("--state", choices=["all", "online", "offline"], default="all")
            d.add_argument("--limit", type=int, default=1000)
        d.set_defaults(fn=cmd_device)

    sec = sub.add_parser(
        "secret", help="print a new secret (32 random bytes, URL-safe base64) for a config"
    )
    sec.set_defaults(fn=cmd_secret)

    from raftstate.cli.auth import add_auth_parser

    add_auth_parser(sub, f"comma-separated (env RAFTSTATE_ENDPOINTS; default {DEFAULT_ENDPOINTS})")
    sub.choices["auth"].set_defaults(fn=cmd_auth)

    from raftstate.cli.rendezvous import add_arguments as add_rendezvous_arguments

    rz = sub.add_parser("rendezvous", help="run the ICE rendezvous service for NATed nodes")
    add_rendezvous_arguments(rz)
    rz.set_defaults(fn=cmd_rendezvous)

    from raftstate.cli.lab import add_lab_parser

    add_lab_parser(sub)

    sim = sub.add_parser("simulate", help="run a device fleet against the cluster")
    sim.add_argument("--endpoints")
    sim.add_argument("--devices", type=int, default=100)
    sim.add_argument("--interval", type=float, default=1.0, help="seconds between heartbeats")
    sim.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    sim.add_argument("--prefix", default="sim-")
    sim.add_argument(
        "--gateways",
        type=int,
        default=0,
        help="simulate this many gateways, each sending its devices' heartbeats in batches",
    )
    sim.add_argument(
        "--devices-per-gateway", type=int, default=100, help="devices behind each gateway"
    )
    sim.set_defaults(fn=cmd_simulate)

    bench = sub.add_parser(
        "bench", help="benchmark heartbeats (optionally against etcd; needs the repository)"
    )
    try:  # bench/ sits next to raftstate/ in the repository, not in the runtime
        from bench.run import add_bench_arguments
    except ImportError as err:
        missing_bench = err
        bench.set_defaults(fn=lambda _args: _needs_repository(missing_bench))
    else:
        add_bench_arguments(bench)
        bench.set_defaults(fn=cmd_bench)

    chaos = sub.add_parser("chaos", help="weak-network chaos runs (needs the test extras)")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: Any = args.fn(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
