"""Measurement code that is not part of the runtime: the benchmark and the
etcd comparison (``raftstate bench``), and the etcd API subset they speak
(``bench.etcdpb``). Installed only with the repository (dev install)."""
