"""chaos/benchreport.py and the bench's flag parsing: pure, no cluster."""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from pathlib import Path

import pytest

from bench.stats import LatencySummary
from chaos.bench import parse_transports
from chaos.benchreport import (
    ProfileResult,
    cdf_points,
    plot_cdf,
    render_markdown,
    render_table,
    target_lines,
    transport_ratios,
)


def _result(profile: str, transport: str, scale: float, **changes: object) -> ProfileResult:
    device = [scale * (10 + i % 100) for i in range(1000)]
    commit = [scale * (5 + i % 50) for i in range(200)]
    base = ProfileResult(
        profile=profile,
        transport=transport,
        attempted=1000,
        acked=1000,
        success_rate=1.0,
        heartbeat_ms=LatencySummary.of(device),
        commit_attempted=200,
        commit_acked=200,
        commit_success_rate=1.0,
        commit_ms=LatencySummary.of(commit),
        reads_attempted=10,
        read_ms=LatencySummary.of([1.0] * 10),
        lost_acked=0,
        linearizable=True,
        verifier_ok=True,
        problems=(),
        load_s=5.0,
        cdf=cdf_points(device),
        commit_cdf=cdf_points(commit),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_cdf_points_keep_the_extremes_and_resolve_the_tail() -> None:
    rng = random.Random(7)
    samples = [rng.expovariate(1.0) for _ in range(100_000)]
    points = cdf_points(samples)
    assert points[0] == (round(min(samples), 3), 1e-05)
    assert points[-1] == (round(max(samples), 3), 1.0)
    tail = [f for _, f in points if f > 0.999]
    assert len(tail) >= 50  # enough to draw p99.9 and beyond on a log axis
    assert [f for _, f in points] == sorted(f for _, f in points)
    assert cdf_points([]) == ()


def test_ratios_pair_udp_with_tcp_and_say_when_tcp_lacked_toxics() -> None:
    results = [
        _result("wan", "udp", 1.0),
        _result("wan", "tcp", 2.0),
        _result("weak", "tcp", 1.0, skipped_toxics=("packet_loss", "reorder")),
        _result("weak", "udp", 4.0),
        _result("lan", "udp", 1.0),  # no tcp run: no ratio
    ]
    wan, weak = transport_ratios(results)
    assert wan.profile == "wan" and wan.like_for_like
    assert wan.heartbeat == pytest.approx((0.5, 0.5, 0.5))
    assert wan.commit == pytest.approx((0.5, 0.5, 0.5))
    assert not weak.like_for_like and weak.tcp_skipped == ("packet_loss", "reorder")
    assert weak.heartbeat[0] == pytest.approx(4.0)
    md = render_markdown(results)
    assert "| wan | yes | 0.5 |" in md
    assert "no: tcp without packet_loss, reorder" in md


def test_table_shows_device_and_commit_latency_side_by_side() -> None:
    table = render_table([_result("weak", "udp", 1.0)])
    header, row = table.splitlines()
    assert "device p99" in header and "commit p99" in header
    assert row.startswith("weak/udp") and "100.000%" in row


def test_targets_judge_commit_p99_on_weak_and_keep_the_device_number() -> None:
    met = _result("weak", "udp", 1.0)  # commit p99 54 ms, device p99 108 ms
    missed = _result("weak", "udp", 3.0, success_rate=0.9999)  # commit p99 162 ms
    bad = _result("bad", "udp", 20.0, lost_acked=2)  # device p99.9 2,180 ms
    lines = target_lines([met, missed, bad, _result("lan", "udp", 1.0, linearizable=False)])
    assert lines[0].startswith("weak/udp: commit p99 54.0 ms vs <= 120 ms: met")
    assert "device-observed p99 108.0 ms" in lines[0]
    assert "(the target assumes 100,000)" in lines[0]
    assert "commit p99 162.0 ms vs <= 120 ms: NOT met" in lines[1]
    assert "success 99.990% vs >= 99.999%: NOT met" in lines[1]
    assert "p99.9 2180.0 ms vs < 1000 ms: NOT met" in lines[2]
    assert "lost acked 2: NOT met" in lines[2]
    assert lines[3] == "linearizability violations: in lan/udp"


def test_plot_is_a_png_or_one_line_saying_it_was_skipped(tmp_path: Path) -> None:
    path = tmp_path / "cdf.png"
    said = plot_cdf([_result("wan", "udp", 1.0), _result("wan", "tcp", 2.0)], path)
    if said.startswith("PNG skipped"):
        assert "matplotlib" in said and not path.exists()
    else:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_samples_renders_dashes_not_nan() -> None:
    empty = _result(
        "partition",
        "tcp",
        1.0,
        commit_ms=LatencySummary.of([]),
        commit_cdf=(),
        success_rate=math.nan,
    )
    row = render_table([empty]).splitlines()[1]
    assert "nan" not in row.lower() and " - " in row


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp", ("udp",)),
        ("tcp", ("tcp",)),
        ("udp,tcp", ("udp", "tcp")),
        ("tcp, udp", ("tcp", "udp")),
    ],
)
def test_transport_lists_parse(text: str, expected: tuple[str, ...]) -> None:
    assert parse_transports(text) == expected


@pytest.mark.parametrize("text", ["quic", "udp,udp", "", "udp,sctp"])
def test_bad_transport_lists_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_transports(text)
