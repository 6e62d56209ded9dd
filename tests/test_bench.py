"""``raftstate bench``: the pure pieces (arrival schedule, phase plans, ratios)
and one short real run of the read phases against a local cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import LoadResult, LoadSpec, _open_loop, _unary_op, arrival_offsets
from bench.phases import (
    DEFAULT_PHASES,
    PHASES,
    follower_endpoint,
    load_specs,
    phase_label,
    split_evenly,
)
from bench.run import _phases, add_bench_arguments
from bench.stats import (
    LatencySummary,
    PhaseResult,
    ratios,
    render_table,
    target_verdicts,
)

ENDPOINTS = ["leader:1", "f1:2", "f2:3"]


def bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


# ---- open-loop arrival schedule ------------------------------------------


def test_fixed_arrivals_are_evenly_spaced_and_exactly_rate_times_span() -> None:
    at = list(arrival_offsets(100.0, 1.0, random.Random(0), poisson=False))
    assert len(at) == 100
    assert at[0] == 0.0
    assert all(b - a == pytest.approx(0.01) for a, b in zip(at, at[1:], strict=False))


def test_poisson_arrivals_are_increasing_in_span_with_the_offered_mean_rate() -> None:
    at = list(arrival_offsets(1000.0, 10.0, random.Random(7)))
    assert all(0 <= a < b < 10.0 for a, b in zip(at, at[1:], strict=False))
    # 10000 expected; the Poisson standard deviation is 100.
    assert abs(len(at) - 10_000) < 500
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.001, rel=0.05)
    # Exponential gaps: about 1/e of them exceed the mean.
    assert sum(g > 0.001 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.03)


def test_poisson_arrivals_are_determined_by_the_injected_rng() -> None:
    a = list(arrival_offsets(500.0, 2.0, random.Random(3)))
    b = list(arrival_offsets(500.0, 2.0, random.Random(3)))
    c = list(arrival_offsets(500.0, 2.0, random.Random(4)))
    assert a == b
    assert a != c


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan, math.inf])
def test_arrival_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        next(arrival_offsets(rate, 1.0, random.Random(0)))


class _Recorder:
    """A Target that records calls; reads can be held until released."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.hold = hold

    async def write(self, device_id: str, seq: int) -> None:
        self.calls.append(("write", device_id))

    async def read(self, device_id: str, linearizable: bool) -> None:
        self.calls.append(("lin" if linearizable else "ser", device_id))
        if self.hold is not None:
            await self.hold.wait()

    async def close(self) -> None:
        return None


def _spec(op: str, devices: int) -> LoadSpec:
    return LoadSpec("raftstate", ("x:1",), op, 0, devices, time.time(), 0.0, 1.0)


def test_open_loop_counts_arrivals_over_the_in_flight_bound_as_dropped_errors() -> None:
    async def main() -> tuple[LoadResult, _Recorder]:
        hold = asyncio.Event()
        target = _Recorder(hold)
        # 20 arrivals in 20 ms, none answered until well after the last one.
        spec = LoadSpec(
            "raftstate", ("x:1",), "read-linearizable", 0, 2, time.time(), 0.0, 0.02,
            mode="open", rate_per_s=1000.0, poisson=False,
        )  # fmt: skip
        result = LoadResult()

        async def release_after_last_arrival() -> None:
            while len(result.lags_ms) < 20:
                await asyncio.sleep(0.001)
            hold.set()

        releaser = asyncio.create_task(release_after_last_arrival())
        await _open_loop(spec, _unary_op(spec, target), result, 1)
        await releaser
        return result, target

    result, target = asyncio.run(main())
    assert len(target.calls) == 2
    assert result.dropped == 18
    assert result.errors == 18
    assert len(result.latencies_ms) == 2
    assert len(result.lags_ms) == 20
    assert any("in flight" in s for s in result.error_samples)


def test_mixed_alternates_heartbeats_and_linearizable_reads_half_each() -> None:
    async def main() -> tuple[list[str | None], _Recorder]:
        target = _Recorder()
        op = _unary_op(_spec("mixed", 4), target)
        kinds = [await op(f"d{i}", 1, i) for _ in range(3) for i in range(4)]
        return kinds, target

    kinds, target = asyncio.run(main())
    assert kinds.count("heartbeat") == kinds.count("read") == 6
    # Each device alternates; even devices start with a heartbeat, odd with a read.
    assert [k for k, d in target.calls if d == "d0"] == ["write", "lin", "write"]
    assert [k for k, d in target.calls if d == "d1"] == ["lin", "write", "lin"]


# ---- phase plans -----------------------------------------------------------


def test_split_evenly_deals_the_remainder_to_the_first_parts() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(1, 2) == [1, 0]


def test_follower_endpoint_deals_processes_over_followers_never_the_leader() -> None:
    assert [follower_endpoint(ENDPOINTS, i) for i in range(4)] == ["f1:2", "f2:3", "f1:2", "f2:3"]
    with pytest.raises(ValueError, match="at least 2"):
        follower_endpoint(["leader:1"], 0)


def test_follower_phase_pins_each_process_to_one_follower() -> None:
    args = bench_args("--procs", "2", "--devices", "9")
    specs = load_specs("raftstate", "read-lin-follower", ENDPOINTS, args, 0.0)
    assert [s.endpoints for s in specs] == [("f1:2",), ("f2:3",)]
    assert all(s.pinned and s.op == "read-linearizable" and s.mode == "unary" for s in specs)
    assert [(s.first_device, s.devices) for s in specs] == [(0, 5), (5, 4)]


