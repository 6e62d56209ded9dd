"""``raftstate bench --fleet``: a million devices behind gateways, held at their heartbeat rate.

The [million] measurement (issue 16). For raftstate (and with ``--vs-etcd``
a three-member etcd) it runs, in order:

1. **load**: every one of ``--fleet-devices`` devices sends its first
   heartbeat (etcd: its first Put), through ``--fleet-gateways`` gateways,
   each with ``--fleet-in-flight`` full batches in flight;
2. **hold**: ``--fleet-rate`` heartbeats/s (default 16,700: a million devices
   at one per minute), open loop, for ``--fleet-duration`` s after
   ``--fleet-warmup`` s; every gateway flushes what came due every
   ``--fleet-flush-ms``. Compactions happen here (journal bytes, entries);
3. **saturate**: every gateway keeps ``--fleet-in-flight`` full batches in
   flight for ``--fleet-saturate`` s: the most the system commits;
4. raftstate only, **restart-follower** / **restart-leader**: kill -9 one
   node, start it at once, and time it until it serves a linearizable read
   with every device applied (:func:`bench.fleetwatch.time_restart`).

raftstate's write path is ``HeartbeatBatch`` (``--fleet-path auto`` falls
back to ``HeartbeatStream`` on a server without it); etcd's is ``KV.Txn``
with up to 128 Puts (its ``--max-txn-ops``). Both are driven by the same
pre-encoded load processes (:mod:`bench.fleetdrive`).

Every row reports the rate achieved, the ack latency per heartbeat
(p50/p99/p99.9), errors, elections (term changes) and leader changes, the
servers' CPU per acknowledged heartbeat (all three processes, from /proc),
the load processes' own CPU (they share the machine's cores with the
servers), the longest Raft tick per node (``Status.max_tick_ms``, since the
node started), ticks over 50 ms during the phase, RSS per node, snapshot
and journal sizes and the compactions seen. A phase that cannot finish (a
node died, the load timed out) becomes a FAILED row with the reason, and the
run goes on or stops cleanly. Results are printed as a table and saved as
JSON (``fleet-*.json`` under ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import proccpu
from bench.fleetdrive import FleetLoadResult, FleetSpec, merge_results, run_fleet_load
from bench.fleetstats import FleetPhaseResult, fleet_verdicts, render_fleet_table
from bench.fleetwatch import ClusterWatch, WatchedNode, between, time_restart
from bench.fleetwire import fleet_device_id

#: etcd flags for a fleet run: compaction as operators run it (else every
#: revision is kept and the 2 GiB default quota can fill during a long run).
ETCD_FLEET_ARGS = (
    "--auto-compaction-mode=periodic",
    "--auto-compaction-retention=1m",
    "--quota-backend-bytes=8589934592",
)


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--fleet*`` options of ``raftstate bench``."""
    g = p.add_argument_group("fleet (--fleet)")
    g.add_argument("--fleet", action="store_true", help="run the fleet benchmark (see below)")
    g.add_argument(
        "--fleet-devices", type=_positive_int, default=1_000_000, help="devices (default 1,000,000)"
    )
    g.add_argument(
        "--fleet-rate",
        type=_positive_float,
        default=16_700.0,
        help="hold phase: heartbeats/s offered in total",
    )
    g.add_argument(
        "--fleet-duration", type=_positive_float, default=300.0, help="hold phase: measured seconds"
    )
    g.add_argument(
        "--fleet-warmup",
        type=float,
        default=5.0,
        help="hold and saturate: unmeasured seconds first",
    )
    g.add_argument(
        "--fleet-saturate",
        type=float,
        default=20.0,
        help="saturate phase: measured seconds (0: skip)",
    )
    g.add_argument(
        "--fleet-gateways",
        type=_positive_int,
        default=16,
        help="gateways in total, dealt out over the load processes and endpoints",
    )
    g.add_argument(
        "--fleet-batch",
        type=_positive_int,
        default=500,
        help="most heartbeats per request (server limit 1000; etcd: 128)",
    )
    g.add_argument(
        "--fleet-flush-ms",
        type=_positive_float,
        default=50.0,
        help="hold phase: a gateway sends what came due this often",
    )
    g.add_argument(
        "--fleet-in-flight", type=_positive_int, default=2, help="requests in flight per gateway"
    )
    g.add_argument(
        "--fleet-path",
        choices=["auto", "batch", "stream"],
        default="auto",
        help="raftstate write path (auto: HeartbeatBatch if the server has it)",
    )
    g.add_argument(
        "--fleet-restart",
        default="follower,leader",
        help="restart phases: follower,leader, one of them, or none",
    )
    g.add_argument(
        "--fleet-compaction-mib",
        type=_positive_int,
        default=None,
        help="raftstate compaction_max_journal_bytes in MiB (default: the node default, 64)",
    )
    g.add_argument(
        "--fleet-timeout",
        type=float,
        default=0.0,
        help="seconds a phase may overrun before it is failed (0: from its size)",
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return v


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fleet_specs(
    system: str,
    path: str,
    endpoints: list[str],
    mode: str,
    args: argparse.Namespace,
    start_at: float,
    seq0: int,
    *,
    collect_acked: bool = False,
) -> list[FleetSpec]:
    """One :class:`FleetSpec` per load process: devices, gateways and rate
    dealt out evenly. Pure."""
    procs = max(1, min(args.procs, args.fleet_gateways))
    devices = split_evenly(args.fleet_devices, procs)
    gateways = split_evenly(args.fleet_gateways, procs)
    specs, first_dev, first_gw = [], 0, 0
    measured = mode != "load"
    for n, gw in zip(devices, gateways, strict=True):
        specs.append(
            FleetSpec(
                system=system,
                path=path,
                endpoints=tuple(endpoints),
                first_device=first_dev,
                devices=n,
                first_gateway=first_gw,
                gateways=gw,
                mode=mode,
                seq0=seq0,
                start_at=start_at,
                warmup_s=args.fleet_warmup if measured else 0.0,
                duration_s=(args.fleet_duration if mode == "hold" else args.fleet_saturate)
                if measured
                else 0.0,
                rate_per_s=args.fleet_rate * n / args.fleet_devices if mode == "hold" else 0.0,
                batch_max=args.fleet_batch,
                flush_s=args.fleet_flush_ms / 1000,
                in_flight=args.fleet_in_flight,
                collect_acked=collect_acked,
            )
        )
        first_dev += n
        first_gw += gw
    return specs


@dataclasses.dataclass
class SystemUnderTest:
    """A running cluster as the phases see it."""

    system: str
    path: str
    endpoints: list[str]
    pids: Callable[[], dict[str, int | None]]
    watch: ClusterWatch
    alive: Callable[[], list[str]]  # names of nodes that died
    cluster: Any = None  # LocalCluster (raftstate): for the restart phases


def _phase_timeout(mode: str, args: argparse.Namespace) -> float:
    if args.fleet_timeout:
        return float(args.fleet_timeout)
    if mode == "load":
        return 120.0 + float(args.fleet_devices) / 1000.0  # 1,000/s would be very slow
    span = float(args.fleet_warmup) + float(
        args.fleet_duration if mode == "hold" else args.fleet_saturate
    )
    return span + 90.0


def run_load_phase(
    sut: SystemUnderTest, mode: str, args: argparse.Namespace, *, collect_acked: bool = False
) -> tuple[FleetPhaseResult, FleetLoadResult]:
    """Run one load phase (``load``, ``hold`` or ``saturate``) against ``sut``
    in ``args.procs`` spawned processes and return its row and the merged
    load result. Never raises for a failing system: the row says FAILED."""
    procs = max(1, min(args.procs, args.fleet_gateways))
    start_at = time.time() + 2.0 + 0.5 * procs
    seq0 = time.time_ns() // 1000
    specs = fleet_specs(
        sut.system,
        sut.path,
        sut.endpoints,
        mode,
        args,
        start_at,
        seq0,
        collect_acked=collect_acked,
    )
    measured = mode != "load"
    begin = start_at + (args.fleet_warmup if measured else 0.0)
    end = begin + (specs[0].duration_s if measured else 0.0)
    timeout = _phase_timeout(mode, args)
    failed = ""
    results: list[FleetLoadResult] = []
    t0 = time.time()
    pool = multiprocessing.get_context("spawn").Pool(procs)
    try:
        pending = pool.map_async(run_fleet_load, specs)
        time.sleep(max(0.0, begin - time.time()))
        cp0 = sut.watch.checkpoint()
        cpu0 = {n: proccpu.sample(pid) for n, pid in sut.pids().items() if pid}
        busy0 = proccpu.busy_cpu_seconds()
        cpu1: dict[str, proccpu.CpuSample | None] = {}
        if measured:
            time.sleep(max(0.0, end - time.time()))
            cpu1 = {n: proccpu.sample(pid) for n, pid in sut.pids().items() if pid}
            busy1 = proccpu.busy_cpu_seconds()
            cp1 = sut.watch.checkpoint()
        try:
            results = pending.get(timeout=max(1.0, t0 + timeout - time.time()))
        except multiprocessing.TimeoutError:
            failed = f"load processes did not finish within {timeout:.0f}s"
        except Exception as exc:  # a load process raised
            failed = f"load process failed: {type(exc).__name__}: {exc}"
        if not measured:
            cpu1 = {n: proccpu.sample(pid) for n, pid in sut.pids().items() if pid}
            busy1 = proccpu.busy_cpu_seconds()
            cp1 = sut.watch.checkpoint()
    finally:
        pool.terminate()
        pool.join()
    dead = sut.alive()
    if not failed and not any(r.acked_total for r in results):
        failed = "no heartbeat was acknowledged"
    if dead:
        failed = "; ".join(filter(None, [failed, f"node(s) exited: {', '.join(dead)}"]))
    load = merge_results(results)
    server_cpu = {n: round(proccpu.cpu_between(cpu0.get(n), cpu1.get(n)).seconds, 2) for n in cpu0}
    window = load.window_s if not measured else (end - begin)
    acked = load.acked
    w = between(cp0, cp1)
    other = max(0.0, busy1 - busy0 - sum(server_cpu.values()) - load.cpu_s)
    offered = (load.sent / window) if window else 0.0
    row = FleetPhaseResult(
        system=sut.system,
        phase=mode,
        seconds=round(time.time() - t0, 1),
        offered_per_s=round(args.fleet_rate if mode == "hold" else offered, 1),
        acked_per_s=round(acked / window, 1) if window else 0.0,
        acked=acked,
        errors=load.errors,
        latency_ms=load.hist.summary(),
        server_cpu_s=server_cpu,
        server_cpu_us_per_ack=round(sum(server_cpu.values()) * 1e6 / acked, 1) if acked else 0.0,
        load_cpu_s=round(load.cpu_s, 2),
        load_cpu_us_per_ack=round(load.cpu_s * 1e6 / acked, 1) if acked else 0.0,
        other_cpu_s=round(other, 2),
        term_changes=w.term_changes,
        leader_changes=w.leader_changes,
        max_tick_ms=w.max_tick_ms if sut.system == "raftstate" else {},
        tick_stalls=w.tick_stalls if sut.system == "raftstate" else {},
        rss_mib=w.rss_mib,
        snapshot_bytes=w.snapshot_bytes,
        journal_bytes=w.journal_bytes if sut.system == "raftstate" else {},
        compactions=w.compactions,
        duplicates=load.duplicates,
        backlog_max=load.backlog_max,
        send_lag_ms_p99=round(load.lag.percentile(99), 2) if load.lag.count else 0.0,
        notes=(
            f"path={sut.path}",
            f"sent {load.sent} in {window:.1f}s",
            f"peak rss MiB {w.peak_rss_mib}",
            f"devices per node {w.devices}" if sut.system == "raftstate" else "",
        ),
        error_samples=tuple(load.error_samples[:5]),
        failed=failed,
    )
    return row, load


def run_restart_phase(
    sut: SystemUnderTest, which: str, args: argparse.Namespace
) -> FleetPhaseResult:
    """kill -9 the leader or a follower and time it back to serving."""
    cluster = sut.cluster
    t0 = time.time()
    cp0 = sut.watch.checkpoint()
    leader = cluster.leader()
    if leader is None:
        return _failed_row(sut.system, f"restart-{which}", "no agreed leader before the kill")
    node = leader if which == "leader" else next(n for n in cluster.nodes if n != leader)
    timeout = args.fleet_timeout or 120.0
    timing = time_restart(cluster, node, args.fleet_devices, fleet_device_id(0), timeout)
    cp1 = sut.watch.checkpoint()
    w = between(cp0, cp1)
    failed = "" if timing.serving_s else f"not serving after {timeout:.0f}s: {timing.missing}"
    return FleetPhaseResult(
        system=sut.system,
        phase=f"restart-{which}",
        seconds=round(time.time() - t0, 1),
        offered_per_s=0.0,
        acked_per_s=0.0,
        acked=0,
        errors=0 if timing.serving_s else 1,
        latency_ms={},
        server_cpu_s={},
        server_cpu_us_per_ack=0.0,
        load_cpu_s=0.0,
        load_cpu_us_per_ack=0.0,
        term_changes=w.term_changes,
        leader_changes=w.leader_changes,
        max_tick_ms=w.max_tick_ms,
        tick_stalls=w.tick_stalls,
        rss_mib=w.rss_mib,
        snapshot_bytes=w.snapshot_bytes,
        journal_bytes=w.journal_bytes,
        compactions=w.compactions,
        restart_s=timing.serving_s,
        notes=(
            f"killed {node} ({which})",
            f"new leader after {timing.new_leader_s}s" if timing.was_leader else "",
            "serving = health SERVING, all devices applied, a LINEARIZABLE read answered",
        ),
        failed=failed,
    )


def _failed_row(system: str, phase: str, why: str) -> FleetPhaseResult:
    return FleetPhaseResult(system, phase, 0.0, 0.0, 0.0, 0, 1, {}, {}, 0.0, 0.0, 0.0, failed=why)


def detect_path(endpoints: list[str], wanted: str) -> str:
    """``wanted`` unless it is ``auto``: then ``batch`` if the server knows
    ``HeartbeatBatch`` (an empty batch is not UNIMPLEMENTED), else ``stream``."""
    if wanted != "auto":
        return wanted
    import grpc

    from raftstate.sdk.credentials import Credentials
    from raftstate.v1 import device_pb2, device_pb2_grpc

    creds = Credentials.from_env()
    with creds.channel(endpoints[0]) as ch:
        try:
            device_pb2_grpc.DeviceStateServiceStub(ch).HeartbeatBatch(
                device_pb2.HeartbeatBatchRequest(), timeout=5.0, metadata=creds.metadata()
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "stream"
    return "batch"


def _pid_of(node: Any) -> Callable[[], int | None]:
    """The current pid of a LocalCluster node (it changes on restart)."""
    return lambda: node.pid


def _popen_pid(proc: Any) -> Callable[[], int | None]:
    return lambda: proc.pid if proc.poll() is None else None


@contextmanager
def raftstate_fleet(
    args: argparse.Namespace, workdir: Path, **config: Any
) -> Iterator[SystemUnderTest]:
    """A local 3-node raftstate cluster watched for the fleet phases;
    ``config`` overrides NodeConfig fields. Stops everything it started."""
    from bench.phases import client_env
    from cluster.local import LocalCluster
    from raftstate.config import NodeConfig

    if getattr(args, "fleet_compaction_mib", None):
        config.setdefault("compaction_max_journal_bytes", args.fleet_compaction_mib << 20)
    base = NodeConfig.default(durability=args.durability, **config)
    security = args.security[0] if getattr(args, "security", None) else "secure"
    if security == "insecure":
        base = dataclasses.replace(base, insecure_grpc=True, auth="off")
    cluster = LocalCluster(workdir / "raftstate", 3, base_config=base)
    watch: ClusterWatch | None = None
    try:
        cluster.start()
        with client_env(cluster.client_env()):
            leader = cluster.wait_for_leader()
            endpoints = [cluster.nodes[leader].endpoint] + [
                n.endpoint for n in cluster.nodes.values() if n.node_id != leader
            ]
            nodes = {
                f"raftstate-{nid}": WatchedNode(
                    n.endpoint,
                    _pid_of(n),
                    Path(n.config.data_dir) / "snapshot.bin",
                )
                for nid, n in cluster.nodes.items()
            }
            watch = ClusterWatch("raftstate", nodes, cluster.credentials).start()
            yield SystemUnderTest(
                "raftstate",
                detect_path(endpoints, args.fleet_path),
                endpoints,
                lambda: {f"raftstate-{nid}": n.pid for nid, n in cluster.nodes.items()},
                watch,
                lambda: [
                    nid
                    for nid, n in cluster.nodes.items()
                    if n.proc is not None and n.proc.poll() not in (None, -9)
                ],
                cluster,
            )
    finally:
        if watch is not None:
            watch.stop()
        cluster.stop()


@contextmanager
def etcd_fleet(args: argparse.Namespace, workdir: Path) -> Iterator[SystemUnderTest]:
    from bench.phases import etcd_fsyncs
    from cluster.etcd import EtcdCluster

    etcd = EtcdCluster(
        workdir / "etcd", 3, unsafe_no_fsync=not etcd_fsyncs(args), extra_args=ETCD_FLEET_ARGS
    )
    watch: ClusterWatch | None = None
    try:
        endpoints = etcd.start()
        leader = etcd.leader_endpoint()
        endpoints = [leader] + [e for e in endpoints if e != leader]
        procs = list(etcd._procs)
        nodes = {
            f"etcd-{i + 1}": WatchedNode(m.client_endpoint, _popen_pid(p))
            for i, (m, p) in enumerate(zip(etcd.members, procs, strict=True))
        }
        watch = ClusterWatch("etcd", nodes).start()
        yield SystemUnderTest(
            "etcd",
            "txn",
            endpoints,
            lambda: {f"etcd-{i + 1}": p.pid for i, p in enumerate(procs) if p.poll() is None},
            watch,
            lambda: [f"etcd-{i + 1}" for i, p in enumerate(procs) if p.poll() is not None],
        )
    finally:
        if watch is not None:
            watch.stop()
        etcd.stop()


def _restarts(args: argparse.Namespace) -> list[str]:
    chosen = [w.strip() for w in args.fleet_restart.split(",") if w.strip()]
    return [w for w in ("follower", "leader") if w in chosen]


def run_system(sut: SystemUnderTest, args: argparse.Namespace) -> list[FleetPhaseResult]:
    """The phases for one system; stops at the first phase that failed."""
    rows: list[FleetPhaseResult] = []
    modes = ["load", "hold"] + (["saturate"] if args.fleet_saturate > 0 else [])
    for mode in modes:
        print(f"== {sut.system}: {mode} ...", flush=True)
        row, _load = run_load_phase(sut, mode, args)
        rows.append(row)
        _print_row(row)
        if row.failed:
            return rows
    if sut.system == "raftstate":
        for which in _restarts(args):
            print(f"== {sut.system}: restart-{which} ...", flush=True)
            row = run_restart_phase(sut, which, args)
            rows.append(row)
            _print_row(row)
            if row.failed:
                return rows
    return rows


def _print_row(row: FleetPhaseResult) -> None:
    print(render_fleet_table([row]).splitlines()[-1], flush=True)
    if row.failed:
        print(f"   FAILED: {row.failed}", flush=True)
    for s in row.error_samples:
        print(f"   error sample: {s}", flush=True)


def describe(args: argparse.Namespace) -> list[str]:
    from bench.phases import etcd_fsyncs

    lines = [
        f"fleet: {args.fleet_devices} devices behind {args.fleet_gateways} gateways in "
        f"{args.procs} load processes, spread over every node; batches of up to "
        f"{args.fleet_batch}, {args.fleet_in_flight} in flight per gateway (etcd: Txns of "
        "128 Puts, as many heartbeats in flight)",
        f"hold: {args.fleet_rate:g} heartbeats/s open loop for {args.fleet_duration:g}s after "
        f"{args.fleet_warmup:g}s warm-up, gateways flush every {args.fleet_flush_ms:g} ms; "
        f"saturate: {args.fleet_saturate:g}s closed loop",
        f"raftstate: 3 nodes, durability {args.durability}, compaction at "
        + (
            f"{args.fleet_compaction_mib} MiB of journal"
            if args.fleet_compaction_mib
            else "the default settings"
        ),
        "latency: per heartbeat, from the request's send to its ack; cpu: server processes "
        "from /proc, load processes from getrusage (they share the machine's "
        f"{os.cpu_count()} cpus with the servers)",
    ]
    if args.vs_etcd:
        lines.append(
            "etcd: 3 members, "
            + ("fsync" if etcd_fsyncs(args) else "--unsafe-no-fsync (matches process-crash)")
            + ", "
            + " ".join(ETCD_FLEET_ARGS)
        )
    return lines


def fleet_main(args: argparse.Namespace) -> int:
    """``raftstate bench --fleet``: run, print the table, save the JSON.
    Returns 0 when every phase finished without errors, else 1."""
    from bench.phases import run_header

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    notes = describe(args)
    for line in notes:
        print(f"== {line}", flush=True)
    rows: list[FleetPhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="raftstate-fleet-") as tmp:
        workdir = Path(tmp)
        systems: list[tuple[str, Callable[[argparse.Namespace, Path], Any]]] = [
            ("raftstate", raftstate_fleet)
        ]
        if args.vs_etcd:
            systems.append(("etcd", etcd_fleet))
        for system, make in systems:
            print(f"== {system}: starting", flush=True)
            try:
                with make(args, workdir) as sut:
                    print(f"== {system}: write path {sut.path}", flush=True)
                    rows += run_system(sut, args)
            except Exception as exc:  # the cluster would not start or stop: a row, not a crash
                rows.append(_failed_row(system, "start", f"{type(exc).__name__}: {exc}"))
                _print_row(rows[-1])
    table = render_fleet_table(rows)
    verdicts = fleet_verdicts(rows, args.fleet_rate)
    print()
    for line in notes:
        print(line)
    print(table)
    for r in rows:
        extra = [n for n in r.notes if n]
        if r.backlog_max or r.send_lag_ms_p99:
            extra.append(
                f"gateway backlog max {r.backlog_max}, send lag p99 {r.send_lag_ms_p99} ms"
            )
        if r.tick_stalls and any(r.tick_stalls.values()):
            extra.append(f"ticks > 50 ms {r.tick_stalls}")
        if r.journal_bytes:
            extra.append(f"journal bytes {r.journal_bytes}")
        print(f"{r.system} {r.phase}: " + "; ".join(extra))
    for line in verdicts:
        print(line)
    elapsed = time.time() - started
    record = {
        **run_header(started, elapsed, notes),
        "args": {k: v for k, v in vars(args).items() if k != "fn"},
        "results": [asdict(r) for r in rows],
        "verdicts": verdicts,
    }
    path = out_dir / f"fleet-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    bad = [r for r in rows if r.failed or r.errors]
    print(
        f"saved {path.resolve()}\n{len(rows)} phase(s) in {elapsed:.0f}s, "
        + (f"{len(bad)} with errors or failed" if bad else "no errors")
    )
    return 1 if bad else 0


__all__ = [
    "add_fleet_arguments",
    "detect_path",
    "fleet_main",
    "fleet_specs",
    "raftstate_fleet",
    "run_load_phase",
]
