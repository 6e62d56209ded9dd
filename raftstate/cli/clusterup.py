"""``raftstate cluster up``: a local cluster with embedded defaults.

State lives under ``--dir`` (default ``./.raftstate``): ``cluster.toml``
records the ports and the generated cluster secret so that a second ``up``
restarts the same cluster with its data; ``nN/`` are the data directories and
``nN.log`` the node logs, ``nN.key`` the nodes' static transport keys. The
directory is 0700 and every file in it 0600 from its first byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

from cluster.local import LocalCluster, port_is_free
from raftstate.cli.words import plural
from raftstate.config import NodeConfig
from raftstate.privfile import private_dir, write_private
from raftstate.secretcheck import generate_secret
from raftstate.tickguard import EXIT_TICK_FAILURES


def _load_or_create(state: Path, args: argparse.Namespace) -> dict[str, object]:
    meta_path = state / "cluster.toml"
    if meta_path.exists():
        with open(meta_path, "rb") as fh:
            return tomllib.load(fh)
    meta: dict[str, object] = {
        "size": args.size,
        "grpc_ports": [args.grpc_port + i for i in range(args.size)],
        "raft_ports": [args.raft_port + i for i in range(args.size)],
        "cluster_secret": generate_secret(),
        "durability": args.durability or "process-crash",
    }
    private_dir(state)
    lines = [
        "# Written by `raftstate cluster up`; delete this directory to start afresh.",
        f"size = {meta['size']}",
        f"grpc_ports = {meta['grpc_ports']}",
        f"raft_ports = {meta['raft_ports']}",
        f'cluster_secret = "{meta["cluster_secret"]}"',
        f'durability = "{meta["durability"]}"',
    ]
    write_private(meta_path, "\n".join(lines) + "\n")  # 0600 from the first byte
    return meta


def _status_line(cluster: LocalCluster) -> str:
    parts = []
    leader = term = commit = revision = devices = None
    for node_id in cluster.nodes:
        st = cluster.status(node_id, timeout_s=0.5)
        if st is None:
            parts.append(f"{node_id}:down")
            continue
        role = {1: "follower", 2: "candidate", 3: "LEADER"}.get(st.role, "?")
        parts.append(f"{node_id}:{role}")
        if st.role == 3:
            leader, term, commit = node_id, st.term, st.commit_index
            revision, devices = st.revision, st.devices
    head = (
        f"leader={leader} term={term} commit={commit} revision={revision} devices={devices}"
        if leader
        else "leader=none (electing)"
    )
    return f"{time.strftime('%H:%M:%S')} {head} | {' '.join(parts)}"


#: The mTLS (client certificate) port of a node is its gRPC port + this.
MTLS_PORT_OFFSET = 50
#: Each node's /metrics port is its gRPC port plus this (7001 -> 7091).
METRICS_PORT_OFFSET = 90
ADMIN_TOKEN_TTL_S = 30 * 86400


def _print_quick_start(cluster: LocalCluster, endpoints: str, insecure: bool) -> None:
    """Exactly what a client must export, then two commands to try."""
    if insecure:
        print(
            "\n  WARNING: --insecure: gRPC is PLAINTEXT and UNAUTHENTICATED; any local process\n"
            "  can read, write and delete every device. Loopback only; never expose it."
        )
        print(f"\n  export RAFTSTATE_ENDPOINTS={endpoints}")
    else:
        assert cluster.pki is not None
        env = cluster.client_env()
        token_file = cluster.pki.ca_cert.parent / "admin.token"
        write_private(token_file, (env["RAFTSTATE_TOKEN"] + "\n").encode())
        print(
            "\n  TLS is on; the CA, node certificates and keys are in", cluster.pki.ca_cert.parent
        )
        print(f"  admin token (30 days) in {token_file}. For the CLI and the SDK:\n")
        print(f"  export RAFTSTATE_ENDPOINTS={endpoints}")
        print(f"  export RAFTSTATE_CA={env['RAFTSTATE_CA']}")
        print(f"  export RAFTSTATE_TOKEN=$(cat {token_file})")
        print(
            "\n  (or a client certificate on the mTLS ports: "
            f"RAFTSTATE_ENDPOINTS={','.join(cluster.mtls_endpoints)} "
            f"RAFTSTATE_CERT={cluster.pki.admin.cert} RAFTSTATE_KEY={cluster.pki.admin.key})"
        )
        print("  a device token: raftstate auth issue --role device --device pump-1 --ttl 30d\n")
    print("  raftstate device heartbeat pump-1 --set temp_c=21.5")
    print("  raftstate device get pump-1\n\nCtrl-C stops the cluster.", flush=True)


def cluster_up(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    meta = _load_or_create(state, args)
    size = int(meta["size"])  # type: ignore[call-overload]
    grpc_ports = [int(p) for p in meta["grpc_ports"]]  # type: ignore[attr-defined]
    raft_ports = [int(p) for p in meta["raft_ports"]]  # type: ignore[attr-defined]
    metrics_ports = [p + METRICS_PORT_OFFSET for p in grpc_ports]
    busy = [
        p for p in grpc_ports + raft_ports + metrics_ports if not port_is_free("127.0.0.1", p)
    ]
    if busy:
        print(
            f"raftstate cluster up: ports {busy} are in use; is a cluster already running? "
            f"(stop it, or pick others with --grpc-port/--raft-port and a fresh --dir)",
            file=sys.stderr,
        )
        return 2
    insecure = bool(getattr(args, "insecure", False))
    mtls_ports = [p + MTLS_PORT_OFFSET for p in grpc_ports]
    if not insecure:
        busy = [p for p in mtls_ports if not port_is_free("127.0.0.1", p)]
        if busy:
            print(f"raftstate cluster up: mTLS ports {busy} are in use", file=sys.stderr)
            return 2
    base = NodeConfig.default(durability=args.durability or str(meta["durability"]))
    base = dataclasses.replace(base, cluster_secret=str(meta["cluster_secret"]))
    if insecure:
        base = dataclasses.replace(base, insecure_grpc=True, auth="off")
    cluster = LocalCluster(
        state,
        size,
        grpc_ports=grpc_ports,
        raft_ports=raft_ports,
        base_config=base,
        secure=not insecure,
        mtls_ports=mtls_ports,
        admin_ttl_s=ADMIN_TOKEN_TTL_S,
        metrics_ports=metrics_ports,
    )
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    print(f"starting {plural(size, 'node')}; data and logs in {state.resolve()}", flush=True)
    cluster.start(wait=False)
    try:
        leader = cluster.wait_for_leader(timeout_s=60)
    except (TimeoutError, RuntimeError) as err:
        print(f"raftstate cluster up: {err}", file=sys.stderr)
        cluster.stop()
        return 1
    endpoints = ",".join(cluster.endpoints)
    print(f"cluster ready in {time.monotonic() - started:.1f}s, leader {leader}")
    for node in cluster.nodes.values():
        print(
            f"  {node.node_id}: grpc {node.endpoint}  raft {node.config.self_member.raft}  "
            f"pid {node.pid}  log {node.log_path}"
        )
    _print_quick_start(cluster, endpoints, insecure)
    scheme = "http" if insecure else "https"
    print(f"  Prometheus: {scheme}://{{{','.join(cluster.metrics_endpoints)}}}/metrics\n")
    tty = sys.stdout.isatty()
    deadline = None if args.for_seconds is None else time.monotonic() + args.for_seconds
    last_print = 0.0
    reported: set[str] = set()
    restarts = dict.fromkeys(cluster.nodes, 0)
    while not stopping and (deadline is None or time.monotonic() < deadline):
        now = time.monotonic()
        if tty or now - last_print >= 10:
            line = _status_line(cluster)
            print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", flush=True)
            last_print = now
        for node in cluster.nodes.values():
            if node.proc is not None and not node.running() and node.node_id not in reported:
                if node.proc.returncode == EXIT_TICK_FAILURES and restarts[node.node_id] < 5:
                    restarts[node.node_id] += 1  # it asked its supervisor for a restart
                    print(
                        f"\nnode {node.node_id} gave up after failing Raft ticks; restarting it "
                        f"({restarts[node.node_id]}/5), see {node.log_path}",
                        flush=True,
                    )
                    cluster.start_node(node.node_id)
                    continue
                reported.add(node.node_id)
                print(
                    f"\nnode {node.node_id} exited with {node.proc.returncode}; "
                    f"see {node.log_path}",
                    flush=True,
                )
        time.sleep(1.0)
    print("\nstopping...", flush=True)
    cluster.stop()
    print(
        f"stopped {plural(size, 'node')} after {time.monotonic() - started:.0f}s; "
        f"data kept in {state}"
    )
    return 0
