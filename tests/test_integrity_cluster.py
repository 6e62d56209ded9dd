"""Corrupt files, journal growth and failing ticks, with real node processes.

A follower whose snapshot or journal was damaged while it was stopped refuses
the damaged data, catches up from the leader and serves the cluster's device
count; large heartbeats keep the journal bounded by bytes; a node whose Raft
tick keeps raising says so in Status and health and, at its limit, steps
down and exits for its supervisor.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import node_devices, wait_caught_up

from cluster.local import LocalCluster, wait_until
from raftstate.config import NodeConfig
from raftstate.integrity import JOURNAL_MAGIC, scan_records
from raftstate.sdk import DeviceClient
from raftstate.tickguard import EXIT_TICK_FAILURES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _write(cluster: LocalCluster, n: int, devices: int, tag: str) -> dict[str, int]:
    acked: dict[str, int] = {}
    with DeviceClient(cluster.endpoints) as client:
        for i in range(n):
            ack = client.heartbeat(f"dev-{i % devices:03d}", {"i": f"{tag}{i}"})
            acked[ack.device_id] = ack.seq
    return acked


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def _wait_recovered(cluster: LocalCluster, node_id: str, devices: int) -> None:
    """The node applied the leader's commit index, left catch-up, and holds
    exactly the leader's table of ``devices`` devices."""
    wait_caught_up(cluster, timeout_s=60)

    def settled() -> bool:
        st = cluster.status(node_id)
        return st is not None and not st.catching_up and st.devices == devices

    wait_until(settled, 30, f"{node_id} to leave catch-up with {devices} devices")
    leader = cluster.wait_for_leader()
    assert node_devices(cluster.nodes[node_id].endpoint) == node_devices(
        cluster.nodes[leader].endpoint
    )


