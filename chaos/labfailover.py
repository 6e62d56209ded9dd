"""``python -m chaos.labfailover``: failover after a leader kill, in the WAN lab.

Issue 15's target: failover after a leader kill <= 1 s on ``lan`` and <= 3
RTTs plus the detection time on ``weak``. This measures it for raftstate over
UDP/ICE, one node per site (:class:`cluster.labcluster.LabCluster`), A/B:

* ``adaptive``: the timers derived from the links (raftstate/linktiming.py);
* ``fixed``: the configured timers (``RAFTSTATE_ADAPTIVE_TIMING=false`` in
  the nodes' environment: heartbeat 50 ms, election timeout 600-1200 ms,
  check-quorum 800 ms), i.e. main before this change.

Theory of operation. One lab; per profile, rounds alternate the arms (A, B,
A, B, ...: the box is shared and noisy). Each round restarts every node with
the arm's environment, waits for a leader and, for ``adaptive``, for every
node's timers to be derived and steady, lets heartbeats flow for a few
seconds, then SIGKILLs the leader and measures, from the kill:

* ``elected``: until both survivors name the same new leader, which says it
  leads (``ClusterService.Status`` polled every ~20 ms);
* ``committed``: until a heartbeat sent through a survivor is acknowledged
  (written after the kill: the cluster serves writes again);
* ``term+``: how far the term rose (1 = one election, no split vote).

Detection is the survivors' election timeout (shown, from Status, as it was
before the kill); the rest of ``elected`` is the pre-vote and vote round
trips. Prints a table, saves JSON (``--out``). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARMS = ("adaptive", "fixed")
_ENV = "RAFTSTATE_ADAPTIVE_TIMING"


@dataclass
class Kill:
    """One leader kill."""

    profile: str
    arm: str
    round: int
    leader: str
    elected_s: float | None
    committed_s: float | None
    term_increase: int
    #: Survivors' election timeout range before the kill, ms, and where it came from.
    election_timeout_ms: list[list[float]]
    timing_source: list[str]


def _statuses(lc: Any, ids: Sequence[str]) -> dict[str, Any]:
    assert lc.cluster is not None
    return {n: lc.cluster.status(n, timeout_s=0.5) for n in ids}


def _settled(lc: Any, arm: str) -> bool:
    """Every node answers; with ``adaptive``, every node's timers come from the links."""
    sts = _statuses(lc, list(lc.cluster.nodes))
    if any(s is None for s in sts.values()):
        return False
    return arm == "fixed" or all(s.timing_source.startswith("links:") for s in sts.values())


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def _restart_all(lc: Any, arm: str) -> None:
    cluster = lc.cluster
    if arm == "fixed":
        os.environ[_ENV] = "false"
    else:
        os.environ.pop(_ENV, None)
    for node_id in cluster.nodes:
        cluster.stop_node(node_id)
    for node_id in cluster.nodes:
        cluster.start_node(node_id)
    cluster.wait_for_leader(90)


def _heartbeats(client: Any, n: int, tag: str) -> None:
    for i in range(n):
        client.heartbeat(f"fo-{tag}-{i % 4}", {"i": str(i)})


def one_kill(lc: Any, profile: str, arm: str, rnd: int, settle_s: float) -> Kill:
    """Restart the cluster in ``arm``, settle, kill the leader, measure."""
    from raftstate.errors import RaftStateError
    from raftstate.sdk import DeviceClient

    cluster = lc.cluster
    _restart_all(lc, arm)
    _wait(lambda: _settled(lc, arm), 60, f"{arm} timers")
    with DeviceClient(lc.endpoints, deadline_s=5.0) as client:
        end = time.monotonic() + settle_s
        while time.monotonic() < end:  # traffic: RTT and loss samples on every link
            _heartbeats(client, 5, "warm")
            time.sleep(0.05)
    leader = cluster.leader()
    if leader is None:
        _wait(lambda: cluster.leader() is not None, 30, "a leader")
        leader = cluster.leader()
    assert leader is not None
    survivors = [n for n in cluster.nodes if n != leader]
    before = _statuses(lc, survivors)
    term0 = max(int(s.term) for s in before.values() if s is not None)
    eps = [cluster.nodes[n].endpoint for n in survivors]
    t0 = time.monotonic()
    cluster.kill_node(leader)
    elected = committed = None
    with DeviceClient(eps, deadline_s=0.5) as client:
        deadline = t0 + 30
        while time.monotonic() < deadline and (elected is None or committed is None):
            if elected is None:
                new = cluster.leader(among=survivors)
                if new is not None and new != leader:
                    elected = time.monotonic() - t0
            if committed is None:
                try:
                    client.heartbeat(f"fo-{rnd}-{arm}", {"after": "kill"})
                    committed = time.monotonic() - t0
                except RaftStateError:
                    pass
            time.sleep(0.01)
    after = _statuses(lc, survivors)
    term1 = max((int(s.term) for s in after.values() if s is not None), default=term0)
    cluster.start_node(leader)
    return Kill(
        profile=profile, arm=arm, round=rnd, leader=leader,
        elected_s=None if elected is None else round(elected, 3),
        committed_s=None if committed is None else round(committed, 3),
        term_increase=term1 - term0,
        election_timeout_ms=[[round(s.election_timeout_min_ms), round(s.election_timeout_max_ms)]
                             for s in before.values() if s is not None],
        timing_source=[s.timing_source for s in before.values() if s is not None],
    )  # fmt: skip


