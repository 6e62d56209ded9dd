"""Linearizable reads under faults, checked by the linearizability checker.

Concurrent heartbeats (SDK, retries with the same seq) and LINEARIZABLE reads
from readers pinned to every node run while a fault is injected; every run
ends in the shared verifier (chaos.verify): acknowledged heartbeats present
on every node, identical tables, and a linearizable history.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from chaos.verify import verify
from chaos.workload import Workload
from cluster.local import LocalCluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def run_until(workload: Workload, more: int, timeout_s: float = 30.0) -> None:
    target = workload.completed + more
    wait_until(lambda: workload.completed >= target, timeout_s, f"{more} more completed operations")


def finish(cluster: LocalCluster, workload: Workload) -> None:
    workload.stop()
    verdict = verify(cluster.endpoints, workload.acked, workload.history)
    print(verdict.explain())
    assert verdict.ok, verdict.explain()
    assert workload.writes_ok > 50 and workload.reads_ok > 50


def test_leader_kill(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    with Workload(cluster.endpoints, cluster.endpoints) as w:
        run_until(w, 150)
        cluster.kill_node(leader)
        cluster.wait_for_leader(30, among=[n for n in cluster.nodes if n != leader])
        run_until(w, 150)
        cluster.start_node(leader)
        run_until(w, 100)
    finish(cluster, w)


def test_follower_restart(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    with Workload(cluster.endpoints, cluster.endpoints) as w:
        run_until(w, 150)
        cluster.restart_node(follower)
        cluster.wait_for_leader(30)
        run_until(w, 200)
    finish(cluster, w)


def test_leader_paused_then_resumed_with_retries(make_cluster: Callable[..., LocalCluster]) -> None:
    # SIGSTOP freezes the leader mid-request: writes in flight get ambiguous
    # failures, the SDK retries them (same seq) on other nodes, a new leader is
    # elected, and the old one wakes up believing it still leads.
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    others = [n for n in cluster.nodes if n != leader]
    with Workload(cluster.endpoints, cluster.endpoints, write_deadline_s=8.0) as w:
        run_until(w, 150)
        cluster.signal_node(leader, signal.SIGSTOP)
        try:
            new_leader = cluster.wait_for_leader(30, among=others)
            assert new_leader != leader
            run_until(w, 150)
        finally:
            cluster.signal_node(leader, signal.SIGCONT)
        run_until(w, 150)
    finish(cluster, w)
