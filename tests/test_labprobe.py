"""``raftstate lab probe``: the WAN emulator measured with ping and iperf3.

The parsing and the configured-quantile arithmetic run anywhere. The smoke run
needs root, the WAN lab and iperf3 (skipped with the reason otherwise): the
command's short probes, as a subprocess, checked for what a broken emulator
would get wrong (delays not applied, a rate limit that does not limit, loss
far from the configured one), never for how fast this box is. About 40 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.labprobe import parse_ping, rtt_quantiles, table
from cluster.natlab import available

REPO = Path(__file__).resolve().parent.parent
_REASON = (
    (available() or (None if shutil.which("iperf3") else "iperf3 missing (scripts/bootstrap.sh)"))
    if os.geteuid() == 0
    else "needs root"
)

PING = """PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.
64 bytes from 10.0.0.1: icmp_seq=1 ttl=63 time=40.3 ms
64 bytes from 10.0.0.1: icmp_seq=3 ttl=63 time=41.9 ms

--- 10.0.0.1 ping statistics ---
3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms
"""


def test_parse_ping_reads_rtts_and_counts() -> None:
    assert parse_ping(PING) == ([40.3, 41.9], 3, 2)
    assert parse_ping("") == ([], 0, 0)


def test_configured_rtt_quantiles() -> None:
    assert rtt_quantiles(20, 0, 0.99) == 40
    # Two U(-10, 10) draws around 30 each: median 60, p99 60 + 20 * (1 - sqrt(0.02)).
    assert rtt_quantiles(30, 10, 0.5) == pytest.approx(60, abs=0.3)
    assert rtt_quantiles(30, 10, 0.99) == pytest.approx(77.17, abs=0.3)
    # FIFO: pings far apart never wait for each other; 10 ms apart under
    # +/- 25 ms of jitter they do, which raises the median, not the top.
    assert rtt_quantiles(75, 25, 0.5, interval_ms=1000) == pytest.approx(150, abs=0.6)
    assert rtt_quantiles(75, 25, 0.5, interval_ms=10) > 160
    assert rtt_quantiles(75, 25, 0.99, interval_ms=10) == pytest.approx(193, abs=1)


def test_table_renders_every_kind_of_row() -> None:
    rows = [
        {"name": "20 ms", "probe": "ping", "samples": 10,
         "configured": {"rtt_p50_ms": 40.0, "rtt_p99_ms": 40.0, "loss": 0.0},
         "measured": {"rtt_p50_ms": 40.3, "rtt_p99_ms": 40.9, "error_p50_ms": 0.3,
                      "error_p99_ms": 0.9, "loss": 0.0}},
        {"name": "loss", "probe": "ping", "samples": 1000,
         "configured": {"rtt_p50_ms": 0.0, "rtt_p99_ms": 0.0, "loss": 0.03},
         "measured": {"rtt_p50_ms": 0.3, "rtt_p99_ms": 0.4, "error_p50_ms": 0.3,
                      "error_p99_ms": 0.4, "loss": 0.031}},
        {"name": "rate", "probe": "iperf3-udp", "samples": 8,
         "configured": {"rate_kbit": 2000.0},
         "measured": {"delivered_kbit": 1990.0, "ratio": 0.995}},
        {"name": "cap", "probe": "capacity", "samples": 100,
         "configured": {}, "measured": {"delivered_pps": 50000.0, "sent_pps": 90000.0,
                                        "lost_percent": 44.0, "emulator_us_per_packet": 18.0}},
    ]  # fmt: skip
    lines = table({"rows": rows})
    assert len(lines) == 6
    assert "+0.30 / +0.90 ms" in lines[2]
    assert "loss 3.10 % of 1000" in lines[3] and "+0.10 points" in lines[3]
    assert "0.995×" in lines[4]
    assert "50,000 pkt/s delivered" in lines[5] and "18.00 µs" in lines[5]


@pytest.mark.skipif(_REASON is not None, reason=str(_REASON))
def test_lab_probe_quick_measures_what_was_configured(tmp_path: Path) -> None:
    stem = tmp_path / "probe"
    res = subprocess.run(
        [sys.executable, "-m", "raftstate", "lab", "probe", "--quick", "--out", str(stem),
         "--dir", str(tmp_path / "lab")],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = {(r["probe"], r["name"]): r for r in result["rows"]}
    delayed = rows[("ping", "20 ms each way")]["measured"]
    assert 40.0 <= delayed["rtt_p50_ms"] < 60.0  # the delay is applied, both ways
    perfect = rows[("ping", "perfect link")]["measured"]
    assert perfect["rtt_p50_ms"] < 20.0
    lossy = rows[("ping", "10 % loss (s1>pub)")]["measured"]
    assert 0.0 < lossy["loss"] < 0.4  # 60 pings: loose, but zero or most means broken
    for proto in ("udp", "tcp"):
        limited = rows[(f"iperf3-{proto}", "rate 2 Mbit/s")]["measured"]
        assert 0.3 < limited["ratio"] <= 1.1, (proto, limited)  # it limits, and passes traffic
    cap = rows[("capacity", "capacity: 64-byte UDP, perfect link")]["measured"]
    assert cap["delivered_pps"] > 1000 and cap["emulator_written"] > 0
    assert stem.with_suffix(".md").read_text().count("\n|") >= 10
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert result["lab_prefix"] and result["lab_prefix"] not in leftover
