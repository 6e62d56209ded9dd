"""``raftstate bench``: heartbeat throughput and latency, side by side with etcd.

For each system (raftstate, and with ``--vs-etcd`` a three-member etcd that
the benchmark starts itself) it runs these phases (``--phases``), in order:

1. **sequential**: one client, one device, one request at a time: the
   latency floor;
2. **write** (unary): ``--devices`` simulated devices in ``--procs`` load
   processes, each sending its next heartbeat (etcd: Put) as a unary call to
   the leader as soon as the last is acknowledged;
3. **stream** (gateways): the same devices behind ``--streams`` gateways per
   load process, spread over all endpoints. A raftstate gateway pipelines its
   devices' heartbeats on one ``HeartbeatStream``; etcd has no streaming put,
   so an etcd gateway pipelines its devices' concurrent unary Puts over one
   channel of its own (shown as phase ``gateway``).

Phases 2 and 3 measure ``--duration`` seconds after ``--warmup``. Both
systems are driven by the same load code over Python grpc.aio, so the ratios
compare the servers, not the clients. CPU is measured per process inside the
measurement window (servers from /proc, load processes from getrusage);
``other cpu`` is what the rest of the machine used meanwhile (from
/proc/stat), so a noisy box shows. etcd fsyncs like raftstate does
(``--etcd-durability match``): with raftstate's default ``process-crash``
durability etcd runs with ``--unsafe-no-fsync``. Results are printed as a
table and saved as JSON under ``--out``, with the exact command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from raftstate.bench.load import LoadResult, LoadSpec, run_load
from raftstate.bench.stats import LatencySummary

CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASES = ("sequential", "write", "stream")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", help="benchmark a running cluster instead of starting one")
    p.add_argument("--devices", type=int, default=256, help="concurrent simulated devices")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument(
        "--sequential",
        type=int,
        default=1000,
        help="requests in the single-client sequential phase",
    )
    p.add_argument("--durability", choices=["process-crash", "fsync"], default="process-crash")
    p.add_argument(
        "--streams",
        type=int,
        default=4,
        help="gateways (HeartbeatStreams) per load process in the stream phase",
    )
    p.add_argument(
        "--phases",
        type=_phases,
        default=PHASES,
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    p.add_argument("--vs-etcd", action="store_true", help="also run a 3-member etcd cluster")
    p.add_argument(
        "--etcd-durability",
        choices=["match", "fsync"],
        default="match",
        help="match: etcd fsyncs only if raftstate does (--unsafe-no-fsync with "
        "process-crash); fsync: etcd's default, always fsync",
    )
    p.add_argument("--out", default="bench-results", help="directory for the JSON result")


def _phases(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PHASES)}"
        )
    return tuple(p for p in PHASES if p in chosen)


@dataclass(frozen=True, slots=True)
class PhaseResult:
    system: str
    phase: str
    ops_per_s: float
    latency_ms: LatencySummary
    errors: int
    load_cpu_s: float
    #: Per server process, inside the measurement window.
    server_cpu_s: dict[str, float]
    seconds: float
    error_samples: tuple[str, ...]
    #: CPU the rest of the machine used inside the window (noise).
    other_cpu_s: float = 0.0
    server_cpu_us_per_op: float = 0.0
    load_cpu_us_per_op: float = 0.0
    loadavg_before: float = 0.0
    reconnects: int = 0


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
    """The phase's name in the table, e.g. ``stream c=256 s=8``."""
    if phase == "sequential":
        return phase
    if phase == "write":
        return f"write c={args.devices}"
    gateways = max(1, args.procs) * args.streams
    return (
        f"stream c={args.devices} s={gateways}"
        if system == "raftstate"
        else f"gateway c={args.devices} g={gateways}"
    )


def _run_phase(
    system: str,
    phase: str,
    endpoints: list[str],
    server_pids: dict[str, int],
    args: argparse.Namespace,
) -> PhaseResult:
    sequential = phase == "sequential"
    procs = 1 if sequential else max(1, args.procs)
    devices = 1 if sequential else args.devices
    per_proc = [devices // procs + (1 if i < devices % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.5 + 0.5 * procs
    warmup = 0.5 if sequential else args.warmup
    duration = 600.0 if sequential else args.duration
    specs = []
    first = 0
    for i, n in enumerate(per_proc):
        specs.append(
            LoadSpec(
                system,
                tuple(endpoints),
                "write",
                first,
                n,
                start_at,
                warmup,
                duration,
                max_ops=args.sequential if sequential else 0,
                mode="stream" if phase == "stream" else "unary",
                streams=args.streams,
                first_stream=i * args.streams,
            )
        )
        first += n
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
            time.sleep(max(0.0, start_at + warmup + duration - time.time()))
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
    )


@contextlib.contextmanager
def _raftstate_cluster(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[str], dict[str, int]]]:
    if args.endpoints:
        yield [e.strip() for e in args.endpoints.split(",") if e.strip()], {}
        return
    from cluster.local import LocalCluster
    from raftstate.config import NodeConfig

    base = NodeConfig.default(durability=args.durability)
    cluster = LocalCluster(workdir / "raftstate", 3, base_config=base)
    try:
        cluster.start()
        pids = {f"raftstate-{n.node_id}": n.pid for n in cluster.nodes.values() if n.pid}
        leader = cluster.wait_for_leader()
        # Put the leader first: the SDK would find it anyway, but this keeps
        # the phases comparable from the first request.
        endpoints = [cluster.nodes[leader].endpoint] + [
            n.endpoint for n in cluster.nodes.values() if n.node_id != leader
        ]
        yield endpoints, pids
    finally:
        cluster.stop()


