"""``raftstate lab bench``: the WAN lab's headline benchmark.

The pure pieces (table, Markdown, target verdicts) run anywhere. The smoke run
needs root and the WAN lab (skipped with the reason otherwise): ``lan`` and
``weak``, raftstate over UDP/ICE only, a few hundred heartbeats, as a
subprocess; it checks the JSON's fields, that nothing acknowledged was lost,
and that no namespace of the run is left behind. About 40 s.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stats import LatencySummary
from chaos.labbench import RunResult, render_markdown, render_table, state_of, target_verdicts
from cluster.natlab import available
from raftstate.model import REPORTED_MAX_BYTES, validate_heartbeat

REPO = Path(__file__).resolve().parent.parent
_REASON = available() if os.geteuid() == 0 else "needs root"


def _result(profile: str, system: str, samples: list[float], sent: int) -> RunResult:
    s = sorted(samples)
    return RunResult(
        profile=profile, system=system, sent=sent, ok=len(s), latency_ms=LatencySummary.of(s),
        success_pct=100.0 * len(s) / sent, acked_lost=0, lost_checked=True,
        node_cpu_s={"n1": 1.0}, cpu_us_per_op=10.0, seconds=1.0, offered_per_s=100.0,
        samples_ms=s,
    )  # fmt: skip


def test_verdicts_count_failures_as_slowest() -> None:
    results = [
        _result("weak", "udp", [50.0] * 1000, 1000),
        _result("bad", "udp", [100.0] * 1000, 1000),
        # tcp: every op acked but slow; etcd: fast but 1 % failed.
        _result("bad", "tcp", [3000.0] * 1000, 1000),
        _result("bad", "etcd", [10.0] * 990, 1000),
    ]
    lines = target_verdicts(results)
    assert lines[0].startswith("target udp on weak: p99 <= 120 ms: met")
    assert "than tcp: met" in lines[1] and "30.0x" in lines[1]
    assert "than etcd: met" in lines[2] and "infx" in lines[2]
    assert lines[3] == (
        "target no leader change or election on weak/bad without a fault: met (3 runs)"
    )
    assert lines[4] == "target zero acknowledged heartbeats lost: met"
    table = render_table(results)
    assert "p99.9 ms" in table and "3000" in table
    assert render_markdown(results).count("\n") == len(results) + 1


def test_verdict_missed() -> None:
    lines = target_verdicts([_result("weak", "udp", [200.0] * 100, 100)])
    assert "MISSED (200.0 ms" in lines[0]


def test_an_election_on_bad_misses_the_no_churn_target_and_shows_in_the_table() -> None:
    r = _result("bad", "udp", [100.0] * 100, 100)
    r.elections, r.term_increments = 1, 1
    lines = target_verdicts([r])
    assert any(
        line.startswith("target no leader change or election on weak/bad without a fault: MISSED")
        and "1 elections, term +1" in line
        for line in lines
    ), lines
    header, _rule, row = render_table([r]).splitlines()
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()),
                     strict=True))
    assert "elections" in header and "term+" in header
    assert cells["elections"] == "1" and cells["term+"] == "1"


@pytest.mark.skipif(_REASON is not None, reason=f"WAN lab unavailable: {_REASON}")
def test_bench_states_span_the_size_range_and_are_valid_heartbeats() -> None:
    """``--state-bytes N``: sizes uniform over 0..N (both ends reached), the
    same for every system (seeded by the op number), each a valid report up
    to the largest the CLI allows."""
    for n in (1, 100, REPORTED_MAX_BYTES - 64):
        sizes = [len(state_of(k, n)["p"]) for k in range(3000)]
        assert min(sizes) <= n // 50 and max(sizes) >= n - max(1, n // 50), (n, min(sizes))
        assert [len(state_of(k, n)["p"]) for k in range(50)] == sizes[:50]
        for k in range(200):
            validate_heartbeat("d", 1, state_of(k, n), 0)
    assert state_of(7, 0) == {"k": "7"}


def test_lab_bench_smoke(tmp_path: Path) -> None:
    stem = tmp_path / "out"
    prefix_file = tmp_path / "bench"
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "raftstate", "lab", "bench", "--profile", "lan,weak",
         "--systems", "udp", "--heartbeats", "300", "--rate", "100",
         "--state-bytes", str(REPORTED_MAX_BYTES - 64),
         "--dir", str(prefix_file), "--out", str(stem)],
        capture_output=True, text=True, cwd=REPO, timeout=85,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(stem.with_suffix(".json").read_text())
    assert doc["meta"]["heartbeats"] == 300
    assert doc["meta"]["state_bytes"] == REPORTED_MAX_BYTES - 64
    rows = {(r["profile"], r["system"]): r for r in doc["results"]}
    assert set(rows) == {("lan", "udp"), ("weak", "udp")}
    for r in rows.values():
        assert r["sent"] == 300
        assert r["lost_checked"] and r["acked_lost"] == 0, r
        assert r["success_pct"] >= 99.0, r
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"] < 5000
        assert set(r["node_cpu_s"]) == {"n1", "n2", "n3"}
        assert set(r["per_site"]) == {"s1", "s2", "s3"}
        assert sum(s["ok"] for s in r["per_site"].values()) == r["ok"]
        assert r["leader"] in {"n1", "n2", "n3"}
        assert not any("differ" in note for note in r["notes"]), r["notes"]
        assert not math.isnan(r["cpu_us_per_op"])
        assert r["wan_tx_bytes"] > 0 and r["wire_bytes_per_op"] > 0, r
        assert r["leader_changes"] >= 0
        # elections are counted in every row (a clean run starts none)
        assert r["elections"] == 0 and r["term_increments"] == 0, r
        assert set(r["timers"]) == {"n1", "n2", "n3"}
    # weak adds a 60 ms RTT to every commit; lan adds none.
    assert rows[("weak", "udp")]["latency_ms"]["p50"] > rows[("lan", "udp")]["latency_ms"]["p50"]
    assert any(t.startswith("target udp on weak") for t in doc["targets"])
    md = stem.with_suffix(".md").read_text()
    assert "| weak | udp | 300 |" in md
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=True).stdout.split())  # fmt: skip
    leftover = {n for n in after - before if n.startswith("lb")}
    assert not leftover, leftover
