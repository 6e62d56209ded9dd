"""``raftstate chaos bench``: heartbeat latency and success under weak-network profiles.

For each ``--profile`` and each ``--transport`` (``udp``, ``tcp`` or both;
with both, the two runs of a profile follow each other and their order
alternates from profile to profile, so drift on a shared box hits both):

1. start a 3-node cluster with every link through the chaos proxy
   (:class:`~chaos.harness.ChaosCluster` for UDP, one UDP proxy per directed
   node pair; :class:`~chaos.tcpcluster.TcpChaosCluster` for pysyncobj's
   TCP, one TCP proxy per node pair) and apply the profile. A TCP proxy
   cannot drop, duplicate or reorder a byte stream: TCP runs get the
   profile's latency/bandwidth toxics only, and the result says which were
   left out. Outage schedules (``flaky``, ``partition``) run on both;
2. drive the open-loop fleet of :mod:`chaos.fleetload` until
   ``--heartbeats`` device heartbeats were sent, with commit probes at the
   leader and linearizable reads, all recorded;
3. report device-observed ack latency, commit latency at the leader,
   linearizable read latency and the replication success rate (acked within
   the deadline / attempted), then
4. end in the shared verifier (:func:`chaos.verify.verify`: acked present on
   every node, identical tables, linearizable history) and count lost acked
   heartbeats: acked ``(device, seq)`` that some node does not hold.

Prints a table (and UDP/TCP ratios when both ran), saves JSON + Markdown and a
PNG of the latency CDFs under ``--out``. Exit 0 only if every run verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.stats import LatencySummary
from chaos.benchreport import (
    ProfileResult,
    cdf_points,
    plot_cdf,
    render_markdown,
    render_ratios,
    render_table,
    target_lines,
    transport_ratios,
)
from chaos.fleetload import FleetPlan, LoadOutcome, drive_fleet
from chaos.harness import ChaosCluster
from chaos.history import History
from chaos.linearizability import check
from chaos.profiles import ProfileError, load_profile
from chaos.tcpcluster import TcpChaosCluster, new_cluster
from chaos.verify import Record, Verdict, node_table, verify
from raftstate.cli.argtypes import COUNT, RATE, RATE_OR_ZERO, SECONDS
from raftstate.cli.words import plural

__all__ = ["BenchSettings", "add_arguments", "bench_main", "parse_transports", "run_profile"]

TRANSPORTS = ("udp", "tcp")
_CONVERGE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class BenchSettings:
    plan: FleetPlan = FleetPlan()
    transports: tuple[str, ...] = ("udp",)


def parse_transports(text: str) -> tuple[str, ...]:
    """``"udp"``, ``"tcp"``, ``"udp,tcp"`` ... as a tuple. Raises
    ``argparse.ArgumentTypeError`` naming the bad item."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    for t in items:
        if t not in TRANSPORTS:
            raise argparse.ArgumentTypeError(f"{t!r} is not one of {', '.join(TRANSPORTS)}")
    if not items or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError("give udp, tcp or udp,tcp (each once)")
    return items


def _say(line: str) -> None:
    print(line, flush=True)


def _diagnose(cc: ChaosCluster) -> str:
    """Each node's role, term and applied index, and the leader's view of its
    followers (connected, match index): what a convergence failure needs."""
    parts, leader_view = [], ""
    for node_id in cc.nodes.nodes:
        st = cc.nodes.status(node_id)
        if st is None:
            parts.append(f"{node_id} unreachable")
            continue
        parts.append(f"{node_id} role {st.role} term {st.term} applied {st.last_applied}")
        if st.role == 3:
            leader_view = f"; leader {node_id} sees " + ", ".join(
                f"{m.node_id} connected={m.connected} match_index={m.match_index}"
                for m in st.members
                if m.node_id != node_id
            )
    return ", ".join(parts) + leader_view


def _lost(acked: list[tuple[str, int]], tables: list[dict[str, Record]], need: int) -> int:
    return sum(
        1
        for device_id, seq in acked
        if sum(t.get(device_id, (0,))[0] >= seq for t in tables) < need
    )


