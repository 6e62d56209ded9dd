"""``raftstate bench --phases watch-latency,watch-fanout``: Watch vs etcd's Watch.

Phases (each system in turn, raftstate first; ``--vs-etcd`` adds a
three-member etcd started the same way as for the other phases):

* **watch-latency**: ``--watchers`` watchers (default 1,000), each on its own
  device's prefix, spread over ``--procs`` watcher processes and over every
  member, while ``--procs`` writer processes send ``--watch-hb-rate`` heartbeats/s
  in total (default 2,000; etcd: ``Put``) to those devices as unary calls to
  the leader, open loop. For every heartbeat acknowledged in the window the
  watcher of its device must deliver its event: the delivery latency is the
  event's receive time minus the acknowledgement's (``ack->event``: from the
  moment the client knew the write committed; negative when the watcher was
  faster than the writer's ack) and minus the send time (``send->event``).
  Acknowledged heartbeats whose event never arrived are counted as
  ``missed`` (must be 0).
* **watch-fanout**: the ``stream`` phase's load (``--devices`` devices behind
  ``--streams`` gateways per process; etcd: the ``gateway`` shape) run
  without watchers, then with ``--fanout-watchers`` watchers (default 50)
  on every bench device, alternating ``--watch-rounds`` times. It reports the
  events/s delivered over all watchers and the commit rate and latency with
  against without watchers (the target: at most 10 % slower).
* **memory**: after the phases, every raftstate node's event-window metrics
  (retained events and their approximate bytes) give the bytes per retained
  event.

Results are printed as a table and saved as JSON under ``--out`` with the
exact command line, like the other phases.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import ssl
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.phases import client_env, etcd_cluster, run_header, run_phase, split_evenly
from bench.stats import LatencySummary, PhaseResult, render_table
from bench.watchload import (
    BUCKET_S,
    WatchResult,
    WatchSpec,
    WriterResult,
    WriterSpec,
    run_watchers,
    run_writer,
)
from raftstate.cli.argtypes import COUNT, Integer

WATCH_PHASE_HELP = {
    "watch-latency": "--watchers watchers on their own device each, --watch-hb-rate heartbeats/s: "
    "event delivery latency (etcd: Watch + Put)",
    "watch-fanout": "--fanout-watchers watchers on every device during the stream load: "
    "events/s delivered, commit rate/latency with vs without watchers",
}
WATCH_PHASES = tuple(WATCH_PHASE_HELP)
#: Seconds the watchers keep listening after the writers' window closes.
DRAIN_S = 5.0


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watchers", type=COUNT, default=1000, help="watch-latency: watchers")
    p.add_argument(
        "--watch-hb-rate", type=float, default=2000.0, help="watch-latency: heartbeats/s in total"
    )
    p.add_argument(
        "--watch-writer",
        choices=["unary", "stream"],
        default="stream",
        help="watch-latency: raftstate heartbeats as unary calls, or pipelined on --streams "
        "HeartbeatStreams per process (default; etcd sends concurrent unary Puts either way)",
    )
    p.add_argument(
        "--fanout-watchers", type=COUNT, default=50, help="watch-fanout: watchers on every device"
    )
    p.add_argument(
        "--watch-rounds",
        type=Integer(1, 20),
        default=1,
        help="watch-fanout: rounds of (without, with) watchers; medians reported",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyRow:
    system: str
    watchers: int
    registered: int
    hb_per_s: float
    events: int
    missed: int
    ack_to_event_ms: LatencySummary
    send_to_event_ms: LatencySummary
    commit_ms: LatencySummary
    errors: int
    error_samples: tuple[str, ...]
    load_cpu_s: float
    server_cpu_s: dict[str, float]
    watch_errors: int = 0
    watch_error_samples: tuple[str, ...] = ()
    #: acknowledged as duplicates (a newer heartbeat of the device overtook them)
    superseded: int = 0
    #: acknowledged after the watchers stopped (overload): not checked
    unverified: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutRow:
    system: str
    round: int
    watchers: int
    registered: int
    events_per_s: float
    commit: PhaseResult
    watcher_cpu_s: float
    watch_errors: int


class _LazyManager:
    """One multiprocessing manager for the run, started on first use."""

    def __init__(self) -> None:
        self._manager: Any = None

    def dict(self) -> Any:
        if self._manager is None:
            self._manager = multiprocessing.get_context("spawn").Manager()
        return self._manager.dict()

    def shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None


_MANAGER = _LazyManager()


def _start_when_ready(board: Any, processes: int, lead_s: float) -> float:
    """Wait (with a deadline) until ``processes`` processes said they are
    ready on ``board``, then post and return the common ``start_at``."""
    from bench.watchload import READY_TIMEOUT_S

    give_up = time.time() + READY_TIMEOUT_S
    while sum(1 for k in board.keys() if str(k).startswith("ready-")) < processes:
        if time.time() > give_up:
            break  # the late ones report themselves as errors
        time.sleep(0.05)
    start_at = time.time() + lead_s
    board["start_at"] = start_at
    return start_at


def _pool_map(fn: Any, specs: list[Any]) -> Any:
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(len(specs))
    return pool, pool.map_async(fn, specs)


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    from bench.phases import _cpu_seconds

    return {k: _cpu_seconds(p) for k, p in pids.items()}


def latency_phase(
    system: str, endpoints: list[str], pids: dict[str, int], args: argparse.Namespace
) -> LatencyRow:
    procs = max(1, args.procs)
    watchers = args.watchers
    listen = args.warmup + args.duration + DRAIN_S
    board = _MANAGER.dict()
    w_specs = []
    first = 0
    for k, n in enumerate(split_evenly(watchers, procs)):
        w_specs.append(
            WatchSpec(system, tuple(endpoints), "own", first, n, listen, board, f"w{k}")
        )
        first += n
    writers = []
    first = 0
    for k, n in enumerate(split_evenly(watchers, procs)):
        writers.append(
            WriterSpec(
                system, tuple(endpoints), first, n, args.watch_hb_rate / procs,
                args.warmup, args.duration, board, f"l{k}",
                streams=args.streams if args.watch_writer == "stream" else 0,
            )
        )
        first += n
    wpool, wpending = _pool_map(run_watchers, w_specs)
    with wpool:
        lpool, lpending = _pool_map(run_writer, writers)
        with lpool:
            start_at = _start_when_ready(board, 2 * procs, 0.5)
            end = start_at + args.warmup + args.duration
            time.sleep(max(0.0, start_at + args.warmup - time.time()))
            cpu0 = _cpu(pids)
            time.sleep(max(0.0, end - time.time()))
            cpu1 = _cpu(pids)
            wres: list[WriterResult] = lpending.get()
        watched: list[WatchResult] = wpending.get()
    received: dict[tuple[str, int], float] = {}
    for w in watched:
        for dev, seq, seen in w.events:
            received.setdefault((dev, seq), seen)
    ack_ms: list[float] = []
    send_ms: list[float] = []
    commit_ms: list[float] = []
    missed = unverified = 0
    listening_until = start_at + listen - 0.5
    for r in wres:
        for dev, seq, sent, acked in r.acks:
            commit_ms.append((acked - sent) * 1000)
            at = received.get((dev, seq))
            if at is None and acked > listening_until:
                unverified += 1  # acknowledged after the watchers stopped listening
                continue
            if at is None:
                missed += 1
                continue
            ack_ms.append((at - acked) * 1000)
            send_ms.append((at - sent) * 1000)
    samples = [s for r in wres for s in r.error_samples]
    samples += [s for w in watched for s in w.error_samples]
    return LatencyRow(
        system=system,
        watchers=watchers,
        registered=sum(w.registered for w in watched),
        hb_per_s=sum(len(r.acks) + r.superseded for r in wres) / args.duration,
        events=len(ack_ms),
        missed=missed,
        ack_to_event_ms=LatencySummary.of(ack_ms),
        send_to_event_ms=LatencySummary.of(send_ms),
        commit_ms=LatencySummary.of(commit_ms),
        errors=sum(r.errors + r.dropped for r in wres) + sum(w.errors for w in watched),
        error_samples=tuple(samples[:5]),
        load_cpu_s=round(sum(r.cpu_s for r in wres) + sum(w.cpu_s for w in watched), 2),
        server_cpu_s={k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        watch_errors=sum(w.errors for w in watched),
        superseded=sum(r.superseded for r in wres),
        unverified=unverified,
        watch_error_samples=tuple(s for w in watched for s in w.error_samples)[:5],
    )


def fanout_phase(
    system: str, endpoints: list[str], pids: dict[str, int], args: argparse.Namespace, rnd: int,
    watchers: int,
) -> FanoutRow:
    procs = max(1, args.procs)
    # The stream load's processes start inside run_phase, after the watchers,
    # on a clock fixed in advance: give them a lead a busy box can meet (a
    # row without any commit is flagged as an error in watch_main).
    lead = 8.0 + 2 * procs
    watched: list[WatchResult] = []
    if watchers:
        board = _MANAGER.dict()
        specs = []
        first = 0
        for k, n in enumerate(split_evenly(watchers, procs)):
            if n:
                listen = lead + args.warmup + args.duration + 0.5
                specs.append(
                    WatchSpec(system, tuple(endpoints), "all", first, n, listen, board, f"w{k}")
                )
            first += n
        wpool, wpending = _pool_map(run_watchers, specs)
        with wpool:
            start_at = _start_when_ready(board, len(specs), 0.0) + lead
            commit = run_phase(system, "stream", endpoints, pids, args, start_at=start_at)
            watched = wpending.get()
    else:
        start_at = time.time() + lead
        commit = run_phase(system, "stream", endpoints, pids, args, start_at=start_at)
    end = start_at + args.warmup + args.duration
    begin = start_at + args.warmup
    lo, hi = int(begin / BUCKET_S), int(end / BUCKET_S)
    delivered = sum(n for w in watched for b, n in w.buckets.items() if lo <= b < hi)
    return FanoutRow(
        system=system,
        round=rnd,
        watchers=watchers,
        registered=sum(w.registered for w in watched),
        events_per_s=delivered / ((hi - lo) * BUCKET_S),
        commit=commit,
        watcher_cpu_s=round(sum(w.cpu_s for w in watched), 2),
        watch_errors=sum(w.errors for w in watched),
    )


def window_memory(metrics_endpoints: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """Per node: the event window's retained events and bytes from ``/metrics``
    (every sample whose name mentions the window), and bytes per event."""
    out = []
    for endpoint in metrics_endpoints:
        text = _scrape(endpoint, env)
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or "window" not in line:
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
        events = next((v for k, v in found.items() if k.endswith("window_events")), 0.0)
        size = next((v for k, v in found.items() if k.endswith("window_bytes")), 0.0)
        out.append(
            {
                "metrics": endpoint,
                "samples": found,
                "events": events,
                "bytes": size,
                "bytes_per_event": round(size / events, 1) if events else None,
            }
        )
    return out


def _scrape(endpoint: str, env: dict[str, str]) -> str:
    if not env.get("RAFTSTATE_CA"):  # an insecure cluster serves plain HTTP
        try:
            with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as r:
                return str(r.read().decode())
        except OSError as err:
            return f"# scrape failed: {err}"
    req = urllib.request.Request(f"https://{endpoint}/metrics")
    if env.get("RAFTSTATE_TOKEN"):
        req.add_header("Authorization", f"Bearer {env['RAFTSTATE_TOKEN']}")
    ctx = ssl.create_default_context(cafile=env.get("RAFTSTATE_CA") or None)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return str(r.read().decode())
    except OSError as err:
        return f"# scrape failed: {err}"


@contextlib.contextmanager
def _raftstate(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[str], dict[str, int], list[str], dict[str, str]]]:
    from cluster.local import LocalCluster
    from raftstate.config import NodeConfig

    base = NodeConfig.default(durability=args.durability)
    if args.security and args.security[0] == "insecure":  # like bench.phases.local_raftstate
        base = dataclasses.replace(base, insecure_grpc=True, auth="off")
    cluster = LocalCluster(workdir / "raftstate", 3, base_config=base)
    try:
        cluster.start()
        pids = {f"raftstate-{n.node_id}": n.pid for n in cluster.nodes.values() if n.pid}
        leader = cluster.wait_for_leader()
        endpoints = [cluster.nodes[leader].endpoint] + [
            n.endpoint for n in cluster.nodes.values() if n.node_id != leader
        ]
        env = cluster.client_env()
        with client_env(env):
            yield endpoints, pids, list(cluster.metrics_endpoints), env
    finally:
        cluster.stop()


def render_latency(rows: list[LatencyRow]) -> str:
    head = (
        f"{'system':<10} {'watchers':>8} {'hb/s':>7} {'events':>7} {'missed':>6} "
        f"{'ack->ev p50':>11} {'p99':>7} {'send->ev p50':>12} {'p99':>7} {'commit p99':>10} "
        f"{'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.system:<10} {r.registered:>4}/{r.watchers:<4}{r.hb_per_s:>7.0f} {r.events:>7} "
            f"{r.missed:>6} {r.ack_to_event_ms.p50:>11.2f} {r.ack_to_event_ms.p99:>7.2f} "
            f"{r.send_to_event_ms.p50:>12.2f} {r.send_to_event_ms.p99:>7.2f} "
            f"{r.commit_ms.p99:>10.2f} {r.errors:>6}"
        )
    return "\n".join(lines)


def render_fanout(rows: list[FanoutRow]) -> str:
    head = (
        f"{'system':<10} {'round':>5} {'watchers':>8} {'events/s':>9} {'commits/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'server cpu':>10} {'watcher cpu':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.system:<10} {r.round:>5} {r.registered:>3}/{r.watchers:<4} "
            f"{r.events_per_s:>9.0f} {r.commit.ops_per_s:>9.0f} "
            f"{r.commit.latency_ms.p50:>7.2f} {r.commit.latency_ms.p99:>7.2f} "
            f"{sum(r.commit.server_cpu_s.values()):>10.1f} {r.watcher_cpu_s:>11.1f}"
        )
    return "\n".join(lines)


def fanout_summary(rows: list[FanoutRow]) -> dict[str, dict[str, float]]:
    """Per system: medians over rounds of commits/s and p99 without and with
    watchers, their ratios, and the median events/s delivered."""
    out: dict[str, dict[str, float]] = {}
    for system in dict.fromkeys(r.system for r in rows):
        off = [r for r in rows if r.system == system and r.watchers == 0]
        on = [r for r in rows if r.system == system and r.watchers > 0]
        if not off or not on:
            continue
        rate_off = statistics.median(r.commit.ops_per_s for r in off)
        rate_on = statistics.median(r.commit.ops_per_s for r in on)
        p99_off = statistics.median(r.commit.latency_ms.p99 for r in off)
        p99_on = statistics.median(r.commit.latency_ms.p99 for r in on)
        out[system] = {
            "commits_per_s_without": round(rate_off, 1),
            "commits_per_s_with": round(rate_on, 1),
            "commit_rate_ratio_with_vs_without": round(rate_on / rate_off, 3) if rate_off else 0,
            "commit_p99_ms_without": round(p99_off, 2),
            "commit_p99_ms_with": round(p99_on, 2),
            "events_per_s_delivered": round(statistics.median(r.events_per_s for r in on), 1),
        }
    return out


def watch_main(args: argparse.Namespace) -> int:
    """Run the chosen watch phases on raftstate (and etcd with --vs-etcd);
    print the tables, save the JSON; exit 1 if anything failed or was missed."""
    phases = [p for p in args.phases if p in WATCH_PHASES]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    notes = [
        f"raftstate durability: {args.durability} (3 nodes, "
        f"{(args.security or ('secure',))[0]}: TLS + token unless insecure)"
        + (", etcd: 3 members, plaintext" if args.vs_etcd else ""),
        f"phases: {','.join(phases)}; {args.procs} watcher + {args.procs} load processes; "
        f"{args.duration:g}s measured after {args.warmup:g}s warm-up; "
        f"machine: {os.cpu_count()} cpus",
    ]
    if "watch-latency" in phases:
        notes.append(
            f"watch-latency: {args.watchers} watchers (one device prefix each, spread over all "
            f"members), {args.watch_hb_rate:g} heartbeats/s open loop ("
            + (f"raftstate: {args.streams} HeartbeatStreams per process over all members"
               if args.watch_writer == "stream" else "raftstate: unary to the leader")
            + "; etcd: concurrent unary Puts to the leader)"
        )
    if "watch-fanout" in phases:
        notes.append(
            f"watch-fanout: stream load of {args.devices} devices ({args.streams} gateways per "
            f"process) without / with {args.fanout_watchers} watchers on every device, "
            f"{args.watch_rounds} round(s)"
        )
    for line in notes:
        print(f"== {line}", flush=True)
    lat_rows: list[LatencyRow] = []
    fan_rows: list[FanoutRow] = []
    memory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="raftstate-watchbench-") as tmp:
        workdir = Path(tmp)
        systems = ["raftstate"] + (["etcd"] if args.vs_etcd else [])
        for system in systems:
            print(f"== {system}: starting", flush=True)
            cm: Any = _raftstate(args, workdir) if system == "raftstate" else _etcd(args, workdir)
            with cm as (endpoints, pids, metrics, env):
                if "watch-latency" in phases:
                    print(f"== {system}: watch-latency ...", flush=True)
                    row = latency_phase(system, endpoints, pids, args)
                    lat_rows.append(row)
                    print(render_latency([row]).splitlines()[-1], flush=True)
                    for sample in row.error_samples + row.watch_error_samples:
                        print(f"   error sample: {sample}", flush=True)
                if "watch-fanout" in phases:
                    for rnd in range(args.watch_rounds):
                        for n in (0, args.fanout_watchers):
                            print(f"== {system}: watch-fanout round {rnd} watchers={n} ...",
                                  flush=True)
                            frow = fanout_phase(system, endpoints, pids, args, rnd, n)
                            fan_rows.append(frow)
                            print(render_fanout([frow]).splitlines()[-1], flush=True)
                if system == "raftstate" and metrics:
                    memory = window_memory(metrics, env)
    print()
    for line in notes:
        print(line)
    if lat_rows:
        print(render_latency(lat_rows))
        print("(latencies in ms; ack->ev = event received minus the writer's ack of the "
              "heartbeat; missed = acknowledged heartbeats whose event never arrived; heartbeats "
              "overtaken by a newer one of the same device (no event), and those acknowledged "
              "after the watchers stopped listening, are not counted)")
    summary = fanout_summary(fan_rows)
    if fan_rows:
        print(render_fanout(fan_rows))
        print(render_table([r.commit for r in fan_rows]))
        for system, s in summary.items():
            print(f"{system}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    for m in memory:
        print(
            f"event window {m['metrics']}: {m['events']:.0f} events, {m['bytes']:.0f} bytes, "
            f"{m['bytes_per_event']} bytes/event"
        )
    _MANAGER.shutdown()
    elapsed = time.time() - started
    record = {
        **run_header(started, elapsed, notes),
        "args": {k: v for k, v in vars(args).items() if k != "fn"},
        "phases": phases,
        "watch_latency": [dataclasses.asdict(r) for r in lat_rows],
        "watch_fanout": [dataclasses.asdict(r) for r in fan_rows],
        "fanout_summary": summary,
        "window_memory": memory,
    }
    path = out_dir / f"bench-watch-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    bad = sum(r.errors + r.missed for r in lat_rows) + sum(
        r.commit.errors + r.watch_errors + (r.commit.ops_per_s == 0) for r in fan_rows
    )
    if any(r.commit.ops_per_s == 0 for r in fan_rows):
        print("error: a fan-out row has no commits: its load processes started after their "
              "window (the box is too busy); rerun")
    print(f"saved {path.resolve()}\n{elapsed:.0f}s, " + (f"{bad} error(s)" if bad else "no errors"))
    return 0 if bad == 0 else 1


@contextlib.contextmanager
def _etcd(
    args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[list[str], dict[str, int], list[str], dict[str, str]]]:
    with etcd_cluster(args, workdir) as (endpoints, pids):
        yield endpoints, pids, [], {}
