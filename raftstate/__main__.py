import os

# grpc's C core logs every failed TLS handshake at INFO, unthrottled: a
# stranger could fill a node's log. Our own refusals are rate-limited
# (raftstate/rpcguard.py). Must be set before grpc initialises.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from raftstate.cli.main import main  # noqa: E402

raise SystemExit(main())