def run_profile(
    name: str, transport: str, plan: FleetPlan, workdir: Path, failures: Path | None = None
) -> ProfileResult:
    """Run one profile on one transport end to end, on a fresh cluster.
    Raises ``ProfileError`` for an unknown profile, ``RuntimeError`` /
    ``TimeoutError`` if the cluster does not start. If verification fails, the
    history and the node logs are saved as ``{failures}-history.json`` and
    ``{failures}-n1.log``..."""
    profile = load_profile(name)
    notes: list[str] = []
    label = f"{name}/{transport}"
    with new_cluster(workdir / f"{name}-{transport}", transport) as cc:
        cc.apply(profile)
        skipped = cc.skipped if isinstance(cc, TcpChaosCluster) else ()
        if skipped:
            notes.append(f"not applicable to a TCP byte stream, left out: {', '.join(skipped)}")
        cc.nodes.wait_for_leader(30)
        history = History()
        stop = threading.Event()
        schedule: threading.Thread | None = None
        if profile.schedule:
            notes.append("outage schedule played from the start of the load, healed at its end")
            schedule = threading.Thread(target=cc.run_schedule, args=(profile, stop), daemon=True)
            schedule.start()
        started = time.monotonic()
        load: LoadOutcome = asyncio.run(
            drive_fleet(
                cc.endpoints,
                cc.node_endpoints,
                plan,
                history,
                progress=lambda line: _say(f"   {label}: {line}"),
            )
        )
        load_s = time.monotonic() - started
        stop.set()
        if schedule is not None:
            schedule.join()
        acked_max: dict[str, int] = {}
        for device_id, seq in load.acked:
            acked_max[device_id] = max(acked_max.get(device_id, 0), seq)
        _say(f"   {label}: load done in {load_s:.0f}s; verifying {len(history)} operations")
        try:
            verdict = verify(cc.node_endpoints, acked_max, history, timeout_s=_CONVERGE_TIMEOUT_S)
            need = cc.size
        except TimeoutError:
            lin = check(history)
            problems = [
                f"nodes did not converge within {_CONVERGE_TIMEOUT_S:.0f}s after the load: "
                + _diagnose(cc)
            ]
            problems += [] if lin.ok else [f"history is not linearizable ({lin.verdict.name})"]
            verdict = Verdict(False, tuple(problems), lin, 0, 0)
            need = cc.size // 2 + 1
            notes.append("not converged: lost acked = acked heartbeats missing on a majority")
        lost = _lost(load.acked, [node_table(e) for e in cc.node_endpoints], need)
        if not verdict.ok:
            notes.append(verdict.explain())
            if failures is not None:
                Path(f"{failures}-history.json").write_text(history.to_json())
                for node_id, text in cc.nodes.logs():
                    Path(f"{failures}-{node_id}.log").write_text(text)
                notes.append(f"history and node logs saved as {failures}-*")
    if load.ambiguous:
        notes.append(
            f"{load.ambiguous} acks answered 'duplicate' with a newer seq stored: recorded as "
            "unknown outcome for the linearizability check"
        )
    if load.errors:
        notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(load.errors.items())))
    dev, probes = load.devices, load.probes
    return ProfileResult(
        profile=name,
        transport=transport,
        attempted=dev.attempted,
        acked=len(dev.ms),
        success_rate=dev.success_rate,
        heartbeat_ms=LatencySummary.of(dev.ms),
        commit_attempted=probes.attempted,
        commit_acked=len(probes.ms),
        commit_success_rate=probes.success_rate,
        commit_ms=LatencySummary.of(probes.ms),
        reads_attempted=load.reads,
        read_ms=LatencySummary.of(load.read_ms),
        lost_acked=lost,
        linearizable=None if verdict.lin is None else verdict.lin.ok,
        verifier_ok=verdict.ok,
        problems=verdict.problems,
        load_s=round(load_s, 2),
        skipped_toxics=skipped,
        notes=tuple(notes),
        cdf=cdf_points(dev.ms),
        commit_cdf=cdf_points(probes.ms),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``raftstate chaos bench``'s flags to ``p``."""
    d = FleetPlan()
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="NAME",
        help="a profile of chaos/profiles.toml (repeat for several)",
    )
    p.add_argument("--heartbeats", type=COUNT, default=d.heartbeats, help="to attempt per profile")
    p.add_argument("--devices", type=COUNT, default=d.devices, help="simulated devices")
    p.add_argument(
        "--rate", type=RATE, default=d.rate, help="device heartbeats/s offered in total"
    )
    p.add_argument(
        "--read-rate",
        type=RATE_OR_ZERO,
        default=d.read_rate,
        help="linearizable reads/s offered in total (0: none)",
    )
    p.add_argument(
        "--probe-rate",
        type=RATE_OR_ZERO,
        default=d.probe_rate,
        help="commit-latency probe heartbeats/s sent straight to the leader, no device link "
        "(0: none)",
    )
    p.add_argument(
        "--deadline",
        type=SECONDS,
        default=d.deadline_s,
        help="seconds per device call, retries included",
    )
    p.add_argument(
        "--transport",
        type=parse_transports,
        default=("udp",),
        metavar="udp|tcp|udp,tcp",
        help="node links: our UDP transport (every toxic), pysyncobj's TCP "
        "(latency/bandwidth toxics only), or both side by side with their ratio",
    )
    p.add_argument("--out", default="bench-results", help="directory for JSON/Markdown/PNG")


