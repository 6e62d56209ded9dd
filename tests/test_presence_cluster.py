"""Committed presence on a real cluster: an expiry goes through the log, every
node shows the same offline revision, and a leader kill between the last
heartbeat and the deadline neither resets nor loses the deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from cluster.local import LocalCluster, wait_until
from raftstate.model import Consistency
from raftstate.sdk import DeviceClient
from raftstate.sdk.types import Device

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TTL_S = 2
#: The issue's bound: the offline event commits within TTL + 1 s of the last heartbeat.
BOUND_MS = TTL_S * 1000 + 1000


def _serializable(cluster: LocalCluster, node_id: str, device_id: str) -> Device | None:
    try:
        with DeviceClient([cluster.nodes[node_id].endpoint], deadline_s=2.0) as client:
            return client.get(device_id, Consistency.SERIALIZABLE)
    except Exception:  # noqa: BLE001 - a node that cannot answer yet
        return None


def _offline_everywhere(
    cluster: LocalCluster, node_ids: list[str], device_id: str, timeout_s: float
) -> dict[str, Device]:
    """Poll a serializable GetDevice on each node until all show it offline."""

    def check() -> dict[str, Device] | None:
        got = {n: _serializable(cluster, n, device_id) for n in node_ids}
        if all(d is not None and not d.online for d in got.values()):
            return {n: d for n, d in got.items() if d is not None}
        return None

    result: dict[str, Device] = wait_until(check, timeout_s, f"{device_id} offline on every node")
    return result


def _assert_one_committed_expiry(devices: dict[str, Device], hb_rev: int) -> Device:
    views = list(devices.values())
    first = views[0]
    for d in views[1:]:
        assert (d.revision, d.presence_changed_ms, d.last_seen_ms) == (
            first.revision,
            first.presence_changed_ms,
            first.last_seen_ms,
        ), "nodes disagree on the expiry"
    assert first.revision > hb_rev  # the expiry is a revision of its own
    assert first.heartbeats == 1 and first.ttl_s == TTL_S
    detection = first.presence_changed_ms - first.last_seen_ms
    assert TTL_S * 1000 - 500 <= detection <= BOUND_MS, detection  # max_clock_skew_ms = 500
    return first


def test_a_lapsed_ttl_goes_offline_through_the_log_on_every_node(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    cluster.wait_for_leader()
    with DeviceClient(cluster.endpoints) as client:
        ack = client.heartbeat("pres-1", {"k": "v"}, ttl_s=TTL_S)
        sent = time.monotonic()
        for node_id in cluster.nodes:
            d = _serializable(cluster, node_id, "pres-1")
            assert d is None or d.online  # online until the expiry commits
        devices = _offline_everywhere(cluster, list(cluster.nodes), "pres-1", 15)
        seen_after = time.monotonic() - sent
    _assert_one_committed_expiry(devices, ack.revision)
    assert seen_after <= BOUND_MS / 1000 + 1.0  # + polling the three nodes
    # A heartbeat brings it back: online again at a new revision.
    with DeviceClient(cluster.endpoints) as client:
        back = client.heartbeat("pres-1", {"k": "v"}, ttl_s=3600)
        d = client.get("pres-1")
    assert d.online and back.revision == d.revision > devices[next(iter(devices))].revision


def test_a_leader_killed_before_the_deadline_does_not_reset_it(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    with DeviceClient([cluster.nodes[leader].endpoint]) as client:
        ack = client.heartbeat("pres-2", {}, ttl_s=TTL_S)
    sent = time.monotonic()
    time.sleep(0.2)
    cluster.kill_node(leader)
    survivors = [n for n in cluster.nodes if n != leader]
    new_leader = cluster.wait_for_leader(30, among=survivors)
    assert new_leader != leader
    devices = _offline_everywhere(cluster, survivors, "pres-2", 15)
    seen_after = time.monotonic() - sent
    _assert_one_committed_expiry(devices, ack.revision)
    assert seen_after <= BOUND_MS / 1000 + 1.0
