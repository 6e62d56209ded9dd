"""The committed gRPC stubs must match what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftstate.protogen import (
    PROTO_ROOT,
    REPO_ROOT,
    STUB_DIRS,
    SUFFIXES,
    TREES,
    generate,
    proto_files,
)

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


def generate_paths() -> list[Path]:
    """Where ``generate`` writes, relative to the repository, without protoc."""
    out = []
    for root, tree in TREES:
        for proto in proto_files(tree):
            stem = REPO_ROOT / proto.relative_to(root).with_suffix("")
            out.extend(stem.with_name(stem.name + s) for s in SUFFIXES)
    return out


def test_no_stub_is_left_without_its_proto() -> None:
    """A stub whose .proto was moved or deleted must not linger (it would
    still import, with stale names)."""
    expected = {p.relative_to(REPO_ROOT) for p in generate_paths()}
    found = {
        p.relative_to(REPO_ROOT)
        for d in STUB_DIRS
        for suffix in SUFFIXES
        for p in (REPO_ROOT / d).glob(f"*{suffix}")
    }
    assert found == expected


def test_proto_dir_holds_only_the_public_api() -> None:
    """Everything under proto/ is package raftstate.v1 (what other languages
    generate clients from); internal and benchmark schemas live elsewhere."""
    files = proto_files(PROTO_ROOT)
    assert files
    for path in files:
        text = path.read_text()
        assert "\npackage raftstate.v1;\n" in text, path
        assert path.parent == PROTO_ROOT / "raftstate" / "v1", path
