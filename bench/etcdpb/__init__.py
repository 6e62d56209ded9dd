"""Generated stubs for the benchmark's etcd v3 API subset (see ``raftstate.protogen``)."""
