"""``raftstate bench --transport``: the two Raft transports side by side on loopback.

For each transport named with ``--transport`` (``udp``, ``tcp`` or both) the
benchmark starts one clean 3-node :class:`~cluster.local.LocalCluster`, all
of them before the first phase, and runs ``--rounds`` rounds. A round runs
every chosen phase on every transport back to back, the transports' order
alternating from round to round, so drift and noise on a busy machine fall
on both alike. The summary is each metric's median over the rounds per
transport and the UDP/TCP ratio of the medians.

Phases (in ``--phases``; without it: hb-open, write, stream, transport-cost):

* ``hb-open``: a fixed rate of heartbeats at the leader; node CPU per
  committed heartbeat, leader / followers (:mod:`bench.hbopen`).
* ``write``, ``stream`` (or any other phase of ``raftstate bench``): run
  unchanged by :func:`bench.phases.run_phase` against each cluster.
* ``transport-cost``: :func:`bench.transportcost.measure`, in this
  process, per transport.

Idle clusters keep running while another is measured; their CPU falls in
``other cpu``, as everything else the machine did does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.hbopen import ClusterTarget, cluster_target, run_hb_open
from bench.stats import PhaseResult, render_table
from bench.transportreport import (
    COMPARISON_DEFAULT_PHASES,
    COMPARISON_PHASES,
    CPU_METRIC,
    CPU_RATIO_TARGET,
    HbCpuResult,
    clean_note,
    cpu_ratio_line,
    per_round_ratios,
    render_hb_runs,
    render_summary,
    summarize,
)
from raftstate.cli.argtypes import Real
from raftstate.cli.words import plural
from raftstate.config import TRANSPORTS

if TYPE_CHECKING:
    from bench.transportcost import TransportCost


def add_transport_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--transport`` options of ``raftstate bench``."""
    g = p.add_argument_group(
        "transport comparison",
        "--transport runs the phases on one clean cluster per transport, interleaved in rounds, "
        f"and adds the phases {', '.join(COMPARISON_PHASES)}",
    )
    g.add_argument(
        "--transport",
        action="append",
        type=_transports,
        metavar="udp|tcp",
        help="Raft transport(s) to compare: repeat or comma-separate (udp,tcp)",
    )
    g.add_argument(
        "--rounds", type=_positive_int, default=3, help="rounds over all phases and transports"
    )
    g.add_argument(
        "--hb-rate",
        type=_positive_float,
        default=800.0,
        help="hb-open: heartbeats per second offered, over all load processes",
    )
    g.add_argument(
        "--cost-iterations",
        type=_positive_int,
        default=10_000,
        help="transport-cost: AppendEntries exchanges measured per run",
    )
    g.add_argument(
        "--cost-gap-ms",
        type=Real(0.0, 1e6, unit="ms"),
        default=5.0,
        help="transport-cost: virtual ms between AppendEntries (5 = 200/s per follower)",
    )


