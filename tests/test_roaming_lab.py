"""Roaming in the WAN lab: a NAT port remap (and a flush) under ``weak`` stall replication briefly.

Three nodes behind three cone NATs meet through ICE (srflx paths). Under the
``weak`` profile, with a recorded workload running, the leader's site's router
(the harder case: every commit waits for the moved node) moves every mapping
to new ports and forgets its flows (:meth:`NatLab.remap`). Its
node finds out with one STUN request, tells its peers its new address through
the rendezvous (sealed), and each peer moves its path there once an
authenticated PATH_CHALLENGE/PATH_RESPONSE round trip over the new address
succeeded, without an ICE rebuild. Then the same router forgets its flows
(ports kept): silence probes re-open the mapping. For both the test measures
the replication stall (from the NAT command until every node applied an entry
the leader appended after it), checks it against a bound, and runs the shared
verifier (nothing acknowledged lost, one applied order, linearizable history).

Needs root, a TUN device, nftables, conntrack and coturn; skipped otherwise.
Every wait is a condition with a deadline.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import wait_caught_up

from chaos.verify import verify
from chaos.workload import Workload
from cluster.labcluster import LabCluster
from cluster.local import LocalCluster, wait_until
from cluster.natlab import available
from raftstate.config import NodeConfig
from raftstate.v1 import cluster_pb2

_REASON = available()
#: The issue's target is 300 ms; on a shared 2-core box running three nodes,
#: the WAN emulator, the workload (and other jobs) scheduling delay adds up,
#: so the test bound is looser: measured 0.47 s (remap) and 0.75 s (flush) at
#: load 8, 0.9 s and 1.6 s at load 28 (see docs/architecture.md, "Roaming").
STALL_BOUND_S = 2.0
#: Without roaming the same remap stalled 1.8-3.6 s (suspect after 0.6 s, then a
#: rendezvous reconnect with backoff and a full ICE round).


@pytest.fixture(scope="module")
def cone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    if _REASON is not None:
        pytest.skip(f"WAN lab unavailable: {_REASON}")
    # Election timers as deployed (the lab bench's): with the test ones (400 ms)
    # a half-second outage of the leader's site is an election, not a stall.
    d = NodeConfig.default()
    base = NodeConfig.for_tests(
        election_timeout_min_ms=d.election_timeout_min_ms,
        election_timeout_max_ms=d.election_timeout_max_ms,
        leader_step_down_ms=d.leader_step_down_ms,
        connection_timeout_ms=d.election_timeout_max_ms,
    )
    lab = LabCluster(tmp_path_factory.mktemp("roamlab"), ("cone", "cone", "cone"), base_config=base)
    lab.up(timeout_s=60)
    try:
        yield lab
    finally:
        prefix = lab.lab.prefix
        lab.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left


def _links(cluster: LocalCluster) -> dict[tuple[str, str], cluster_pb2.Member]:
    out = {}
    for node_id in cluster.nodes:
        st = cluster.status(node_id, timeout_s=0.5)
        for m in st.members if st is not None else ():
            if m.node_id != node_id:
                out[(node_id, m.node_id)] = m
    return out


def _applied(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for node_id in cluster.nodes:
        st = cluster.status(node_id, timeout_s=0.5)
        out[node_id] = -1 if st is None else st.last_applied
    return out


def _stall(cluster: LocalCluster, event: Callable[[], object]) -> tuple[float, str]:
    """Run ``event`` (a NAT operation), then time until every node applied
    an entry the leader appended after it returned. Returns the stall and a
    per-node line."""
    leader = cluster.wait_for_leader(30)
    started = time.monotonic()
    event()
    status = cluster.status(leader)
    assert status is not None
    target = status.commit_index  # read after the event: it crossed the new NAT state
    caught_up: dict[str, float] = {}

    def all_past_target() -> bool:
        for node_id, applied in _applied(cluster).items():
            if applied > target:
                caught_up.setdefault(node_id, time.monotonic() - started)
        return len(caught_up) == len(cluster.nodes)

    wait_until(all_past_target, 60, "every node applying an entry committed after the event")
    per_node = ", ".join(f"{n} {t:.3f} s" for n, t in sorted(caught_up.items()))
    return max(caught_up.values()), f"leader {leader}: {per_node}"


def test_a_port_remap_and_a_flush_under_weak_stall_briefly_and_lose_nothing(
    cone_cluster: LabCluster,
) -> None:
    cluster, lab = cone_cluster.cluster, cone_cluster.lab
    assert cluster is not None

    def all_srflx() -> bool:
        seen = _links(cluster)
        return len(seen) == 6 and all(m.connected and m.path == "srflx" for m in seen.values())

    wait_until(all_srflx, 60, "srflx ICE paths between the three cone sites")
    lab.impair_profile("weak")
    endpoints = cluster.endpoints
    with Workload(endpoints, endpoints, devices=8) as w:
        wait_until(lambda: w.completed >= 100, 30, "traffic over the weak WAN")
        moved = cluster.wait_for_leader(30)
        site = int(moved.removeprefix("n"))  # LabCluster: node n<i> at site i
        builds = {pair: m.paths for pair, m in _links(cluster).items() if moved in pair}
        remap_stall, remap_line = _stall(cluster, lambda: lab.remap(site))
        print(f"remap of site {site} ({moved}'s): stall {remap_stall:.3f} s ({remap_line})")
        rebuilt = {p: m.paths - builds[p] for p, m in _links(cluster).items() if p in builds}
        print(f"paths replaced (ICE rebuilds + moves) since the remap: {rebuilt}")
        done = w.completed
        wait_until(lambda: w.completed >= done + 50, 30, "traffic after the remap")
        flush_stall, flush_line = _stall(cluster, lambda: lab.flush_conntrack(site))
        print(f"conntrack flush of site {site}: stall {flush_stall:.3f} s ({flush_line})")
        done = w.completed
        wait_until(lambda: w.completed >= done + 50, 30, "traffic after the flush")
    wait_caught_up(cluster, timeout_s=30)
    verdict = verify(endpoints, w.acked, w.history)
    print(verdict.explain())
    assert verdict.ok, verdict.explain()
    assert remap_stall <= STALL_BOUND_S, f"replication stalled {remap_stall:.3f} s after the remap"
    assert flush_stall <= STALL_BOUND_S, f"replication stalled {flush_stall:.3f} s after the flush"
    logs = "".join(
        (cone_cluster.base_dir / "nodes" / f"{n}.log").read_text(errors="replace")
        for n in cluster.nodes
        if n != moved
    )
    assert "(validated)" in logs, f"no peer moved its path to {moved} by path validation"
