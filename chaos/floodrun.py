"""``raftstate chaos flood``: the [integrity] scenario, end to end.

1. Start a three-node cluster on loopback (test timers, UDP or TCP).
2. Flood it: pipelined streams of new devices with ``reported`` maps up to
   the 8 KiB limit (:mod:`chaos.flood`), into the leader and into a
   follower at once.
3. kill -9 the leader once the flood is going (``kill_after_entries``
   entries committed); the streams carry on against the survivors.
4. When the flood has ended, time one more heartbeat: the cluster must
   commit within 2 s of the load stopping.
5. Restart every node (a clean stop, then a start of all three), wait until
   all have applied the leader's commit index, and check that every
   acknowledged heartbeat is on every node and no node logged a tick
   failure, a truncation of applied entries or an unpickling error.

The CI-sized run is ``tests/test_flood.py``; the full one (20,000 devices)
is the command below, which prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chaos.flood import FloodResult, flood
from chaos.verify import node_table
from cluster.local import LocalCluster
from raftstate.cli.argtypes import COUNT
from raftstate.cli.words import plural
from raftstate.config import NodeConfig
from raftstate.sdk import DeviceClient

#: Log lines that mean a node's Raft tick failed or its state diverged.
BAD_LINES = ("Traceback", "truncating already-applied", "pickle", "CRITICAL", "tick failed")


@dataclass
class FloodReport:
    transport: str
    devices: int
    acked: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    megabytes_acked: float = 0.0
    flood_s: float = 0.0
    heartbeats_per_s: float = 0.0
    killed: str = ""
    commit_after_load_s: float = 0.0
    missing_after_restart: dict[str, int] = field(default_factory=dict)
    bad_log_lines: list[str] = field(default_factory=list)
    term_before: int = 0
    term_after: int = 0
    #: Why the run stopped early (a timeout), if it did.
    failure: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.failure
            and self.errors == 0
            and self.acked > 0
            and self.commit_after_load_s < 2.0
            and not any(self.missing_after_restart.values())
            and not self.bad_log_lines
        )


def bad_lines(cluster: LocalCluster) -> list[str]:
    """Log lines of any node that show a failed tick or diverged state."""
    out = []
    for node_id, text in cluster.logs():
        out += [f"{node_id}: {line[:200]}" for line in text.splitlines()
                if any(b in line for b in BAD_LINES)]
    return out


def run_flood(
    base_dir: Path,
    *,
    devices: int,
    transport: str = "udp",
    streams_per_target: int = 4,
    window: int = 32,
    kill_after_entries: int = 25,
) -> FloodReport:
    """Run the scenario in the module docstring in ``base_dir``. A step that
    makes no progress in time ends the run with ``failure`` set."""
    report = FloodReport(transport=transport, devices=devices)
    base = NodeConfig.for_tests(transport=transport)
    with LocalCluster(base_dir, 3, base_config=base) as cluster:
        try:
            _run(cluster, report, devices, streams_per_target, window, kill_after_entries)
        except TimeoutError as exc:
            report.failure = str(exc)
        report.bad_log_lines = bad_lines(cluster)[:20]
    return report


def _run(
    cluster: LocalCluster,
    report: FloodReport,
    devices: int,
    streams_per_target: int,
    window: int,
    kill_after_entries: int,
) -> None:
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    first = cluster.status(leader)
    report.term_before = first.term if first is not None else 0
    targets = [cluster.nodes[leader].endpoint, cluster.nodes[follower].endpoint]
    out: list[FloodResult] = []
    runner = threading.Thread(target=lambda: out.append(asyncio.run(flood(
        targets, cluster.endpoints, devices=devices,
        streams_per_target=streams_per_target, window=window,
    ))))  # fmt: skip
    runner.start()
    start_index = first.commit_index if first is not None else 0
    deadline = time.monotonic() + 120
    while True:
        st = cluster.status(leader)
        if st is not None and st.commit_index >= start_index + kill_after_entries:
            break
        if time.monotonic() > deadline or not runner.is_alive():
            raise TimeoutError("the flood never got going")
        time.sleep(0.05)
    cluster.kill_node(leader)
    report.killed = leader
    runner.join(max(600.0, devices / 5))
    if runner.is_alive():
        raise TimeoutError("the flood did not finish")
    res = out[0]
    report.acked = len(res.acked)
    report.errors = len(res.errors)
    report.error_samples = res.errors[:5]
    report.megabytes_acked = round(res.bytes_acked / 1e6, 2)
    report.flood_s = round(res.seconds, 2)
    report.heartbeats_per_s = round(len(res.acked) / res.seconds, 1) if res.seconds else 0.0
    cluster.start_node(leader)
    t0 = time.monotonic()
    with DeviceClient(cluster.endpoints, deadline_s=10) as client:
        client.heartbeat("after-flood", {"k": "v"})
    report.commit_after_load_s = round(time.monotonic() - t0, 3)
    for node_id in cluster.nodes:
        cluster.stop_node(node_id)
    for node_id in cluster.nodes:
        cluster.start_node(node_id)
    new_leader = cluster.wait_for_leader(60)
    st = cluster.status(new_leader)
    assert st is not None
    for node_id in cluster.nodes:
        cluster.wait_applied(node_id, st.commit_index, 60)
    report.term_after = st.term
    for node_id, node in cluster.nodes.items():
        seen = node_table(node.endpoint, "fl-")
        report.missing_after_restart[node_id] = sum(
            1 for d, s in res.acked.items() if seen.get(d, (0,))[0] < s
        )


def render(reports: list[FloodReport]) -> str:
    cols = ("transport", "devices", "acked", "errors", "MB", "flood s", "hb/s",
            "commit after load", "missing", "bad log lines", "verdict")
    rows = [cols]
    for r in reports:
        rows.append((
            r.transport, str(r.devices), str(r.acked), str(r.errors), f"{r.megabytes_acked:.1f}",
            f"{r.flood_s:.1f}", f"{r.heartbeats_per_s:.0f}", f"{r.commit_after_load_s:.2f} s",
            str(sum(r.missing_after_restart.values())), str(len(r.bad_log_lines)),
            "OK" if r.ok else "FAILED",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=COUNT, default=20_000,
                   help="new devices to send, each with a map of up to 8 KiB (default 20000)")
    p.add_argument("--transport", default="udp", help="udp, tcp or udp,tcp (default udp)")
    p.add_argument("--streams", type=COUNT, default=4, help="streams per target node (default 4)")
    p.add_argument("--window", type=COUNT, default=32, help="in-flight heartbeats per stream")
    p.add_argument("--dir", default="", help="where the clusters live (default: a temp dir)")
    p.add_argument("--json", default="flood.json", help="where to save the results")


def main(args: argparse.Namespace) -> int:
    import tempfile

    from bench.phases import run_header

    started = time.time()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="raftstate-flood-"))
    reports = []
    for transport in [t.strip() for t in args.transport.split(",") if t.strip()]:
        print(f"flood: {plural(args.devices, 'device')} over {transport} ...", flush=True)
        reports.append(run_flood(base / transport, devices=args.devices, transport=transport,
                                 streams_per_target=args.streams, window=args.window))
        print(render(reports[-1:]), flush=True)
    print()
    print(render(reports))
    for r in reports:
        for line in ([r.failure] if r.failure else []) + r.error_samples + r.bad_log_lines[:5]:
            print(f"  {r.transport}: {line}")
    record = {**run_header(started, time.time() - started, []),
              "results": [asdict(r) | {"ok": r.ok} for r in reports]}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.json}; {sum(r.ok for r in reports)} of {plural(len(reports), 'run')} OK")
    return 0 if all(r.ok for r in reports) else 1


__all__ = ["FloodReport", "add_arguments", "main", "run_flood"]
