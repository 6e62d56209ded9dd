"""The phases of ``raftstate bench`` and the machinery that runs them.

What a phase is (:class:`PhaseShape`, :data:`PHASES`), how its load is split
over load processes (:func:`load_specs`), running one phase against a
cluster and measuring CPU inside the window (:func:`run_phase`), and the
clusters and environment the benchmark modules share (:func:`local_raftstate`,
:func:`client_env`, :func:`run_header`). ``bench.run`` (the CLI), and
``bench.fleet``, ``bench.security``, ``bench.transports`` and
``bench.hbopen`` all import from here, and this module imports none of them,
so the benchmark's import graph has no cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadResult, LoadSpec, run_load
from bench.stats import (
    LatencySummary,
    PhaseResult,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class PhaseShape:
    """How a phase drives a system: what each call does (``LoadSpec.op``),
    the load shape (``LoadSpec.mode``) and where calls go (``"leader"``,
    ``"follower"`` or ``"all"`` endpoints)."""

    op: str
    mode: str = "unary"
    at: str = "leader"


PHASE_SHAPES: dict[str, PhaseShape] = {
    "sequential": PhaseShape("write"),
    "write": PhaseShape("write"),
    "stream": PhaseShape("write", mode="stream", at="all"),
    "read-lin-leader": PhaseShape("read-linearizable"),
    "read-lin-follower": PhaseShape("read-linearizable", at="follower"),
    "read-ser-leader": PhaseShape("read-serializable"),
    "read-ser-follower": PhaseShape("read-serializable", at="follower"),
    "mixed": PhaseShape("mixed"),
    "read-lin-open": PhaseShape("read-linearizable", mode="open"),
    "read-ser-open": PhaseShape("read-serializable", mode="open"),
}
PHASES = tuple(PHASE_SHAPES)
PHASE_HELP = {
    "sequential": "one client, one device, --sequential heartbeats one at a time",
    "write": "--devices devices, closed loop, unary heartbeats to the leader",
    "stream": "the devices behind --streams gateways per process (etcd: 'gateway')",
    "read-lin-leader": "closed-loop linearizable reads at the leader",
    "read-lin-follower": "closed-loop linearizable reads, each process pinned to a follower",
    "read-ser-leader": "closed-loop serializable (local) reads at the leader",
    "read-ser-follower": "closed-loop serializable reads, each process pinned to a follower",
    "mixed": "closed loop, 50% heartbeats / 50% linearizable reads, at the leader",
    "read-lin-open": "open loop: --read-rate linearizable reads/s at the leader",
    "read-ser-open": "open loop: --read-rate serializable reads/s at the leader",
}
#: What runs without ``--phases``: about 95 s per system on a 2-cpu machine
#: with the default --duration and --warmup, under 4 minutes with --vs-etcd.
DEFAULT_PHASES = (
    "sequential",
    "write",
    "stream",
    "read-lin-leader",
    "read-lin-follower",
    "read-lin-open",
    "read-ser-open",
)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def phase_label(system: str, phase: str, args: argparse.Namespace) -> str:
    """The phase's name in the table, e.g. ``stream c=256 s=8``; its first
    word is the phase name (etcd's stream phase: ``gateway``)."""
    if phase == "sequential":
        return phase
    if phase == "stream":
        gateways = max(1, args.procs) * args.streams
        return (
            f"stream c={args.devices} s={gateways}"
            if system == "raftstate"
            else f"gateway c={args.devices} g={gateways}"
        )
    if PHASE_SHAPES[phase].mode == "open":
        return f"{phase} r={args.read_rate:g}"
    return f"{phase} c={args.devices}"


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` dealt out over ``parts`` (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def follower_endpoint(endpoints: list[str], proc: int) -> str:
    """The follower load process ``proc`` is pinned to; ``endpoints[0]`` is
    the leader, the followers are dealt out in order. Raises ``ValueError``
    for a cluster without followers."""
    if len(endpoints) < 2:
        raise ValueError("follower phases need a cluster of at least 2 members")
    return endpoints[1 + proc % (len(endpoints) - 1)]


def load_specs(
    system: str, phase: str, endpoints: list[str], args: argparse.Namespace, start_at: float
) -> list[LoadSpec]:
    """One :class:`LoadSpec` per load process for ``phase``; ``endpoints``
    lists the leader first."""
    shape = PHASE_SHAPES[phase]
    sequential = phase == "sequential"
    procs = 1 if sequential else max(1, args.procs)
    per_proc = split_evenly(1 if sequential else args.devices, procs)
    specs = []
    first = 0
    for i, n in enumerate(per_proc):
        at = (follower_endpoint(endpoints, i),) if shape.at == "follower" else tuple(endpoints)
        specs.append(
            LoadSpec(
                system,
                at,
                shape.op,
                first,
                n,
                start_at,
                0.5 if sequential else args.warmup,
                600.0 if sequential else args.duration,
                max_ops=args.sequential if sequential else 0,
                mode=shape.mode,
                streams=args.streams,
                first_stream=i * args.streams,
                pinned=shape.at == "follower",
                rate_per_s=args.read_rate / procs,
                poisson=args.arrivals == "poisson",
                seed=i,
            )
        )
        first += n
    return specs


def run_phase(
    system: str,
    phase: str,
    endpoints: list[str],
    server_pids: dict[str, int],
    args: argparse.Namespace,
    *,
    start_at: float | None = None,
) -> PhaseResult:
    """Run ``phase`` against ``endpoints`` (the leader first) and return its
    row; ``server_pids`` are the server processes whose CPU it reports.
    ``start_at`` (wall clock) sets when the load starts (default: once the
    load processes have had time to start)."""
    sequential = phase == "sequential"
    procs = 1 if sequential else max(1, args.procs)
    if start_at is None:
        start_at = time.time() + 1.5 + 0.5 * procs
    specs = load_specs(system, phase, endpoints, args, start_at)
    warmup = specs[0].warmup_s
    loadavg = os.getloadavg()[0]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pending = pool.map_async(run_load, specs)
        # Sample the servers at both ends of the window (sequential: from the
        # common start, once the load process has started up, to its end).
        time.sleep(max(0.0, (start_at if sequential else start_at + warmup) - time.time()))
        cpu0 = {name: _cpu_seconds(pid) for name, pid in server_pids.items()}
        busy0 = _busy_cpu_seconds()
        if not sequential:
            time.sleep(max(0.0, start_at + warmup + args.duration - time.time()))
            cpu1 = {name: _cpu_seconds(pid) for name, pid in server_pids.items()}
            busy1 = _busy_cpu_seconds()
        results: list[LoadResult] = pending.get()
        if sequential:
            cpu1 = {name: _cpu_seconds(pid) for name, pid in server_pids.items()}
            busy1 = _busy_cpu_seconds()
    lat = [x for r in results for x in r.latencies_ms]
    window = max(time.time() - start_at - warmup, 1e-9) if sequential else args.duration
    samples = tuple(s for r in results for s in r.error_samples)[:5]
    server_cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
    load_cpu = sum(r.cpu_s for r in results)
    ops = max(len(lat), 1)
    kinds = sorted({k for r in results for k in r.split_ms})
    lags = LatencySummary.of([x for r in results for x in r.lags_ms])
    open_loop = PHASE_SHAPES[phase].mode == "open"
    return PhaseResult(
        system=system,
        phase=phase_label(system, phase, args),
        ops_per_s=len(lat) / window,
        latency_ms=LatencySummary.of(lat),
        errors=sum(r.errors for r in results),
        load_cpu_s=round(load_cpu, 2),
        server_cpu_s=server_cpu,
        seconds=round(time.time() - t0, 1),
        error_samples=samples,
        # In the sequential phase the load processes' CPU covers more than
        # the window measured here; the estimate may then dip below zero.
        other_cpu_s=round(max(0.0, busy1 - busy0 - sum(server_cpu.values()) - load_cpu), 2),
        server_cpu_us_per_op=round(sum(server_cpu.values()) * 1e6 / ops, 1),
        load_cpu_us_per_op=round(load_cpu * 1e6 / ops, 1),
        loadavg_before=round(loadavg, 2),
        reconnects=sum(r.reconnects for r in results),
        offered_per_s=args.read_rate if open_loop else 0.0,
        dropped=sum(r.dropped for r in results),
        send_lag_ms_p99=round(lags.p99, 3) if lags.count else 0.0,
        split_latency_ms={
            k: LatencySummary.of([x for r in results for x in r.split_ms.get(k, ())]) for k in kinds
        },
    )


def _leader_first(endpoints: list[str]) -> list[str]:
    """``endpoints`` with the one every answering node names as leader first
    (unchanged if they do not agree or the leader is not listed)."""
    from cluster.local import node_status

    named = set()
    for e in endpoints:
        st = node_status(e)
        if st is not None and st.leader_grpc_address:
            named.add(st.leader_grpc_address)
    if len(named) != 1 or (leader := named.pop()) not in endpoints:
        print("== warning: could not tell the leader; treating the first endpoint as leader")
        return endpoints
    return [leader] + [e for e in endpoints if e != leader]


CLIENT_ENV = ("RAFTSTATE_CA", "RAFTSTATE_TOKEN", "RAFTSTATE_CERT", "RAFTSTATE_KEY")


@contextlib.contextmanager
def client_env(env: dict[str, str]) -> Iterator[None]:
    """Set the SDK's credential variables to ``env`` (clearing the others)
    while the block runs; load processes are spawned and inherit them."""
    saved = {k: os.environ.get(k) for k in CLIENT_ENV}
    for k in CLIENT_ENV:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_raftstate(
    args: argparse.Namespace, workdir: Path, security: str = "secure"
) -> Iterator[tuple[list[str], dict[str, int], dict[str, str]]]:
    """A local 3-node cluster: ``secure`` (TLS + admin token, the default
    config) or ``insecure`` (plaintext, no auth). Yields its endpoints
    (leader first), server pids and the client environment."""
    from cluster.local import LocalCluster
    from raftstate.config import NodeConfig

    base = NodeConfig.default(durability=args.durability)
    if security == "insecure":
        base = dataclasses.replace(base, insecure_grpc=True, auth="off")
    cluster = LocalCluster(workdir / f"raftstate-{security}", 3, base_config=base)
    try:
        cluster.start()
        pids = {f"raftstate-{n.node_id}": n.pid for n in cluster.nodes.values() if n.pid}
        leader = cluster.wait_for_leader()
        # Put the leader first: the SDK would find it anyway, but this keeps
        # the phases comparable from the first request, and the follower
        # phases know which endpoints are followers.
        endpoints = [cluster.nodes[leader].endpoint] + [
            n.endpoint for n in cluster.nodes.values() if n.node_id != leader
        ]
        yield endpoints, pids, cluster.client_env()
    finally:
        cluster.stop()


@contextlib.contextmanager
def raftstate_cluster(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[str], dict[str, int]]]:
    if args.endpoints:
        yield _leader_first([e.strip() for e in args.endpoints.split(",") if e.strip()]), {}
        return
    security = args.security[0] if args.security else "secure"
    with local_raftstate(args, workdir, security) as (endpoints, pids, env), client_env(env):
        yield endpoints, pids


def etcd_fsyncs(args: argparse.Namespace) -> bool:
    return bool(args.etcd_durability == "fsync" or args.durability == "fsync")


@contextlib.contextmanager
def etcd_cluster(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[str], dict[str, int]]]:
    from cluster.etcd import EtcdCluster

    etcd = EtcdCluster(workdir / "etcd", 3, unsafe_no_fsync=not etcd_fsyncs(args))
    try:
        endpoints = etcd.start()
        leader = etcd.leader_endpoint()
        endpoints = [leader] + [e for e in endpoints if e != leader]
        yield endpoints, {f"etcd-{i + 1}": pid for i, pid in enumerate(etcd.pids())}
    finally:
        etcd.stop()


def run_header(started: float, elapsed: float, notes: list[str]) -> dict[str, Any]:
    """The fields every saved bench record starts with: how it was run, where, when."""
    return {
        "command": command_line(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": notes,
    }


def command_line() -> str:
    """The command that was run, as a shell would take it."""
    if sys.argv[1:2] == ["bench"]:
        return shlex.join(["raftstate", *sys.argv[1:]])
    return shlex.join(sys.argv)
