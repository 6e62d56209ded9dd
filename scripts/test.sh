#!/usr/bin/env bash
# The test command: set up, lint, type-check, then every test (real processes
# and sockets on loopback). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
python3 -m ruff check raftstate cluster chaos tests
python3 -m mypy
python3 -m pytest -q "$@"
