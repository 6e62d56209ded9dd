"""``raftstate bench --transport``: the pure pieces (CPU accounting, medians,
ratio verdict, options), the in-process transport-cost micro-benchmark, and
one tiny real run of hb-open + transport-cost on both transports."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import LoadResult, LoadSpec, _open_loop, _unary_op
from bench.proccpu import CLK_TCK, CpuSample, cpu_between
from bench.run import add_bench_arguments
from bench.stats import LatencySummary, PhaseResult
from bench.transportcost import measure, render_costs
from bench.transportreport import (
    CPU_METRIC,
    HbCpuResult,
    clean_note,
    cpu_ratio_line,
    hb_cpu_result,
    per_round_ratios,
    render_hb_runs,
    render_summary,
    summarize,
)
from bench.transports import chosen_transports, comparing
from raftstate.config import NodeConfig


def bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(list(argv))


# ---- options --------------------------------------------------------------


def test_transport_option_is_repeatable_or_comma_separated_in_given_order() -> None:
    assert chosen_transports(bench_args("--transport", "udp", "--transport", "tcp")) == (
        "udp",
        "tcp",
    )
    assert chosen_transports(bench_args("--transport", "tcp,udp,tcp")) == ("tcp", "udp")


def test_unknown_transport_is_rejected() -> None:
    with pytest.raises(SystemExit):
        bench_args("--transport", "quic")


def test_comparison_phases_alone_select_the_comparison_on_the_default_transport() -> None:
    args = bench_args("--phases", "transport-cost")
    assert comparing(args)
    assert chosen_transports(args) == (NodeConfig.default().transport,)
    assert not comparing(bench_args("--phases", "write"))


# ---- process CPU ----------------------------------------------------------


def test_cpu_uses_per_thread_nanoseconds_when_every_thread_survived() -> None:
    before = CpuSample({1: 1_000_000_000, 2: 0}, ticks=100)
    after = CpuSample(
        {1: 1_250_000_000, 2: 500_000_000, 3: 10_000_000}, ticks=100 + 3 * CLK_TCK // 4
    )
    delta = cpu_between(before, after)
    assert delta.source == "schedstat"
    assert delta.seconds == pytest.approx(0.76)


def test_cpu_falls_back_to_ticks_when_a_thread_vanished_or_the_ticks_ran_ahead() -> None:
    before = CpuSample({1: 0, 2: 0}, ticks=0)
    vanished = CpuSample({1: 100_000_000}, ticks=CLK_TCK)
    assert cpu_between(before, vanished).source == "stat"
    assert cpu_between(before, vanished).seconds == pytest.approx(1.0)
    short_lived = CpuSample({1: 100_000_000, 2: 0}, ticks=CLK_TCK)  # 1 s of ticks, 0.1 s of ns
    assert cpu_between(before, short_lived).source == "stat"
    assert cpu_between(None, vanished).seconds == 0.0


# ---- results and summary --------------------------------------------------


def _hb(transport: str, round_no: int, cpu: dict[str, float], committed: int = 1000) -> HbCpuResult:
    return hb_cpu_result(
        transport, round_no, offered_per_s=100.0, duration_s=10.0, committed=committed,
        entries=250, acked=committed, errors=0, leader="n1", leader_changed=False,
        node_cpu_s=cpu, cpu_source="schedstat", latencies_ms=[1.0, 2.0, 3.0],
        load_cpu_s=0.5, other_cpu_s=0.1,
    )  # fmt: skip


def test_cpu_per_committed_heartbeat_is_split_between_leader_and_followers() -> None:
    r = hb_cpu_result(
        "udp", 1, offered_per_s=100.0, duration_s=10.0, committed=1000, entries=250,
        acked=990, errors=0, leader="n2", leader_changed=False,
        node_cpu_s={"n1": 0.1, "n2": 0.3, "n3": 0.1}, cpu_source="schedstat",
        latencies_ms=[1.0], load_cpu_s=0.0, other_cpu_s=0.0,
    )  # fmt: skip
    assert r.cpu_us_per_hb == pytest.approx(500.0)
    assert r.leader_us_per_hb == pytest.approx(300.0)
    assert r.followers_us_per_hb == pytest.approx(200.0)
    assert r.hb_per_entry == 4.0
    assert r.cpu_us_per_entry == pytest.approx(2000.0)
    assert r.committed_per_s == 100.0


def test_nothing_committed_gives_nan_not_a_division_error() -> None:
    r = _hb("tcp", 1, {"n1": 0.1}, committed=0)
    assert math.isnan(r.cpu_us_per_hb)


def test_summary_takes_medians_over_rounds_and_the_udp_over_tcp_ratio() -> None:
    hb = [
        _hb("udp", 1, {"n1": 0.6, "n2": 0.2, "n3": 0.2}),  # 1000 us/hb
        _hb("tcp", 1, {"n1": 0.5, "n2": 0.1, "n3": 0.1}),  # 700
        _hb("udp", 2, {"n1": 0.7, "n2": 0.2, "n3": 0.2}),  # 1100
        _hb("tcp", 2, {"n1": 0.6, "n2": 0.1, "n3": 0.1}),  # 800
        _hb("udp", 3, {"n1": 5.0, "n2": 0.2, "n3": 0.2}),  # outlier round
        _hb("tcp", 3, {"n1": 0.5, "n2": 0.1, "n3": 0.1}),
    ]
    rows = summarize(hb, [], [], ("udp", "tcp"))
    cpu = next(r for r in rows if r.name == CPU_METRIC)
    assert cpu.medians == {"udp": pytest.approx(1100.0), "tcp": pytest.approx(700.0)}
    assert cpu.ratio == pytest.approx(1100 / 700, abs=1e-3)
    ratios = [r.ratio for r in per_round_ratios(hb)]
    assert ratios == pytest.approx([1000 / 700, 1100 / 800, 5400 / 700], abs=1e-3)
    assert all(r.clean for r in per_round_ratios(hb))
    assert clean_note(hb, ("udp", "tcp")) is None
    line = cpu_ratio_line(rows)
    assert (
        line == "UDP/TCP CPU per committed heartbeat = 1.57\u00d7 (target \u2264 1.5\u00d7): MISSED"
    )
    assert "udp/tcp" in render_summary(rows, ("udp", "tcp"))
    assert "n1*=" in render_hb_runs(hb)


def test_medians_leave_out_runs_that_could_not_keep_up_with_the_offered_rate() -> None:
    starved = hb_cpu_result(
        "tcp", 2, offered_per_s=100.0, duration_s=10.0, committed=600, entries=60,
        acked=600, errors=40, leader="n1", leader_changed=False,
        node_cpu_s={"n1": 0.2, "n2": 0.05, "n3": 0.05}, cpu_source="schedstat",
        latencies_ms=[900.0], load_cpu_s=0.0, other_cpu_s=5.0,
    )  # fmt: skip
    hb = [
        _hb("udp", 1, {"n1": 0.6, "n2": 0.2, "n3": 0.2}),  # 1000 us/hb
        _hb("tcp", 1, {"n1": 0.5, "n2": 0.1, "n3": 0.1}),  # 700
        _hb("udp", 2, {"n1": 0.6, "n2": 0.2, "n3": 0.2}),
        starved,  # 500 us/hb on big batches: not the same work
    ]
    assert not starved.clean
    cpu = next(r for r in summarize(hb, [], [], ("udp", "tcp")) if r.name == CPU_METRIC)
    assert cpu.medians["tcp"] == pytest.approx(700.0)
    assert cpu.runs["tcp"] == [700.0]
    assert [(r.round, r.clean) for r in per_round_ratios(hb)] == [(1, True), (2, False)]
    assert clean_note(hb, ("udp", "tcp")) == (
        "hb-open medians use clean runs only (no errors, >= 95% of offered committed, "
        "one leader): udp 2/2, tcp 1/2"
    )
    assert "not clean" in render_hb_runs(hb)


def test_closed_loop_phases_are_summarized_per_phase_name() -> None:
    lat = LatencySummary.of([1.0, 2.0])

    def row(system: str, ops: float) -> PhaseResult:
        return PhaseResult(system, "write c=8 #1", ops, lat, 0, 0.0, {}, 1.0, ())

    rows = summarize([], [row("udp", 800.0), row("tcp", 1000.0)], [], ("udp", "tcp"))
    ops = next(r for r in rows if r.name == "write ops/s")
    assert ops.ratio == pytest.approx(0.8)
    assert cpu_ratio_line(rows) is None


# ---- open-loop heartbeats -------------------------------------------------


class _Writes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def write(self, device_id: str, seq: int) -> None:
        self.calls.append((device_id, seq))

    async def read(self, device_id: str, linearizable: bool) -> None:
        raise AssertionError("hb-open only writes")

    async def close(self) -> None:
        return None


def test_open_loop_heartbeats_carry_a_new_seq_every_arrival() -> None:
    spec = LoadSpec(
        "raftstate", ("x:1",), "write", 0, 20, time.time(), 0.0, 0.01,
        mode="open", rate_per_s=1000.0, poisson=False,
    )  # fmt: skip
    target = _Writes()
    result = LoadResult()
    asyncio.run(_open_loop(spec, _unary_op(spec, target), result, 100))
    assert result.dropped == 0
    assert [s for _, s in target.calls] == list(range(101, 111))
    assert [d for d, _ in target.calls] == [f"bench-{i:07d}" for i in range(10)]


# ---- transport-cost micro-benchmark ---------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_transport_cost_delivers_every_message_and_reports_positive_costs(transport: str) -> None:
    cost = measure(transport, iterations=60, warmup=10, blocks=3)
    assert cost.transport == transport
    for name in ("send_us", "recv_us", "reply_send_us", "reply_recv_us", "exchange_us"):
        assert getattr(cost, name) > 0, name
    assert cost.exchange_us >= cost.send_us + cost.recv_us
    assert cost.message_bytes > 300  # an AppendEntries with four heartbeats
    # One wire unit per message at least; tcp has no timers and exactly one.
    assert cost.datagrams_per_exchange >= 2
    if transport == "tcp":
        assert cost.datagrams_per_exchange == 2 and cost.timer_us == 0
    assert transport in render_costs([cost])


def test_transport_cost_rejects_unknown_transports() -> None:
    with pytest.raises(ValueError, match="transport"):
        measure("quic", iterations=10, warmup=0, blocks=1)


# ---- one tiny real run ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.cluster
def test_bench_transport_compares_udp_and_tcp_on_real_clusters(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable, "-m", "raftstate", "bench", "--transport", "udp,tcp",
            "--phases", "hb-open,transport-cost", "--rounds", "1",
            "--duration", "1", "--warmup", "0.5", "--hb-rate", "100",
            "--procs", "1", "--devices", "64", "--cost-iterations", "200",
            "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    # 1 = some heartbeats failed (a loaded box); the record must still be whole.
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("bench-*.json")
    record = json.loads(path.read_text())
    assert record["transports"] == ["udp", "tcp"]
    assert record["phases"] == ["hb-open", "transport-cost"]
    hb = {r["transport"]: r for r in record["hb_cpu"]}
    assert set(hb) == {"udp", "tcp"}
    for transport, r in hb.items():
        assert r["committed"] > 0, transport
        assert r["entries"] > 0, transport
        assert len(r["node_cpu_s"]) == 3, transport
        assert all(v > 0 for v in r["node_cpu_s"].values()), transport
        for name in ("cpu_us_per_hb", "leader_us_per_hb", "followers_us_per_hb"):
            assert r[name] > 0, (transport, name)
        assert r["cpu_us_per_hb"] == pytest.approx(
            r["leader_us_per_hb"] + r["followers_us_per_hb"], abs=0.2
        )
        assert r["leader"] in r["node_cpu_s"]
    costs = {c["transport"]: c for c in record["transport_cost"]}
    assert set(costs) == {"udp", "tcp"}
    for transport, c in costs.items():
        assert c["send_us"] > 0 and c["recv_us"] > 0, transport
    assert record["cpu_per_committed_hb_ratio"] > 0
    assert record["verdict"].startswith("UDP/TCP CPU per committed heartbeat = ")
    assert "UDP/TCP CPU per committed heartbeat = " in proc.stdout
    assert record["command"].startswith("raftstate bench --transport udp,tcp")
