"""Generated protobuf and gRPC stubs for ``raftstate.v1`` (see ``raftstate.protogen``)."""