def summarize(kills: Sequence[Kill]) -> list[dict[str, Any]]:
    """Per (profile, arm): medians and maxima of elected/committed, terms."""
    rows = []
    keys = sorted({(k.profile, k.arm) for k in kills}, key=lambda pa: (pa[0], ARMS.index(pa[1])))
    for profile, arm in keys:
        ks = [k for k in kills if (k.profile, k.arm) == (profile, arm)]
        el = [k.elected_s for k in ks if k.elected_s is not None]
        co = [k.committed_s for k in ks if k.committed_s is not None]
        timeouts = sorted({tuple(t) for k in ks for t in k.election_timeout_ms})
        rows.append({
            "profile": profile, "arm": arm, "kills": len(ks),
            "elected_median_s": round(statistics.median(el), 3) if el else None,
            "elected_max_s": max(el) if el else None,
            "committed_median_s": round(statistics.median(co), 3) if co else None,
            "committed_max_s": max(co) if co else None,
            "failed": sum(1 for k in ks if k.committed_s is None),
            "term_increase": [k.term_increase for k in ks],
            "election_timeout_ms": [list(t) for t in timeouts[:4]],
        })  # fmt: skip
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    head = ("profile", "arm", "kills", "elected p50 s", "elected max s", "committed p50 s",
            "committed max s", "failed", "term+", "survivors' election timeout ms")  # fmt: skip
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    table = [list(head)] + [
        [r["profile"], r["arm"], str(r["kills"]), cell(r["elected_median_s"]),
         cell(r["elected_max_s"]), cell(r["committed_median_s"]), cell(r["committed_max_s"]),
         str(r["failed"]), ",".join(map(str, r["term_increase"])),
         " ".join(f"{a}-{b}" for a, b in r["election_timeout_ms"])]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos.labfailover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="lan,weak", help="comma-separated WAN profiles")
    ap.add_argument("--rounds", type=int, default=3, help="kills per arm and profile")
    ap.add_argument("--arms", default=",".join(ARMS), help="adaptive,fixed (alternated)")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds of traffic before a kill")
    ap.add_argument("--dir", default=".raftstate/labfailover",
                    help="working directory (a fresh subdirectory per run)")
    ap.add_argument("--out", default=".raftstate/labfailover/failover", help="JSON stem")
    args = ap.parse_args(argv)
    from cluster.labcluster import LabCluster

    profiles = [p for p in args.profile.split(",") if p]
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            ap.error(f"--arms: unknown arm {a!r} (choose from {', '.join(ARMS)})")
    prefix = "fo" + secrets.token_hex(2)
    # A fresh directory per run: node certificates name the lab's addresses.
    base = Path(args.dir).resolve() / prefix
    lc = LabCluster(base, ["cone", "cone", "cone"], transport="udp", prefix=prefix,
                    progress=print)  # fmt: skip
    kills: list[Kill] = []
    saved = os.environ.get(_ENV)
    lc.up(timeout_s=90)
    try:
        for profile in profiles:
            lc.lab.impair_profile(profile)
            for rnd in range(args.rounds):
                for arm in arms:
                    k = one_kill(lc, profile, arm, rnd, args.settle)
                    print(f"{profile} {arm} round {rnd}: leader {k.leader} killed; elected "
                          f"{k.elected_s} s, committed {k.committed_s} s, term +{k.term_increase}, "
                          f"survivors' timeout {k.election_timeout_ms} ms ({k.timing_source})",
                          flush=True)  # fmt: skip
                    kills.append(k)
    finally:
        lc.down()
        if saved is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = saved
    rows = summarize(kills)
    print(render(rows))
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {"command": " ".join(["python -m chaos.labfailover", *(argv or sys.argv[1:])]),
                    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
           "summary": rows, "kills": [asdict(k) for k in kills]}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
