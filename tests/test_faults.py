"""Crashes and restarts: nothing acknowledged is ever lost."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import pytest
from helpers import assert_acked_present, node_devices, wait_caught_up

from cluster.local import LocalCluster, wait_until
from raftstate.errors import RaftStateError
from raftstate.sdk import DeviceClient

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class Fleet:
    """Background devices sending heartbeats until stopped; records acks."""

    def __init__(
        self, endpoints: list[str], devices: int, threads: int = 4, deadline_s: float = 15.0
    ) -> None:
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self.count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = DeviceClient(endpoints, deadline_s=deadline_s)
        ids = [f"fleet-{i:03d}" for i in range(devices)]
        self._threads = [
            threading.Thread(target=self._run, args=(ids[t::threads],), daemon=True)
            for t in range(threads)
        ]

    def __enter__(self) -> Fleet:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ids: list[str]) -> None:
        while not self._stop.is_set():
            for device_id in ids:
                try:
                    ack = self._client.heartbeat(device_id, {"n": str(self.count)})
                except RaftStateError as err:
                    with self._lock:
                        self.errors.append(f"{type(err).__name__}: {err.message}")
                    continue
                with self._lock:
                    self.acked[device_id] = max(self.acked.get(device_id, 0), ack.seq)
                    self.count += 1

    def wait_for_more(self, n: int, timeout_s: float = 30.0) -> None:
        target = self.count + n
        wait_until(lambda: self.count >= target, timeout_s, f"{n} more acknowledged heartbeats")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._client.close()


def test_kill_leader_under_load_elects_new_leader_and_loses_nothing(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    old_leader = cluster.wait_for_leader()
    with Fleet(cluster.endpoints, devices=24) as fleet:
        fleet.wait_for_more(200)
        cluster.kill_node(old_leader)
        survivors = [n for n in cluster.nodes if n != old_leader]
        new_leader = cluster.wait_for_leader(30, among=survivors)
        assert new_leader != old_leader
        fleet.wait_for_more(200)  # the SDK carried on through the failover
    assert not fleet.errors, fleet.errors[:5]
    wait_caught_up(cluster, survivors)
    for node_id in survivors:
        assert_acked_present(fleet.acked, node_devices(cluster.nodes[node_id].endpoint), node_id)
    cluster.start_node(old_leader)  # the crashed node recovers from its journal and catches up
    wait_caught_up(cluster)
    assert_acked_present(fleet.acked, node_devices(cluster.nodes[old_leader].endpoint), old_leader)


def test_restarted_follower_catches_up_through_a_snapshot(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Compact the log every 50 entries, so a follower that misses a few hundred
    # entries can only catch up by installing the leader's snapshot.
    cluster = make_cluster(compaction_min_entries=50)
    leader = cluster.wait_for_leader()
    lagging = next(n for n in cluster.nodes if n != leader)
    cluster.stop_node(lagging)
    acked: dict[str, int] = {}
    with DeviceClient(cluster.endpoints) as client:
        for i in range(400):
            ack = client.heartbeat(f"snap-{i % 40:02d}", {"i": str(i)})
            acked[ack.device_id] = ack.seq
    assert "snapshot written" in (cluster.nodes[leader].log_path.read_text())
    cluster.start_node(lagging)
    wait_caught_up(cluster)
    leader_view = node_devices(cluster.nodes[leader].endpoint)
    lagging_view = node_devices(cluster.nodes[lagging].endpoint)
    assert_acked_present(acked, lagging_view, lagging)
    assert lagging_view == leader_view
    assert "snapshot restored" in cluster.nodes[lagging].log_path.read_text()


@pytest.mark.parametrize("durability", ["process-crash", "fsync"])
def test_whole_cluster_crash_and_restart_loses_no_acknowledged_heartbeat(
    make_cluster: Callable[..., LocalCluster], durability: str
) -> None:
    cluster = make_cluster(durability=durability, compaction_min_entries=200)
    with Fleet(cluster.endpoints, devices=12, deadline_s=2.0) as fleet:
        fleet.wait_for_more(300)
        for node_id in cluster.nodes:  # kill -9 everything while writes are in flight
            cluster.kill_node(node_id)
    acked = dict(fleet.acked)
    cluster.start(timeout_s=60)
    # A write in the new term first: until the new leader commits an entry of
    # its own term its commit index may still be the pre-crash one, and
    # "caught up" to that would not cover every acknowledged heartbeat.
    with DeviceClient(cluster.endpoints) as client:  # and it takes new writes
        ack = client.heartbeat("after-restart", {})
        assert client.get("after-restart").seq == ack.seq
    wait_caught_up(cluster)

    for node_id, node in cluster.nodes.items():
        assert_acked_present(acked, node_devices(node.endpoint), node_id)


def test_ambiguous_failure_then_retry_with_same_seq_applies_once(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes.values() if n.node_id != leader)
    with DeviceClient([follower.endpoint], deadline_s=20) as client:
        ack = client.heartbeat("amb", {"v": "1"}, seq=5)
        # Pause the leader so the next write's outcome is unknown to the client.
        cluster.signal_node(leader, signal.SIGSTOP)
        try:
            with pytest.raises(RaftStateError):
                client.heartbeat("amb", {"v": "2"}, seq=6, deadline_s=0.3)
        finally:
            cluster.signal_node(leader, signal.SIGCONT)
        retry = client.heartbeat("amb", {"v": "2"}, seq=6)
        dev = client.get("amb")
    assert retry.stored_seq == 6
    assert dev.seq == 6 and dev.heartbeats == 2 and dev.revision >= ack.revision + 1


def test_leader_that_loses_its_quorum_steps_down(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Check-quorum: pysyncobj's leaderFallbackTimeout (30 s by default) is set
    # from leader_step_down_ms (600 ms in the test config).
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n != leader]
    for node_id in followers:
        cluster.signal_node(node_id, signal.SIGSTOP)
    try:
        import time

        started = time.monotonic()

        def stepped_down() -> bool:
            st = cluster.status(leader)
            return st is not None and st.role != 3

        wait_until(stepped_down, 10, f"{leader} to step down without a quorum")
        elapsed = time.monotonic() - started
        print(f"leader stepped down {elapsed:.2f}s after losing its quorum")
        with DeviceClient([cluster.nodes[leader].endpoint], deadline_s=1.0) as client:
            with pytest.raises(RaftStateError):
                client.heartbeat("nobody-hears", {})
    finally:
        for node_id in followers:
            cluster.signal_node(node_id, signal.SIGCONT)
    cluster.wait_for_leader(30)


def test_five_node_cluster_commits_and_survives_two_crashes(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(size=5)
    leader = cluster.wait_for_leader()
    with Fleet(cluster.endpoints, devices=10) as fleet:
        fleet.wait_for_more(100)
        victims = [leader, next(n for n in cluster.nodes if n != leader)]
        for node_id in victims:  # a majority of 3 out of 5 remains
            cluster.kill_node(node_id)
        survivors = [n for n in cluster.nodes if n not in victims]
        cluster.wait_for_leader(30, among=survivors)
        fleet.wait_for_more(100)
    assert not fleet.errors, fleet.errors[:5]
    wait_caught_up(cluster, survivors)
    for node_id in survivors:
        assert_acked_present(fleet.acked, node_devices(cluster.nodes[node_id].endpoint), node_id)
