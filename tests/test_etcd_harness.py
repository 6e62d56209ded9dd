"""The etcd benchmark harness: a real 3-member etcd cluster driven by EtcdClient.

Loopback test with real processes; skipped where etcd is not installed.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bench.etcd_client import EtcdClient
from cluster.etcd import DEFAULT_ETCD, EtcdCluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(DEFAULT_ETCD).exists(),
        reason=f"{DEFAULT_ETCD} not found; install Debian's etcd-server to run the etcd harness",
    ),
]


async def _exercise(endpoints: list[str], expected_leader: str) -> None:
    client = await EtcdClient.connect(endpoints)
    try:
        assert client.leader_endpoint == expected_leader
        first = await client.put("device/a", b"v1", timeout_s=5.0)
        second = await client.put("device/a", b"v2", timeout_s=5.0)
        assert second > first > 1  # revision 1 is the harness's readiness write
        assert await client.get("device/a", serializable=False, timeout_s=5.0) == b"v2"
        assert await client.get("device/a", serializable=True, timeout_s=5.0) == b"v2"
        assert await client.get("device/missing", serializable=False, timeout_s=5.0) is None
    finally:
        await client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_three_member_cluster_serves_puts_and_both_read_kinds(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, size=3)
    pids: list[int] = []
    try:
        endpoints = cluster.start(timeout_s=12.0)
        pids = cluster.pids()
        assert len(endpoints) == 3 and len(set(endpoints)) == 3
        assert len(pids) == 3
        asyncio.run(_exercise(endpoints, cluster.leader_endpoint()))
    finally:
        cluster.stop()
    assert cluster.pids() == []
    assert not any(_alive(pid) for pid in pids)
    cluster.stop()  # idempotent
