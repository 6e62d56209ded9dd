"""``raftstate bench``: heartbeat and read throughput and latency, side by side with etcd.

For each system (raftstate, and with ``--vs-etcd`` a three-member etcd that
the benchmark starts itself) it runs the phases chosen with ``--phases``, in
the order of :data:`PHASES` (see :data:`PHASE_HELP`):

* **sequential**: one client, one device, one request at a time: the
  latency floor;
* **write** (unary): ``--devices`` simulated devices in ``--procs`` load
  processes, each sending its next heartbeat (etcd: Put) as a unary call to
  the leader as soon as the last is acknowledged;
* **stream** (gateways): the same devices behind ``--streams`` gateways per
  load process, spread over all endpoints. A raftstate gateway pipelines its
  devices' heartbeats on one ``HeartbeatStream``; etcd has no streaming put,
  so an etcd gateway pipelines its devices' concurrent unary Puts over one
  channel of its own (shown as phase ``gateway``);
* **read-{lin,ser}-{leader,follower}**: closed-loop reads, linearizable
  (raftstate: ReadIndex; etcd: linearizable Range) or serializable (the
  node's local state), by ``--devices`` readers of pre-written devices. The
  follower phases pin each load process's client to one follower
  (raftstate: ``prefer_leader=False``; etcd: a channel to that member),
  load processes dealt out over the followers;
* **mixed**: closed loop, unary, at the leader; each device alternates a
  heartbeat and a linearizable read of itself;
* **read-{lin,ser}-open**: open loop at the leader: ``--read-rate`` reads
  per second in total, sent on schedule whatever the answers do, at most
  ``--devices`` in flight (an arrival over the bound is an error). This is
  the comparison for "linearizable read p99 within 2x of serializable at
  the same offered load".

Every phase but sequential measures ``--duration`` seconds after
``--warmup``. Both systems are driven by the same load code over Python
grpc.aio, so the ratios compare the servers, not the clients. CPU is measured
per process inside the measurement window (servers from /proc, load
processes from getrusage); ``other cpu`` is what the rest of the machine used
meanwhile (from /proc/stat), so a noisy box shows. etcd fsyncs like raftstate
does (``--etcd-durability match``): with raftstate's default
``process-crash`` durability etcd runs with ``--unsafe-no-fsync``. Results
are printed as a table and saved as JSON under ``--out``, with the exact
command line.

``--transport udp,tcp`` (or a phase ``hb-open``/``transport-cost``) instead
compares the Raft transports, one cluster per transport, interleaved in
rounds: see :mod:`bench.transports`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.phases import (
    DEFAULT_PHASES,
    PHASE_HELP,
    PHASE_SHAPES,
    PHASES,
    etcd_cluster,
    etcd_fsyncs,
    phase_label,
    raftstate_cluster,
    run_header,
    run_phase,
)
from bench.stats import (
    PhaseResult,
    ratios,
    render_details,
    render_table,
    target_verdicts,
)
from bench.transportreport import COMPARISON_PHASE_HELP, COMPARISON_PHASES
from bench.transports import add_transport_arguments, compare_main, comparing
from bench.watchbench import WATCH_PHASE_HELP, WATCH_PHASES, add_watch_arguments
from raftstate.cli.argtypes import COUNT, SECONDS, SECONDS_OR_ZERO, Integer
from raftstate.cli.words import plural


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = "Benchmark heartbeats and reads on a 3-node cluster, optionally against etcd."
    p.epilog = "phases (run in this order):\n" + "\n".join(
        f"  {name:<18} {text}" + (" [default]" if name in DEFAULT_PHASES else "")
        for name, text in {**PHASE_HELP, **COMPARISON_PHASE_HELP, **WATCH_PHASE_HELP}.items()
    )
    p.add_argument("--endpoints", help="benchmark a running cluster instead of starting one")
    p.add_argument(
        "--devices",
        type=COUNT,
        default=256,
        help="concurrent simulated devices (open-loop phases: the bound on reads in flight)",
    )
    p.add_argument("--procs", type=Integer(1, 256), default=2, help="load-generator processes")
    p.add_argument("--duration", type=SECONDS, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=SECONDS_OR_ZERO, default=2.0, help="unmeasured seconds first")
    p.add_argument(
        "--sequential",
        type=COUNT,
        default=1000,
        help="requests in the single-client sequential phase",
    )
    p.add_argument(
        "--durability",
        choices=["process-crash", "fsync"],
        default="process-crash",
        help="the nodes' durability policy (default process-crash)",
    )
    p.add_argument(
        "--streams",
        type=COUNT,
        default=4,
        help="gateways (HeartbeatStreams) per load process in the stream phase",
    )
    p.add_argument(
        "--read-rate",
        type=_positive_rate,
        default=1000.0,
        help="open-loop phases: reads per second offered, over all load processes",
    )
    p.add_argument(
        "--arrivals",
        choices=["poisson", "fixed"],
        default="poisson",
        help="open-loop phases: Poisson arrivals or a fixed interval",
    )
    p.add_argument(
        "--phases",
        type=_phases,
        default=None,
        help=f"comma-separated, from: {','.join(PHASES + COMPARISON_PHASES + WATCH_PHASES)} "
        f"(default: {','.join(DEFAULT_PHASES)}; with --transport: hb-open,write,stream,"
        "transport-cost)",
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
    p.add_argument(
        "--security",
        type=_securities,
        default=("secure",),
        help="secure (TLS + token auth, the default), insecure (plaintext, no auth), or "
        "secure,insecure: both side by side in --rounds alternating rounds (medians reported)",
    )
    add_transport_arguments(p)
    add_watch_arguments(p)
    from bench.fleet import add_fleet_arguments

    add_fleet_arguments(p)


def _securities(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not chosen or any(c not in ("secure", "insecure") for c in chosen):
        raise argparse.ArgumentTypeError("--security: secure, insecure or secure,insecure")
    return chosen


def _phases(text: str) -> tuple[str, ...]:
    known = PHASES + COMPARISON_PHASES + WATCH_PHASES
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
        )
    return tuple(p for p in known if p in chosen)


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (rate > 0 and math.isfinite(rate)):
        raise argparse.ArgumentTypeError(f"expected reads per second above 0, got {text!r}")
    return rate


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
    lines.append(f"phases: {','.join(args.phases)}")
    if "stream" in args.phases:
        gateways = max(1, args.procs) * args.streams
        lines.append(
            f"stream phase: {plural(args.devices, 'device')} behind {plural(gateways, 'gateway')} "
            f"({args.streams} per load process) spread over all endpoints; raftstate gateways "
            "pipeline on one HeartbeatStream each, etcd gateways ('gateway') pipeline concurrent "
            "unary Puts on one channel each (etcd has no streaming put)"
        )
    if any(p.startswith("read-") or p == "mixed" for p in args.phases):
        lines.append(
            f"read phases: {args.devices} readers of devices written once before the window; "
            "'lin' = raftstate ReadIndex / etcd linearizable Range, 'ser' = the node's local "
            "state; follower phases pin each load process to one follower (dealt out over "
            "both); mixed alternates heartbeat and linearizable read per device"
        )
    if any(PHASE_SHAPES[p].mode == "open" for p in args.phases):
        lines.append(
            f"open-loop reads: {args.read_rate:g}/s offered in total ({args.arrivals} arrivals) "
            f"at the leader, at most {args.devices} in flight (arrivals over that are errors); "
            "latency from the actual send"
        )
    lines.append(
        f"load: {plural(args.procs, 'process', 'processes')}, {args.duration:g}s measured after "
        f"{args.warmup:g}s warm-up; machine: {os.cpu_count()} cpus"
    )
    return lines


def bench_main(args: argparse.Namespace) -> int:
    if getattr(args, "fleet", False):
        from bench.fleet import fleet_main

        return fleet_main(args)
    if comparing(args):
        return compare_main(args)
    if args.phases and any(p in WATCH_PHASES for p in args.phases):
        if any(p not in WATCH_PHASES for p in args.phases):
            print("raftstate bench: run the watch phases on their own (--phases "
                  + ",".join(WATCH_PHASES) + ")")
            return 2
        from bench.watchbench import watch_main

        return watch_main(args)
    if len(getattr(args, "security", ())) > 1:
        from bench.security import security_main

        return security_main(args)
    args.phases = args.phases or DEFAULT_PHASES
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PhaseResult] = []
    started = time.time()
    notes = _describe(args)
    for line in notes:
        print(f"== {line}", flush=True)
    with tempfile.TemporaryDirectory(prefix="raftstate-bench-") as tmp:
        workdir = Path(tmp)
        systems: list[tuple[str, Any]] = [("raftstate", raftstate_cluster(args, workdir))]
        if args.vs_etcd:
            systems.append(("etcd", etcd_cluster(args, workdir)))
        for system, cm in systems:
            print(f"== {system}: starting", flush=True)
            with cm as (endpoints, pids):
                for phase in args.phases:
                    label = phase_label(system, phase, args)
                    print(f"== {system}: {label} ...", flush=True)
                    r = run_phase(system, phase, endpoints, pids, args)
                    results.append(r)
                    print(render_table([r]).splitlines()[-1], flush=True)
                    for s in r.error_samples:
                        print(f"   error sample: {s}", flush=True)
    table = render_table(results)
    summary = ratios(results)
    print()
    for line in notes:
        print(line)
    print(table)
    for line in render_details(results):
        print(line)
    for k, v in summary.items():
        print(f"{k}: {v}" + ("" if "_ms_" in k else "x"))
    for line in target_verdicts(results):
        print(line)
    noisy = [r for r in results if r.other_cpu_s > 0.1 * args.duration]
    if noisy:
        print(
            f"note: other processes used CPU during {len(noisy)} phase(s) (see 'other cpu s'); "
            "the box was noisy, so rerun for stable numbers"
        )
    elapsed = time.time() - started
    record = {
        **run_header(started, elapsed, notes),
        "args": {k: v for k, v in vars(args).items() if k != "fn"},
        "phases": list(args.phases),
        "results": [asdict(r) for r in results],
        "ratios": summary,
    }
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(record, indent=2))
    errors = sum(r.errors for r in results)
    print(
        f"saved {path.resolve()}\n{len(results)} phase(s) in {elapsed:.0f}s, "
        + (f"{errors} error(s)" if errors else "no errors")
    )
    return 0 if errors == 0 else 1
