#!/usr/bin/env bash
# The test command: set up, lint, type-check, then every test (real processes
# and sockets on loopback). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
python3 -m ruff check raftstate cluster chaos bench tests
python3 -m mypy
# The public API (proto/): buf's STANDARD and COMMENTS rules (proto/buf.yaml).
(cd proto && ../tests/node/node_modules/.bin/buf lint)
python3 -m pytest -q "$@"
