"""Generated stubs for ``raftstate.internal.v1`` (log entries, snapshots; see ``raftstate.protogen``)."""