def test_leader_and_open_loop_phases_use_all_endpoints_unpinned() -> None:
    args = bench_args("--procs", "2", "--read-rate", "800", "--arrivals", "fixed")
    for phase, op in (("read-ser-leader", "read-serializable"), ("mixed", "mixed")):
        specs = load_specs("etcd", phase, ENDPOINTS, args, 0.0)
        assert all(s.endpoints == tuple(ENDPOINTS) and not s.pinned and s.op == op for s in specs)
    specs = load_specs("etcd", "read-lin-open", ENDPOINTS, args, 0.0)
    assert [s.mode for s in specs] == ["open", "open"]
    assert sum(s.rate_per_s for s in specs) == 800
    assert len({s.seed for s in specs}) == 2
    assert not any(s.poisson for s in specs)


def test_sequential_phase_is_one_process_one_device() -> None:
    specs = load_specs("raftstate", "sequential", ENDPOINTS, bench_args("--procs", "3"), 0.0)
    assert [(s.devices, s.max_ops) for s in specs] == [(1, 1000)]


def test_phases_are_run_in_canonical_order_and_unknown_ones_rejected() -> None:
    assert _phases("read-ser-open,sequential") == ("sequential", "read-ser-open")
    assert set(DEFAULT_PHASES) <= set(PHASES)
    with pytest.raises(argparse.ArgumentTypeError, match="read-fast"):
        _phases("read-fast")


def test_phase_labels_start_with_the_phase_name() -> None:
    args = bench_args("--devices", "64", "--read-rate", "500")
    assert phase_label("raftstate", "read-lin-follower", args) == "read-lin-follower c=64"
    assert phase_label("etcd", "read-ser-open", args) == "read-ser-open r=500"
    assert phase_label("etcd", "stream", args).startswith("gateway ")


# ---- ratios and verdicts ---------------------------------------------------


def _result(system: str, phase: str, ops: float, p99: float, errors: int = 0) -> PhaseResult:
    lat = LatencySummary(100, p99 / 2, p99, p99, p99, p99, p99 / 2)
    offered = 1000.0 if phase.endswith("-open") else 0.0
    return PhaseResult(
        system, f"{phase} c=8", ops, lat, errors, 0.0, {"a": 1.0}, 1.0, (), offered_per_s=offered
    )


def test_ratios_compare_read_throughput_and_open_loop_p99() -> None:
    results = [
        _result("raftstate", "read-lin-leader", 3000, 5),
        _result("raftstate", "read-lin-follower", 2000, 8),
        _result("raftstate", "read-lin-open", 1000, 6),
        _result("raftstate", "read-ser-open", 1000, 4),
        _result("etcd", "read-lin-leader", 6000, 2),
        _result("etcd", "read-lin-follower", 5000, 3),
        _result("etcd", "read-lin-open", 1000, 1.5),
        _result("etcd", "read-ser-open", 1000, 0.5),
    ]
    r = ratios(results)
    assert r["read_lin_leader_throughput_raftstate_over_etcd"] == 0.5
    assert r["read_lin_follower_throughput_raftstate_over_etcd"] == 0.4
    assert r["open_read_p99_lin_over_ser_raftstate"] == 1.5
    assert r["open_read_p99_lin_over_ser_etcd"] == 3.0
    assert r["open_read_lin_p99_ms_raftstate"] == 6
    assert "read_ser_leader_throughput_raftstate_over_etcd" not in r
    verdicts = target_verdicts(results)
    assert verdicts[0].startswith("target raftstate") and ": met (1.5x)" in verdicts[0]
    assert verdicts[1].startswith("target etcd") and "MISSED (3.0x)" in verdicts[1]


def test_open_loop_target_is_missed_when_a_phase_had_errors() -> None:
    results = [
        _result("raftstate", "read-lin-open", 900, 4, errors=3),
        _result("raftstate", "read-ser-open", 1000, 4),
    ]
    (verdict,) = target_verdicts(results)
    assert "MISSED (1.0x, with errors)" in verdict


def test_table_rows_line_up_with_the_header() -> None:
    lines = render_table([_result("raftstate", "read-ser-follower", 12345, 3.5)]).splitlines()
    assert len(lines[2]) == len(lines[0]) == len(lines[1])


# ---- a real run --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cluster
def test_bench_read_phases_run_against_a_local_cluster(tmp_path: Path) -> None:
    out = tmp_path / "results"
    phases = ["sequential", "write", "read-lin-follower", "read-ser-leader"]
    proc = subprocess.run(
        [
            sys.executable, "-m", "raftstate", "bench",
            "--duration", "1", "--warmup", "0.5", "--sequential", "20",
            "--devices", "8", "--procs", "1",
            "--phases", ",".join(phases), "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("bench-*.json")
    record = json.loads(path.read_text())
    assert record["phases"] == phases
    by_phase = {r["phase"].split()[0]: r for r in record["results"]}
    assert list(by_phase) == phases
    for name, r in by_phase.items():
        assert r["system"] == "raftstate"
        assert r["ops_per_s"] > 0, name
        assert r["latency_ms"]["count"] > 0, name
        assert r["errors"] == 0, (name, r["error_samples"])
    assert "read-lin-follower c=8" in proc.stdout