def bench_main(args: argparse.Namespace) -> int:
    """The ``raftstate chaos bench`` command. Returns the exit status."""
    bad_numbers = (
        args.heartbeats < 1
        or args.devices < 1
        or args.rate <= 0
        or args.deadline <= 0
        or args.probe_rate < 0
        or args.read_rate < 0
    )
    if bad_numbers:
        print(
            "raftstate chaos bench: --heartbeats/--devices/--rate/--deadline must be > 0 "
            "and --probe-rate/--read-rate >= 0",
            file=sys.stderr,
        )
        return 2
    for name in args.profile:
        try:
            load_profile(name)
        except ProfileError as err:
            print(f"raftstate chaos bench: {err}", file=sys.stderr)
            return 2
    plan = FleetPlan(
        heartbeats=args.heartbeats,
        devices=args.devices,
        rate=args.rate,
        read_rate=args.read_rate,
        probe_rate=args.probe_rate,
        deadline_s=args.deadline,
    )
    s = BenchSettings(plan, tuple(args.transport))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    _say(
        f"== {plan.heartbeats} device heartbeats per run at {plan.rate:g}/s from "
        f"{plural(plan.devices, 'device')}, {plan.probe_rate:g}/s commit probes at the leader, "
        f"{plan.read_rate:g} linearizable reads/s, deadline {plan.deadline_s:g}s; "
        f"node transport {' and '.join(s.transports)}; {os.cpu_count()} cpus shared by "
        "nodes, proxy and load"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    results: list[ProfileResult] = []
    with tempfile.TemporaryDirectory(prefix="raftstate-chaos-bench-") as tmp:
        for k, name in enumerate(args.profile):
            order = s.transports if k % 2 == 0 else tuple(reversed(s.transports))
            for transport in order:
                _say(f"== {name}/{transport}: starting cluster")
                r = run_profile(
                    name,
                    transport,
                    plan,
                    Path(tmp),
                    out / f"chaos-bench-{stamp}-{name}-{transport}",
                )
                results.append(r)
                _say(render_table([r]).splitlines()[-1])
                for line in r.notes:
                    _say(f"   {line}")
    ratios = transport_ratios(results)
    print()
    print(render_table(results))
    if ratios:
        print("\nUDP / TCP latency ratio (below 1: UDP faster):")
        print(render_ratios(ratios))
    print()
    for line in target_lines(results):
        print(line)
    plot = plot_cdf(results, out / f"chaos-bench-{stamp}.png")
    print(plot)
    record = {
        "command": shlex.join(["raftstate", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "settings": asdict(s),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "results": [_json_ready(asdict(r)) for r in results],
        "transport_ratios": [_json_ready(asdict(t)) for t in ratios],
        "targets": target_lines(results),
        "plot": plot,
    }
    json_path = out / f"chaos-bench-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2))
    (out / f"chaos-bench-{stamp}.md").write_text(render_markdown(results))
    failed = [r for r in results if r.lost_acked or not r.verifier_ok]
    print(
        f"saved {json_path.resolve()} (+ .md)\n{len(results)} run(s) in "
        f"{time.time() - started:.0f}s, "
        + (f"{len(failed)} FAILED verification" if failed else "0 lost acked, all verified")
    )
    return 1 if failed else 0


def _json_ready(value: object) -> object:
    """NaN (no samples) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