def test_follower_with_a_corrupt_snapshot_refuses_it_and_catches_up_from_the_leader(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(compaction_min_entries=40)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    _write(cluster, 200, devices=50, tag="a")
    snapshot = Path(cluster.nodes[follower].config.data_dir) / "snapshot.bin"
    wait_until(snapshot.exists, 30, f"{follower} to write a snapshot")
    wait_caught_up(cluster)
    cluster.stop_node(follower)
    _flip_byte(snapshot, snapshot.stat().st_size // 2)
    _write(cluster, 100, devices=60, tag="b")  # more devices while it is down
    cluster.start_node(follower)
    _wait_recovered(cluster, follower, devices=60)
    log = cluster.nodes[follower].log_path.read_text()
    refusals = [line for line in log.splitlines() if "is corrupt" in line]
    assert len(refusals) == 1 and "snapshot.bin" in refusals[0], refusals
    assert "failed to load full dump" not in log
    assert list(snapshot.parent.glob("snapshot.bin.corrupt-*"))


@pytest.mark.parametrize("where", ["middle", "tail"])
def test_follower_with_a_corrupt_journal_record_truncates_and_catches_up(
    make_cluster: Callable[..., LocalCluster], where: str
) -> None:
    cluster = make_cluster(compaction_min_entries=100_000)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    _write(cluster, 150, devices=40, tag="a")
    wait_caught_up(cluster)
    cluster.stop_node(follower)
    journal = Path(cluster.nodes[follower].config.data_dir) / "raft.journal"
    scan = scan_records(journal.read_bytes(), len(JOURNAL_MAGIC))
    assert scan.problem is None and len(scan.offsets) > 20
    victim = len(scan.offsets) // 2 if where == "middle" else len(scan.offsets) - 1
    _flip_byte(journal, scan.offsets[victim] + 20)  # inside the record's body
    _write(cluster, 50, devices=45, tag="b")
    cluster.start_node(follower)
    _wait_recovered(cluster, follower, devices=45)
    log = cluster.nodes[follower].log_path.read_text()
    refusals = [line for line in log.splitlines() if "is corrupt" in line]
    assert len(refusals) == 1, refusals
    assert f"entries {scan.entries[victim][1]}-" in refusals[0], refusals[0]


def test_large_heartbeats_compact_the_journal_by_bytes(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    limit = 512 * 1024
    cluster = make_cluster(
        compaction_min_entries=1_000_000,
        compaction_max_journal_bytes=limit,
        batch_max_bytes=64 * 1024,
    )
    reported = {f"k{i:02d}": "v" * 120 for i in range(60)}  # 7.4 KiB, near the 8 KiB cap
    largest: dict[str, int] = {}
    with DeviceClient(cluster.endpoints) as client:
        for i in range(400):  # ~3 MB of heartbeats
            client.heartbeat(f"big-{i % 30:02d}", {**reported, "i": str(i)})
            if i % 20 == 0:
                for node_id in cluster.nodes:
                    st = cluster.status(node_id)
                    if st is not None:
                        largest[node_id] = max(largest.get(node_id, 0), st.journal_bytes)
    wait_caught_up(cluster)
    bound = limit + 2 * 64 * 1024  # one batch may land between two ticks
    for node_id, node in cluster.nodes.items():
        size = (Path(node.config.data_dir) / "raft.journal").stat().st_size
        print(f"{node_id}: journal {size} bytes now, {largest.get(node_id)} at most seen")
        assert size <= bound
        assert largest.get(node_id, 0) <= bound
        assert "compacting" in node.log_path.read_text()
        assert cluster.status(node_id).devices == 30  # type: ignore[union-attr]


def _health(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint) as ch:
        res = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="raftstate.v1.DeviceStateService"), timeout=2
        )
        return int(res.status)


@pytest.fixture
def fault_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """n1 never gives up on failing ticks (to watch it fail); n2 and n3 give
    up after 5. Each node fails its ticks while ``<base>/fail-<id>`` exists."""
    base = dataclasses.replace(NodeConfig.for_tests(), tick_failure_limit=5)
    overrides = {
        f"n{i}": {"test_fail_ticks_file": str(tmp_path / f"fail-n{i}")} for i in (1, 2, 3)
    }
    overrides["n1"]["tick_failure_limit"] = 1_000_000
    cluster = LocalCluster(tmp_path / "c", 3, base_config=base, node_overrides=overrides)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_failing_ticks_show_in_status_and_health_and_a_leader_steps_down_and_exits(
    fault_cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster = fault_cluster
    cluster.start_node("n2")
    cluster.start_node("n3")
    leader = cluster.wait_for_leader(60, among=["n2", "n3"])
    cluster.start_node("n1")  # joins as a follower of n2 or n3
    wait_caught_up(cluster)
    n1 = cluster.nodes["n1"].endpoint
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: _health(n1) == serving, 20, "n1 to report SERVING")

    # (a) ticks fail on a follower: counted, shown, NOT_SERVING; then it heals.
    fail = tmp_path / "fail-n1"
    fail.touch()

    def failing() -> bool:
        st = cluster.status("n1")
        return st is not None and st.tick_failures >= 10

    wait_until(failing, 20, "n1 to count failed ticks")
    st = cluster.status("n1")
    assert st is not None and "injected tick failure" in st.last_tick_error
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: _health(n1) == not_serving, 5, "n1 to report NOT_SERVING")
    fail.unlink()
    wait_until(lambda: _health(n1) == serving, 20, "n1 to report SERVING again")
    log = cluster.nodes["n1"].log_path.read_text()
    assert log.count("Traceback") == 1  # once per kind, then rate-limited summaries
    assert cluster.nodes["n1"].running()

    # (b) ticks fail on the leader: it steps down and exits for its supervisor.
    (tmp_path / f"fail-{leader}").touch()
    proc = cluster.nodes[leader].proc
    assert proc is not None
    started = time.monotonic()
    assert proc.wait(timeout=30) == EXIT_TICK_FAILURES
    print(f"leader exited {time.monotonic() - started:.2f}s after its ticks started failing")
    log = cluster.nodes[leader].log_path.read_text()
    assert "stepped down as leader" in log and f"exiting with status {EXIT_TICK_FAILURES}" in log
    survivors = [n for n in cluster.nodes if n != leader]
    new_leader = wait_until(lambda: cluster.leader(among=survivors), 30, "a new leader")
    assert new_leader != leader
    (tmp_path / f"fail-{leader}").unlink()
    cluster.start_node(leader)  # what the supervisor does
    wait_caught_up(cluster, timeout_s=60)
