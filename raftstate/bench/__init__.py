"""Benchmarks: raftstate alone and against etcd, driven through the same grpc.aio stack."""
