"""Running raftstate clusters: local multi-process clusters, etcd clusters for
comparison, and the WAN lab (NATed sites behind an emulated WAN, in network
namespaces)."""

from cluster.labcluster import LabCluster, LabState, teardown
from cluster.local import LocalCluster, free_ports, node_status, running_cluster, wait_until
from cluster.natlab import NatKind, NatLab
from cluster.netns import LabError, NetnsLab, available

__all__ = [
    "LabCluster",
    "LabError",
    "LabState",
    "LocalCluster",
    "NatKind",
    "NatLab",
    "NetnsLab",
    "available",
    "free_ports",
    "node_status",
    "running_cluster",
    "teardown",
    "wait_until",
]
