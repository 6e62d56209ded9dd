"""Internal protobuf schemas and their stubs: never part of the public API."""
