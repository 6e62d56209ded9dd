"""The large-payload flood, end to end (the CI-sized version of the
[integrity] target): pipelined streams of new devices with reported maps up
to the 8 KiB limit, into the leader and into a follower at once, a kill -9
of the leader in the middle, then a restart of every node.

Checked: every acknowledged heartbeat is on every node, no node logged a
tick failure or a truncation of applied entries, and the cluster commits a
new heartbeat within 2 s of the load stopping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_acked_present, node_devices, wait_caught_up

from chaos.flood import FloodResult, flood
from cluster.local import LocalCluster
from raftstate.config import NodeConfig
from raftstate.sdk import DeviceClient

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: Log lines that mean a node's Raft tick failed or its state machine diverged.
BAD_LINES = ("Traceback", "truncating already-applied", "pickle", "CRITICAL")


def _bad_lines(cluster: LocalCluster) -> list[str]:
    out = []
    for node_id, text in cluster.logs():
        out += [f"{node_id}: {line}" for line in text.splitlines()
                if any(b in line for b in BAD_LINES)]
    return out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_flood_of_8kib_heartbeats_with_leader_kill_and_full_restart_loses_nothing(
    tmp_path: Path, transport: str
) -> None:
    base = NodeConfig.for_tests(transport=transport)
    with LocalCluster(tmp_path, 3, base_config=base) as cluster:
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.nodes if n != leader)
        targets = [cluster.nodes[leader].endpoint, cluster.nodes[follower].endpoint]
        result: list[FloodResult] = []
        runner = threading.Thread(
            target=lambda: result.append(
                asyncio.run(flood(targets, cluster.endpoints, devices=1_600, window=32))
            )
        )
        runner.start()
        # Kill the leader once a good part of the flood is acknowledged.
        first = cluster.status(leader)
        assert first is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = cluster.status(leader)
            if st is not None and st.commit_index >= first.commit_index + 25:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the flood never got going")
        cluster.kill_node(leader)
        runner.join(240)
        assert not runner.is_alive(), "the flood did not finish"
        res = result[0]
        assert not res.errors, res.errors[:5]
        assert len(res.acked) >= 1_500
        # Load stopped: a new heartbeat commits within 2 s.
        cluster.start_node(leader)
        t0 = time.monotonic()
        with DeviceClient(cluster.endpoints, deadline_s=10) as client:
            client.heartbeat("after-flood", {"k": "v"})
        assert time.monotonic() - t0 < 2.0, "the cluster did not commit within 2 s"
        # Restart every node; every acknowledged heartbeat survives everywhere.
        for node_id in cluster.nodes:
            cluster.stop_node(node_id)
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        wait_caught_up(cluster, timeout_s=60)
        for node_id, node in cluster.nodes.items():
            assert_acked_present(res.acked, node_devices(node.endpoint, "fl-"), node_id)
        assert not _bad_lines(cluster), _bad_lines(cluster)[:10]
