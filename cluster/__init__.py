"""Running raftstate clusters: local multi-process clusters (and, later, the
network-namespace NAT lab)."""

from cluster.local import LocalCluster, free_ports, node_status, running_cluster, wait_until
from cluster.netns import LabError, NetnsLab, available

__all__ = [
    "LabError",
    "LocalCluster",
    "NetnsLab",
    "available",
    "free_ports",
    "node_status",
    "running_cluster",
    "wait_until",
]
