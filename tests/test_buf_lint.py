"""The public API passes buf lint (STANDARD + COMMENTS, proto/buf.yaml).

scripts/test.sh runs `buf lint` too; this test makes a finding show up in a
plain pytest run, and checks that the lint really looks (a copy of proto/
with one undocumented, unprefixed enum value must fail)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUF = REPO / "tests" / "node" / "node_modules" / ".bin" / "buf"


def _buf(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.skip("buf missing: run scripts/bootstrap.sh (npm ci in tests/node)")
    return subprocess.run(
        [str(BUF), "lint"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_public_protos_pass_buf_lint() -> None:
    run = _buf(REPO / "proto")
    assert run.returncode == 0, run.stdout + run.stderr


def test_buf_lint_catches_an_unprefixed_undocumented_enum_value(tmp_path: Path) -> None:
    copy = tmp_path / "proto"
    shutil.copytree(REPO / "proto", copy)
    device = copy / "raftstate" / "v1" / "device.proto"
    text = device.read_text()
    marker = "  ONLINE_FILTER_OFFLINE = 3;\n"
    assert marker in text
    device.write_text(text.replace(marker, marker + "  STALE = 4;\n"))
    run = _buf(copy)
    assert run.returncode != 0
    assert "STALE" in run.stdout
