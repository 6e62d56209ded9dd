"""Benchmarks: raftstate alone and against etcd, driven through the same
grpc.aio stack (``raftstate bench``), and the etcd API subset they speak
(``bench.etcdpb``).

Measurement code, not runtime: it lives next to ``chaos/`` and ``cluster/``,
outside the ``raftstate`` package that devices and nodes run. ``raftstate
bench`` imports it lazily and says how to get it when it is missing.
"""
