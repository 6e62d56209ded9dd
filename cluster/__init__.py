"""Running raftstate clusters: local multi-process clusters (and, later, the
network-namespace NAT lab)."""

from cluster.local import LocalCluster, free_ports, node_status, running_cluster, wait_until

__all__ = ["LocalCluster", "free_ports", "node_status", "running_cluster", "wait_until"]
