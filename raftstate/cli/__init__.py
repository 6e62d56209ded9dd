"""The ``raftstate`` command line."""
