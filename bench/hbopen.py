"""The ``hb-open`` phase of ``raftstate bench --transport``: CPU per committed heartbeat.

A fixed rate of heartbeats (``--hb-rate`` per second, evenly spaced, so
every transport gets the same offered work) goes as unary calls to the
leader from ``--procs`` load processes (:mod:`bench.load`, open
loop, at most ``--devices`` in flight). At both ends of the measurement
window, in this order, the phase reads the leader's ``Cluster.Status``
(``revision`` counts applied heartbeats, ``commit_index`` entries), every
node process's CPU (:mod:`bench.proccpu`) and the machine's busy
time. Node CPU in the window over heartbeats committed in it gives µs per
committed heartbeat, in total and split leader / followers
(:func:`~bench.transportreport.hb_cpu_result`). A leader that
changed during the window is flagged, since the split then means little.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import proccpu
from bench.load import LoadResult, LoadSpec, run_load
from bench.stats import LatencySummary, PhaseResult
from bench.transportreport import HbCpuResult, hb_cpu_result

if TYPE_CHECKING:
    from cluster.local import LocalCluster
    from raftstate.v1 import cluster_pb2

#: Role.LEADER in ``Cluster.Status``.
_LEADER_ROLE = 3


@dataclass(slots=True)
class ClusterTarget:
    """One running cluster of the comparison and its current leader."""

    transport: str
    cluster: LocalCluster
    leader: str
    #: The SDK credential variables of this cluster, set around each run:
    #: several targets are up at once, each with its own CA and token.
    env: dict[str, str] = field(default_factory=dict)

    def endpoints(self) -> list[str]:
        """gRPC endpoints, the leader's first."""
        nodes = self.cluster.nodes
        return [nodes[self.leader].endpoint] + [
            n.endpoint for n in nodes.values() if n.node_id != self.leader
        ]

    def pids(self) -> dict[str, int]:
        return {n.node_id: n.pid for n in self.cluster.nodes.values() if n.pid is not None}


@contextlib.contextmanager
def cluster_target(
    transport: str, args: argparse.Namespace, workdir: Path
) -> Iterator[ClusterTarget]:
    from bench.phases import client_env
    from cluster.local import LocalCluster
    from raftstate.config import NodeConfig

    base = NodeConfig.default(durability=args.durability, transport=transport)
    cluster = LocalCluster(workdir / transport, 3, base_config=base)
    try:
        cluster.start()
        env = cluster.client_env()
        with client_env(env):
            yield ClusterTarget(transport, cluster, cluster.wait_for_leader(), env)
    finally:
        cluster.stop()


def hb_open_specs(
    endpoints: list[str], args: argparse.Namespace, start_at: float
) -> list[LoadSpec]:
    """One open-loop heartbeat :class:`LoadSpec` per load process, at the
    leader (``endpoints[0]``), evenly spaced, ``--hb-rate`` in total."""
    from bench.phases import split_evenly

    procs = max(1, args.procs)
    specs = []
    first = 0
    for i, n in enumerate(split_evenly(args.devices, procs)):
        specs.append(
            LoadSpec(
                "raftstate",
                tuple(endpoints),
                "write",
                first,
                max(1, n),
                start_at,
                args.warmup,
                args.duration,
                mode="open",
                rate_per_s=args.hb_rate / procs,
                poisson=False,
                seed=i,
            )
        )
        first += n
    return specs


@dataclass(frozen=True, slots=True)
class _Edge:
    """What one end of the measurement window saw."""

    status: cluster_pb2.StatusResponse | None
    cpu: dict[str, proccpu.CpuSample | None]
    busy_s: float


def _edge(target: ClusterTarget) -> _Edge:
    from cluster.local import node_status

    status = node_status(target.cluster.nodes[target.leader].endpoint, timeout_s=2.0)
    cpu = {node_id: proccpu.sample(pid) for node_id, pid in target.pids().items()}
    return _Edge(status, cpu, proccpu.busy_cpu_seconds())


def _leads(e: _Edge, leader: str) -> bool:
    return e.status is not None and e.status.role == _LEADER_ROLE and e.status.node_id == leader


def run_hb_open(
    target: ClusterTarget, args: argparse.Namespace, round_no: int
) -> tuple[PhaseResult, HbCpuResult]:
    """One hb-open run against ``target`` (see the module docstring)."""
    target.leader = target.cluster.wait_for_leader()
    procs = max(1, args.procs)
    start_at = time.time() + 1.5 + 0.5 * procs
    specs = hb_open_specs(target.endpoints(), args, start_at)
    begin = start_at + args.warmup
    loadavg = os.getloadavg()[0]
    t0 = time.time()
    from bench.phases import client_env

    # Load processes inherit the credentials of this target's cluster.
    with client_env(target.env), multiprocessing.get_context("spawn").Pool(procs) as pool:
        pending = pool.map_async(run_load, specs)
        time.sleep(max(0.0, begin - time.time()))
        before = _edge(target)
        time.sleep(max(0.0, begin + args.duration - time.time()))
        after = _edge(target)
        results: list[LoadResult] = pending.get()
    deltas = {n: proccpu.cpu_between(before.cpu[n], after.cpu.get(n)) for n in before.cpu}
    node_cpu = {n: d.seconds for n, d in deltas.items()}
    sources = sorted({d.source for d in deltas.values()})
    load_cpu = sum(r.cpu_s for r in results)
    lat = [x for r in results for x in r.latencies_ms]
    committed = entries = 0
    if before.status is not None and after.status is not None:
        committed = after.status.revision - before.status.revision
        entries = after.status.commit_index - before.status.commit_index
    other = max(0.0, after.busy_s - before.busy_s - sum(node_cpu.values()) - load_cpu)
    errors = sum(r.errors for r in results)
    hb = hb_cpu_result(
        target.transport, round_no, offered_per_s=args.hb_rate, duration_s=args.duration,
        committed=committed, entries=entries, acked=len(lat), errors=errors,
        leader=target.leader,
        leader_changed=not (_leads(before, target.leader) and _leads(after, target.leader)),
        node_cpu_s=node_cpu, cpu_source="+".join(sources), latencies_ms=lat,
        load_cpu_s=load_cpu, other_cpu_s=other,
    )  # fmt: skip
    lags = LatencySummary.of([x for r in results for x in r.lags_ms])
    row = PhaseResult(
        system=target.transport,
        phase=f"hb-open r={args.hb_rate:g} #{round_no}",
        ops_per_s=len(lat) / args.duration,
        latency_ms=hb.latency_ms,
        errors=errors,
        load_cpu_s=round(load_cpu, 2),
        server_cpu_s={n: round(v, 2) for n, v in node_cpu.items()},
        seconds=round(time.time() - t0, 1),
        error_samples=tuple(s for r in results for s in r.error_samples)[:5],
        other_cpu_s=round(other, 2),
        server_cpu_us_per_op=hb.cpu_us_per_hb,
        load_cpu_us_per_op=round(load_cpu * 1e6 / max(len(lat), 1), 1),
        loadavg_before=round(loadavg, 2),
        offered_per_s=args.hb_rate,
        dropped=sum(r.dropped for r in results),
        send_lag_ms_p99=round(lags.p99, 3) if lags.count else 0.0,
    )
    return row, hb


__all__ = ["ClusterTarget", "cluster_target", "hb_open_specs", "run_hb_open"]
