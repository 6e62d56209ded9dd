"""Helpers for cluster tests: per-node reads and catch-up waits."""

from __future__ import annotations

from chaos.verify import node_table
from cluster.local import LocalCluster


def node_devices(endpoint: str, prefix: str = "") -> dict[str, int]:
    """device_id -> seq as exactly this node holds them."""
    return {d: rec[0] for d, rec in node_table(endpoint, prefix).items()}


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
