"""``raftstate chaos bench`` end to end: a short lan run through every proxy,
on our UDP transport and on pysyncobj's TCP side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def test_lan_run_on_both_transports_acks_everything_and_reports_the_ratio(
    tmp_path: Path,
) -> None:
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
        "--transport",
        "udp,tcp",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 lost acked, all verified" in proc.stdout
    (path,) = out.glob("chaos-bench-*.json")
    record = json.loads(path.read_text())
    assert [(r["profile"], r["transport"]) for r in record["results"]] == [
        ("lan", "udp"),
        ("lan", "tcp"),
    ]
    for result in record["results"]:
        assert result["attempted"] == 300 and result["success_rate"] == 1.0
        assert result["lost_acked"] == 0
        assert result["linearizable"] is True and result["verifier_ok"] is True
        assert result["heartbeat_ms"]["count"] == 300
        assert result["commit_ms"]["count"] > 0  # the probes at the leader
    (ratio,) = record["transport_ratios"]
    assert ratio["profile"] == "lan" and ratio["like_for_like"] is True
    assert all(v > 0 for v in ratio["heartbeat"])
    assert "UDP / TCP latency ratio" in proc.stdout
    assert len(list(out.glob("chaos-bench-*.md"))) == 1
    (png,) = out.glob("chaos-bench-*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


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
