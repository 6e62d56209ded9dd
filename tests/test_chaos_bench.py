"""``raftstate chaos bench`` end to end: a short lan run through every proxy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_lan_run_acks_everything_loses_nothing_and_is_linearizable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "raftstate",
        "chaos",
        "bench",
        "--profile",
        "lan",
        "--heartbeats",
        "300",
        "--rate",
        "100",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 lost acked, all verified" in proc.stdout
    (path,) = out.glob("chaos-bench-*.json")
    (result,) = json.loads(path.read_text())["results"]
    assert result["profile"] == "lan" and result["attempted"] == 300
    assert result["success_rate"] == 1.0
    assert result["lost_acked"] == 0
    assert result["linearizable"] is True and result["verifier_ok"] is True
    assert result["heartbeat_ms"]["count"] == 300
    assert len(list(out.glob("chaos-bench-*.md"))) == 1


def test_unknown_profile_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raftstate",
            "chaos",
            "bench",
            "--profile",
            "nope",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "nope: no such profile; known:" in proc.stderr
