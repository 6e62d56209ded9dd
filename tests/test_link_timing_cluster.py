"""Raft timers follow the measured links in a real (loopback, UDP) cluster,
and a leader kill fails over within the derived timeouts."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from cluster.local import LocalCluster, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FLOOR_MS = 300


def _at_floor(cluster: LocalCluster, node_id: str) -> bool:
    """Derived from the links, and settled at the floor (the first RTT
    samples of a new session are large on a loaded box, and the first
    rttvar is half the first sample: the timers start high, then fall)."""
    st = cluster.status(node_id)
    return (
        st is not None
        and st.timing_source.startswith("links:")
        and st.election_timeout_min_ms == pytest.approx(FLOOR_MS)
        and st.leader_step_down_ms == pytest.approx(1.5 * FLOOR_MS)
    )


def test_loopback_links_set_the_timers_to_the_floor_and_failover_follows(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Configured timers ten times slower than the derived ones: a failover
    # within the derived bound shows pysyncobj runs on the derived timers.
    cluster = make_cluster(
        election_timeout_floor_ms=FLOOR_MS,
        heartbeat_ms=100,
        election_timeout_min_ms=3000,
        election_timeout_max_ms=6000,
        leader_step_down_ms=4000,
        connection_timeout_ms=6000,
    )
    leader = cluster.wait_for_leader()
    for node_id in cluster.nodes:
        wait_until(lambda n=node_id: _at_floor(cluster, n), 20, f"{node_id}'s derived timers")
    for node_id in cluster.nodes:
        st = cluster.status(node_id)
        assert st is not None
        # loopback: sub-millisecond RTT, so the floor and twice the floor
        assert st.election_timeout_min_ms == pytest.approx(FLOOR_MS)
        assert st.election_timeout_max_ms == pytest.approx(2 * FLOOR_MS)
        assert st.heartbeat_ms == pytest.approx(FLOOR_MS / 10)
        assert st.leader_step_down_ms == pytest.approx(1.5 * FLOOR_MS)
    before = {n: cluster.status(n) for n in cluster.nodes}
    cluster.kill_node(leader)
    killed = time.monotonic()
    survivors = [n for n in cluster.nodes if n != leader]
    new_leader = cluster.wait_for_leader(30, among=survivors)
    failover = time.monotonic() - killed
    print(f"failover after a leader kill: {failover:.2f} s")
    assert new_leader != leader
    # detection (at most the maximum timeout) + a pre-vote and a vote round
    # on loopback + this test's polling, on a loaded two-core box
    assert failover < 2 * FLOOR_MS / 1000 + 1.0
    after = cluster.status(new_leader)
    old = before[new_leader]
    assert after is not None and old is not None
    # one election, or two if the survivors' pre-votes collided on a loaded box
    assert old.elections + 1 <= after.elections <= old.elections + 2
    assert after.leader_changes == old.leader_changes + 1


def test_adaptive_timing_off_keeps_the_configured_timers(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(adaptive_timing=False, size=1)
    node_id = cluster.wait_for_leader()
    time.sleep(1.5)  # three derivation periods would have passed
    st = cluster.status(node_id)
    assert st is not None
    assert st.timing_source == "configured"
    assert st.election_timeout_min_ms == 400 and st.heartbeat_ms == 40