def etcd_fsyncs(args: argparse.Namespace) -> bool:
    return bool(args.etcd_durability == "fsync" or args.durability == "fsync")


@contextlib.contextmanager
def _etcd_cluster(
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


def _fmt(v: float) -> str:
    return f"{v:8.2f}" if v < 100 else f"{v:8.0f}"


def render_table(results: list[PhaseResult]) -> str:
    head = (
        f"{'system':<10} {'phase':<19} {'ops/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>6} {'server cpu s (per proc)':>24} "
        f"{'srv us/op':>9} {'load cpu s':>10} {'other cpu s':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lat = r.latency_ms
        per_proc = "+".join(f"{v:.1f}" for v in r.server_cpu_s.values())
        server = f"{sum(r.server_cpu_s.values()):.1f} ({per_proc})"
        lines.append(
            f"{r.system:<10} {r.phase:<19} {r.ops_per_s:7.0f} {_fmt(lat.p50)} {_fmt(lat.p95)} "
            f"{_fmt(lat.p99)} {_fmt(lat.max)} {r.errors:6d} {server:>24} "
            f"{r.server_cpu_us_per_op:9.0f} {r.load_cpu_s:10.1f} {r.other_cpu_s:11.1f}"
        )
    return "\n".join(lines)


def _ratios(results: list[PhaseResult]) -> dict[str, float]:
    by = {(r.system, r.phase.split()[0]): r for r in results}
    out: dict[str, float] = {}

    def throughput(key: str, ours: str, theirs: str) -> None:
        rs, et = by.get(("raftstate", ours)), by.get(("etcd", theirs))
        if rs and et and et.ops_per_s:
            out[key] = round(rs.ops_per_s / et.ops_per_s, 2)

    throughput("stream_throughput_raftstate_stream_over_etcd_gateway", "stream", "gateway")
    throughput("write_throughput_raftstate_unary_over_etcd_unary", "write", "write")
    # etcd's best write phase, whichever shape it was: the conservative ratio.
    rs = by.get(("raftstate", "stream"))
    best = max(
        (r.ops_per_s for r in results if r.system == "etcd" and r.phase != "sequential"),
        default=0.0,
    )
    if rs and best:
        out["stream_throughput_raftstate_stream_over_etcd_best_write"] = round(
            rs.ops_per_s / best, 2
        )
    rs, et = by.get(("raftstate", "sequential")), by.get(("etcd", "sequential"))
    if rs and et and rs.latency_ms.p50:
        out["sequential_p50_ms_raftstate"] = round(rs.latency_ms.p50, 3)
        out["sequential_p50_ms_etcd"] = round(et.latency_ms.p50, 3)
        out["sequential_p50_etcd_over_raftstate"] = round(et.latency_ms.p50 / rs.latency_ms.p50, 2)
    return out


def _describe(args: argparse.Namespace) -> list[str]:
    lines = [f"raftstate durability: {args.durability} (3 nodes)"]
    if args.vs_etcd:
        lines.append(
            "etcd: 3 members, "
            + (
                "fsync (etcd default)"
                if etcd_fsyncs(args)
                else "--unsafe-no-fsync (matches process-crash)"
            )
        )
    if "stream" in args.phases:
        gateways = max(1, args.procs) * args.streams
        lines.append(
            f"stream phase: {args.devices} devices behind {gateways} gateways "
            f"({args.streams} per load process) spread over all endpoints; raftstate gateways "
            "pipeline on one HeartbeatStream each, etcd gateways ('gateway') pipeline concurrent "
            "unary Puts on one channel each (etcd has no streaming put)"
        )
    lines.append(
        f"load: {args.procs} processes, {args.duration:g}s measured after "
        f"{args.warmup:g}s warm-up; machine: {os.cpu_count()} cpus"
    )
    return lines


def _command_line() -> str:
    if sys.argv[1:2] == ["bench"]:
        return shlex.join(["raftstate", *sys.argv[1:]])
    return shlex.join(sys.argv)


def bench_main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PhaseResult] = []
    started = time.time()
    notes = _describe(args)
    for line in notes:
        print(f"== {line}", flush=True)
    with tempfile.TemporaryDirectory(prefix="raftstate-bench-") as tmp:
        workdir = Path(tmp)
        systems: list[tuple[str, Any]] = [("raftstate", _raftstate_cluster(args, workdir))]
        if args.vs_etcd:
            systems.append(("etcd", _etcd_cluster(args, workdir)))
        for system, cm in systems:
            print(f"== {system}: starting", flush=True)
            with cm as (endpoints, pids):
                for phase in args.phases:
                    label = phase_label(system, phase, args)
                    print(f"== {system}: {label} ...", flush=True)
                    r = _run_phase(system, phase, endpoints, pids, args)
                    results.append(r)
                    print(render_table([r]).splitlines()[-1], flush=True)
                    for s in r.error_samples:
                        print(f"   error sample: {s}", flush=True)
    table = render_table(results)
    ratios = _ratios(results)
    print()
    for line in notes:
        print(line)
    print(table)
    for k, v in ratios.items():
        print(f"{k}: {v}" + ("" if "_ms_" in k else "x"))
    noisy = [r for r in results if r.other_cpu_s > 0.1 * args.duration]
    if noisy:
        print(
            f"note: other processes used CPU during {len(noisy)} phase(s) (see 'other cpu s'); "
            "the box was noisy, so rerun for stable numbers"
        )
    record = {
        "command": _command_line(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": notes,
        "args": {k: v for k, v in vars(args).items() if k != "fn"},
        "results": [asdict(replace(r)) for r in results],
        "ratios": ratios,
    }
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path.resolve()}")
    return 0 if all(r.errors == 0 for r in results) else 1
