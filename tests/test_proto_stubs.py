"""The committed gRPC stubs must match what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftstate.protogen import REPO_ROOT, generate

pytest.importorskip("grpc_tools")


def test_committed_stubs_match_proto_files(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "no stubs generated"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = REPO_ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"stubs out of date, run `python -m raftstate.protogen`: {stale}"
