"""Sans-IO tests of the chaos proxy's toxics: no sockets, no clock, seeded random."""

from __future__ import annotations

import random

import pytest

from chaos.proxy.toxics import (
    Close,
    DatagramPipe,
    LossModel,
    Send,
    Stream,
    StreamPipe,
    ToxicityRoll,
    ToxicSpec,
    bandwidth_slices,
    latency_delay_s,
    slice_sizes,
)

DOWN = Stream.DOWNSTREAM


def toxic(kind: str, name: str | None = None, toxicity: float = 1.0, **attrs: float) -> ToxicSpec:
    return ToxicSpec(name or kind, kind, DOWN, toxicity, attrs)


def sends(actions: list[Send | Close]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def test_latency_with_jitter_stays_within_bounds() -> None:
    rng = random.Random(1)
    delays = [latency_delay_s(100, 20, rng) for _ in range(5000)]
    assert min(delays) >= 0.080 and max(delays) <= 0.120
    assert 0.098 < sum(delays) / len(delays) < 0.102
    assert max(delays) - min(delays) > 0.035  # jitter is actually used


def test_latency_never_negative_when_jitter_exceeds_latency() -> None:
    rng = random.Random(2)
    assert all(latency_delay_s(5, 50, rng) >= 0 for _ in range(1000))


def test_several_latency_toxics_add_up() -> None:
    pipe = StreamPipe(random.Random(3))
    pipe.set_toxics(0.0, [toxic("latency", "a", latency=100), toxic("latency", "b", latency=50)])
    assert pipe.feed(10.0, b"x") == [Send(10.15, b"x")]


def test_no_toxics_sends_immediately() -> None:
    pipe = StreamPipe(random.Random(4))
    assert pipe.feed(5.0, b"abc") == [Send(5.0, b"abc")]


def test_jitter_never_reorders_a_tcp_stream() -> None:
    pipe = StreamPipe(random.Random(5))
    pipe.set_toxics(0.0, [toxic("latency", latency=50, jitter=50)])
    times = [s.at for i in range(500) for s in sends(pipe.feed(i * 0.001, b"x"))]
    assert times == sorted(times)


def test_bandwidth_paces_at_rate_in_kilobytes_per_second() -> None:
    pipe = StreamPipe(random.Random(6))
    pipe.set_toxics(0.0, [toxic("bandwidth", rate=10)])  # 10 KB/s = 10_000 B/s
    out = sends(pipe.feed(0.0, b"x" * 5000))
    assert sum(len(s.data) for s in out) == 5000
    assert out[-1].at == pytest.approx(0.5)
    assert all(len(s.data) <= 1000 for s in out)  # 100 ms worth per piece
    more = sends(pipe.feed(0.1, b"y" * 1000))  # queued behind the first chunk
    assert more[-1].at == pytest.approx(0.6)


def test_bandwidth_zero_or_negative_is_unlimited() -> None:
    assert bandwidth_slices(10_000, 0) == [10_000]
    assert bandwidth_slices(10_000, -5) == [10_000]
    pipe = StreamPipe(random.Random(7))
    pipe.set_toxics(0.0, [toxic("bandwidth", rate=0)])
    assert pipe.feed(1.0, b"z" * 100) == [Send(1.0, b"z" * 100)]


def test_slicer_sizes_sum_and_stay_within_variation() -> None:
    rng = random.Random(8)
    for length in (1, 7, 100, 4096):
        sizes = slice_sizes(length, 10, 4, rng)
        assert sum(sizes) == length
        assert all(1 <= s <= 14 for s in sizes)
        assert all(s >= 6 for s in sizes[:-1])
    assert slice_sizes(50, 0, 0, rng) == [50]


def test_slicer_spaces_writes_by_delay_microseconds() -> None:
    pipe = StreamPipe(random.Random(9))
    pipe.set_toxics(0.0, [toxic("slicer", average_size=10, size_variation=0, delay=1000)])
    out = sends(pipe.feed(0.0, bytes(range(35))))
    assert [len(s.data) for s in out] == [10, 10, 10, 5]
    assert [s.at for s in out] == pytest.approx([0.0, 0.001, 0.002, 0.003])
    assert b"".join(s.data for s in out) == bytes(range(35))


def test_limit_data_truncates_then_closes() -> None:
    pipe = StreamPipe(random.Random(10))
    pipe.set_toxics(0.0, [toxic("limit_data", bytes=8)])
    assert pipe.feed(0.0, b"12345") == [Send(0.0, b"12345")]
    assert pipe.feed(1.0, b"67890") == [Send(1.0, b"678"), Close(1.0)]
    assert pipe.feed(2.0, b"more") == []


def test_timeout_drops_data_and_closes_after_timeout() -> None:
    pipe = StreamPipe(random.Random(11))
    assert pipe.set_toxics(1.0, [toxic("timeout", timeout=500)]) == [Close(1.5)]
    assert pipe.feed(1.2, b"lost") == []


def test_timeout_zero_never_closes_but_removing_it_does() -> None:
    pipe = StreamPipe(random.Random(12))
    assert pipe.set_toxics(0.0, [toxic("timeout", timeout=0)]) == []
    assert pipe.feed(1.0, b"lost") == []
    assert pipe.set_toxics(2.0, []) == [Close(2.0)]


def test_reset_peer_closes_with_reset_after_timeout() -> None:
    pipe = StreamPipe(random.Random(13))
    assert pipe.set_toxics(0.0, [toxic("reset_peer", timeout=200)]) == [Close(0.2, reset=True)]
    assert pipe.set_toxics(0.1, [toxic("reset_peer", timeout=200)]) == []  # armed once


def test_slow_close_delays_the_close_after_pending_data() -> None:
    pipe = StreamPipe(random.Random(14))
    pipe.set_toxics(0.0, [toxic("slow_close", delay=300), toxic("latency", latency=100)])
    pipe.feed(0.0, b"x")
    assert pipe.on_eof(0.05) == [Close(pytest.approx(0.4))]


def test_toxicity_is_rolled_once_per_connection() -> None:
    spec = toxic("latency", toxicity=0.3, latency=10)
    rolls = [ToxicityRoll(random.Random(i)) for i in range(4000)]
    first = [bool(r.filter([spec])) for r in rolls]
    assert 0.27 < sum(first) / len(first) < 0.33
    assert [bool(r.filter([spec])) for r in rolls] == first  # sticky per connection


def test_toxicity_zero_never_applies_and_one_always_does() -> None:
    roll = ToxicityRoll(random.Random(15))
    assert roll.filter([toxic("latency", "never", toxicity=0.0)]) == []
    assert len(roll.filter([toxic("latency", "always", toxicity=1.0)])) == 1


def test_loss_rate_holds_over_many_samples_with_and_without_correlation() -> None:
    for correlation in (0.0, 0.5, 0.9):
        rng = random.Random(16)
        model = LossModel()
        lost = [model.lost(0.2, correlation, rng) for _ in range(200_000)]
        assert sum(lost) / len(lost) == pytest.approx(0.2, abs=0.015)


def test_correlation_makes_losses_bursty() -> None:
    def mean_burst(correlation: float) -> float:
        rng, model = random.Random(17), LossModel()
        lost = [model.lost(0.2, correlation, rng) for _ in range(100_000)]
        bursts = sum(1 for a, b in zip([False, *lost], lost, strict=False) if b and not a)
        return sum(lost) / bursts

    assert mean_burst(0.0) == pytest.approx(1.25, rel=0.05)  # 1 / (1 - p)
    assert mean_burst(0.8) > 3 * mean_burst(0.0)


def test_packet_loss_extremes_drop_all_or_nothing() -> None:
    pipe = DatagramPipe(random.Random(18))
    pipe.set_toxics([toxic("packet_loss", loss_rate=1.0)])
    assert all(pipe.feed(0.0, b"d") == [] for _ in range(100))
    pipe.set_toxics([toxic("packet_loss", loss_rate=0.0)])
    assert all(pipe.feed(0.0, b"d") == [Send(0.0, b"d")] for _ in range(100))


def test_duplicate_probability_sends_two_copies() -> None:
    pipe = DatagramPipe(random.Random(19))
    pipe.set_toxics([toxic("duplicate", probability=1.0)])
    assert pipe.feed(1.0, b"d") == [Send(1.0, b"d"), Send(1.0, b"d")]
    pipe.set_toxics([toxic("duplicate", probability=0.25)])
    copies = [len(pipe.feed(0.0, b"d")) for _ in range(20_000)]
    assert sum(c == 2 for c in copies) / len(copies) == pytest.approx(0.25, abs=0.02)


def test_reorder_holds_datagrams_back_so_later_ones_overtake() -> None:
    pipe = DatagramPipe(random.Random(20))
    pipe.set_toxics([toxic("reorder", probability=0.5, delay=10)])
    out = [(s.at, i) for i in range(200) for s in pipe.feed(i * 0.001, bytes([i]))]
    delayed = [i for at, i in out if at > i * 0.001]
    assert 0.35 < len(delayed) / 200 < 0.65
    arrival_order = [i for _, i in sorted(out)]
    assert arrival_order != list(range(200))


def test_udp_bandwidth_paces_datagrams() -> None:
    pipe = DatagramPipe(random.Random(21))
    pipe.set_toxics([toxic("bandwidth", rate=1)])  # 1000 B/s
    times = [pipe.feed(0.0, b"x" * 100)[0].at for _ in range(5)]
    assert times == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_same_seed_same_decisions() -> None:
    def run(seed: int) -> list[float]:
        pipe = DatagramPipe(random.Random(seed))
        pipe.set_toxics(
            [toxic("latency", latency=10, jitter=5), toxic("packet_loss", loss_rate=0.3)]
        )
        return [s.at for i in range(100) for s in pipe.feed(float(i), b"d")]

    assert run(22) == run(22)
    assert run(22) != run(23)
