"""Helpers for cluster tests: per-node reads and catch-up waits."""

from __future__ import annotations

import grpc

from cluster.local import LocalCluster
from raftstate.v1 import device_pb2, device_pb2_grpc


def node_devices(endpoint: str, timeout_s: float = 5.0) -> dict[str, int]:
    """device_id -> seq as this one node sees it (SERIALIZABLE, every page)."""
    out: dict[str, int] = {}
    token = ""
    with grpc.insecure_channel(endpoint) as ch:
        stub = device_pb2_grpc.DeviceStateStub(ch)
        while True:
            res = stub.ListDevices(
                device_pb2.ListDevicesRequest(
                    page_size=1000, page_token=token, consistency=device_pb2.SERIALIZABLE
                ),
                timeout=timeout_s,
            )
            out.update({d.device_id: d.seq for d in res.devices})
            token = res.next_page_token
            if not token:
                return out


def wait_caught_up(
    cluster: LocalCluster, node_ids: list[str] | None = None, timeout_s: float = 30.0
) -> None:
    """Wait until every node in ``node_ids`` has applied the leader's commit index."""
    ids = node_ids or [n for n, p in cluster.nodes.items() if p.running()]
    leader = cluster.wait_for_leader(timeout_s, among=ids)
    st = cluster.status(leader)
    assert st is not None
    target = st.commit_index
    for node_id in ids:
        cluster.wait_applied(node_id, target, timeout_s)


def assert_acked_present(acked: dict[str, int], seen: dict[str, int], where: str) -> None:
    """Every acknowledged (device, seq) must be stored at that seq or newer."""
    missing = {d: s for d, s in acked.items() if seen.get(d, 0) < s}
    assert not missing, (
        f"{where} lost {len(missing)} acknowledged heartbeats, e.g. {sorted(missing.items())[:5]}"
    )
