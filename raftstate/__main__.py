import os

# grpc's C core logs every failed TLS handshake at INFO, unthrottled: a
# stranger could fill a node's log. Our own refusals are rate-limited
# (raftstate/rpcguard.py). Must be set before grpc initialises.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# A node forks to write snapshots (raftstate/snapshotter.py); the child never
# calls gRPC, so gRPC's fork handlers (which pause its threads) are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from raftstate.cli.main import main  # noqa: E402

raise SystemExit(main())