def _transports(text: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in chosen if t not in TRANSPORTS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown transport(s) {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(TRANSPORTS)}"
        )
    return chosen


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def comparing(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for the transport comparison."""
    return bool(args.transport) or any(p in COMPARISON_PHASES for p in args.phases or ())


def chosen_transports(args: argparse.Namespace) -> tuple[str, ...]:
    """The transports in the order given, each once; the node config's
    default transport when only a comparison phase asked for this mode."""
    from raftstate.config import NodeConfig

    given = [t for group in args.transport or () for t in group]
    return tuple(dict.fromkeys(given)) or (NodeConfig.default().transport,)


def describe(args: argparse.Namespace, transports: tuple[str, ...]) -> list[str]:
    """The setup lines printed first and saved in the JSON."""
    lines = [
        f"transports: {', '.join(transports)}; one clean 3-node cluster each on loopback, "
        f"durability {args.durability}, all started before the first phase (idle ones keep "
        "running: their CPU counts as 'other cpu')",
        f"rounds: {args.rounds}; each round runs every phase on every transport back to back, "
        "the order alternating per round; summary = median over rounds, ratio = udp/tcp",
        f"phases: {','.join(args.phases)}",
    ]
    if "hb-open" in args.phases:
        lines.append(
            f"hb-open: {args.hb_rate:g} heartbeats/s evenly spaced, unary at the leader from "
            f"{plural(args.procs, 'process', 'processes')} over {plural(args.devices, 'device')} "
            "(at most that many in flight); "
            "cpu per committed heartbeat = all node processes' CPU in the window "
            "(/proc/<pid>/task/*/schedstat) / heartbeats the leader committed in it (revision)"
        )
    if "transport-cost" in args.phases:
        lines.append(
            f"transport-cost: {args.cost_iterations} AppendEntries(4-heartbeat batch) + reply "
            f"exchanges per run, {args.cost_gap_ms:g} ms apart (virtual clock), in this process; "
            "codec path only, no Raft, sockets or thread hand-offs (see bench/transportcost.py)"
        )
    lines.append(
        f"load: {plural(args.procs, 'process', 'processes')}, {args.duration:g}s measured after "
        f"{args.warmup:g}s "
        f"warm-up; machine: {os.cpu_count()} cpus"
    )
    return lines


def compare_main(args: argparse.Namespace) -> int:
    """Run the comparison, print the tables, save the JSON. Returns the
    exit status: 0, 1 if any load phase had errors, 2 for bad options."""
    from bench.phases import run_header, run_phase
    from bench.transportcost import measure, render_costs

    if args.endpoints or args.vs_etcd:
        print(
            "raftstate bench: --transport starts its own clusters; drop --endpoints and --vs-etcd",
            file=sys.stderr,
        )
        return 2
    transports = chosen_transports(args)
    args.phases = args.phases or COMPARISON_DEFAULT_PHASES
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    notes = describe(args, transports)
    for line in notes:
        print(f"== {line}", flush=True)
    rows: list[PhaseResult] = []
    hb: list[HbCpuResult] = []
    costs: list[tuple[int, TransportCost]] = []
    with (
        tempfile.TemporaryDirectory(prefix="raftstate-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        targets: dict[str, ClusterTarget] = {}
        for t in transports:
            print(f"== {t}: starting a 3-node cluster", flush=True)
            targets[t] = stack.enter_context(cluster_target(t, args, Path(tmp)))
        for k in range(1, args.rounds + 1):
            order = transports if k % 2 else transports[::-1]
            for phase in args.phases:
                for t in order:
                    print(f"== round {k}/{args.rounds} {t}: {phase} ...", flush=True)
                    if phase == "transport-cost":
                        cost = measure(
                            t, iterations=args.cost_iterations, gap_s=args.cost_gap_ms / 1000
                        )
                        costs.append((k, cost))
                        print(render_costs([cost]).splitlines()[-1], flush=True)
                        continue
                    if phase == "hb-open":
                        row, one = run_hb_open(targets[t], args, k)
                        hb.append(one)
                    else:
                        target = targets[t]
                        target.leader = target.cluster.wait_for_leader()
                        from bench.phases import client_env

                        with client_env(target.env):  # this cluster's CA and token
                            row = run_phase(
                                "raftstate", phase, target.endpoints(), target.pids(), args
                            )
                        row = replace(row, system=t, phase=f"{row.phase} #{k}")
                    rows.append(row)
                    print(render_table([row]).splitlines()[-1], flush=True)
                    for s in row.error_samples:
                        print(f"   error sample: {s}", flush=True)
    closed = [r for r in rows if not r.phase.startswith("hb-open")]
    summary = summarize(hb, closed, [c for _, c in costs], transports)
    ratio_line = cpu_ratio_line(summary)
    by_round = per_round_ratios(hb)
    print()
    for line in notes:
        print(line)
    if rows:
        print(render_table(rows))
    if hb:
        print(render_hb_runs(hb))
    if costs:
        print(render_costs([c for _, c in costs]))
    print(render_summary(summary, transports))
    if hb and (note := clean_note(hb, transports)):
        print(note)
    if ratio_line:
        print(ratio_line)
        marks = " ".join(f"{r.ratio:.2f}x" + ("" if r.clean else "*") for r in by_round)
        unclean = any(not r.clean for r in by_round)
        print(
            f"per round: {marks}" + ("  (*: a run of the round was not clean)" if unclean else "")
        )
    if any(h.leader_changed for h in hb):
        print("note: the leader changed during an hb-open window; its leader/follower split is off")
    noisy = [r for r in rows if r.other_cpu_s > 0.15 * args.duration]
    if noisy:
        print(
            f"note: other processes used CPU during {len(noisy)} phase(s) (see 'other cpu s'); "
            "the medians over rounds damp it, more --rounds damp it more"
        )
    elapsed = time.time() - started
    cpu_row = next((r for r in summary if r.name == CPU_METRIC), None)
    record: dict[str, Any] = {
        **run_header(started, elapsed, notes),
        "git": _git_state(),
        "args": {k: v for k, v in vars(args).items() if k != "fn"},
        "phases": list(args.phases),
        "transports": list(transports),
        "rounds": args.rounds,
        "results": [asdict(r) for r in rows],
        "hb_cpu": [
            {**asdict(h), "committed_per_s": round(h.committed_per_s, 1), "clean": h.clean}
            for h in hb
        ],
        "hb_clean_note": clean_note(hb, transports) if hb else None,
        "transport_cost": [{**asdict(c), "round": k} for k, c in costs],
        "summary": [asdict(r) for r in summary],
        "ratios": {r.name: r.ratio for r in summary if r.ratio is not None},
        "cpu_per_committed_hb_ratio": cpu_row.ratio if cpu_row else None,
        "cpu_per_committed_hb_ratio_per_round": [asdict(r) for r in by_round],
        "cpu_ratio_target": CPU_RATIO_TARGET,
        "verdict": ratio_line,
    }
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(_json_safe(record), indent=2, allow_nan=False))
    errors = sum(r.errors for r in rows)
    print(
        f"saved {path.resolve()}\n{len(rows) + len(costs)} run(s) on {len(transports)} "
        f"transport(s) in {elapsed:.0f}s, " + (f"{errors} error(s)" if errors else "no errors")
    )
    return 0 if errors == 0 else 1


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _git_state() -> dict[str, Any]:
    """The commit and the uncommitted files of the tree that was measured
    (read-only git commands); empty outside a git checkout."""
    root = Path(__file__).resolve().parents[2]

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = [line.split(None, 1)[-1] for line in git("status", "--porcelain").splitlines()]
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": commit, "uncommitted": dirty} if commit else {}


__all__ = [
    "add_transport_arguments",
    "chosen_transports",
    "compare_main",
    "comparing",
    "describe",
]
