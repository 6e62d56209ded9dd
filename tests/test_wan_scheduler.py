"""Sans-IO tests of the WAN emulator's scheduler and classifier: no I/O, no clock, seeded random."""

from __future__ import annotations

import random
import struct

import pytest

from chaos.wan.scheduler import (
    Impairment,
    ImpairmentError,
    SiteMap,
    WanScheduler,
    ipv4_addresses,
)


def packet(seq: int, size: int = 100) -> bytes:
    """A payload that carries its sequence number (the scheduler never parses it)."""
    return seq.to_bytes(4, "big") + bytes(max(0, size - 4))


def seq_of(data: bytes) -> int:
    return int.from_bytes(data[:4], "big")


def run(
    imp: Impairment,
    n: int,
    *,
    seed: int = 1,
    interval: float = 0.001,
    size: int = 100,
) -> list[tuple[int, float]]:
    """Submit ``n`` packets a→b every ``interval`` s; return ``(seq, release time)``
    for everything released, polling ``due`` at each packet's exact ``next_due``."""
    sched = WanScheduler(random.Random(seed))
    sched.set_impairment("a", "b", imp)
    out: list[tuple[int, float]] = []

    def drain(until: float) -> None:
        while (at := sched.next_due()) is not None and at <= until:
            out.extend((seq_of(p), at) for p in sched.due(at))

    for i in range(n):
        now = i * interval
        drain(now)
        sched.submit(packet(i, size), "a", "b", now)
    drain(float("inf"))
    return out


def test_no_impairment_releases_at_submission_time() -> None:
    sched = WanScheduler(random.Random(0))
    sched.submit(b"x", "a", "b", 5.0)
    assert sched.next_due() == 5.0
    assert sched.due(5.0) == [b"x"]
    assert sched.next_due() is None and len(sched) == 0


def test_delay_is_exact_without_jitter() -> None:
    out = run(Impairment(delay_ms=40), 50)
    assert [s for s, _ in out] == list(range(50))
    for seq, at in out:
        assert at == pytest.approx(seq * 0.001 + 0.040)


def test_nothing_is_due_before_its_time() -> None:
    sched = WanScheduler(random.Random(0))
    sched.set_impairment("a", "b", Impairment(delay_ms=10))
    sched.submit(b"x", "a", "b", 1.0)
    assert sched.due(1.0099) == []
    assert sched.due(1.0101) == [b"x"]


def test_jitter_stays_within_bounds_and_spreads() -> None:
    # 50 ms apart, so the FIFO floor never raises a release time.
    out = run(Impairment(delay_ms=40, jitter_ms=10), 2000, interval=0.05)
    delays = [(at - seq * 0.05) * 1000 for seq, at in out]
    assert len(delays) == 2000
    assert min(delays) >= 30 - 1e-9 and max(delays) <= 50 + 1e-9
    assert min(delays) < 31 and max(delays) > 49  # uniform, not clustered
    assert sum(delays) / len(delays) == pytest.approx(40, abs=0.5)


def test_jitter_never_goes_below_zero_delay() -> None:
    out = run(Impairment(delay_ms=2, jitter_ms=10), 500, interval=0.05)
    assert all(at >= seq * 0.05 for seq, at in out)


def test_fifo_is_kept_under_jitter() -> None:
    # Packets 1 ms apart with ±20 ms jitter would overtake each other constantly.
    out = run(Impairment(delay_ms=40, jitter_ms=20), 3000)
    assert [s for s, _ in out] == list(range(3000))
    times = [at for _, at in out]
    assert times == sorted(times)
    assert all(at - seq * 0.001 >= 0.020 - 1e-9 for seq, at in out)


def loss_runs(lost: list[bool]) -> list[int]:
    runs, current = [], 0
    for flag in lost:
        if flag:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


def lost_flags(imp: Impairment, n: int, seed: int) -> list[bool]:
    delivered = {s for s, _ in run(imp, n, seed=seed)}
    return [i not in delivered for i in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_uncorrelated_loss_rate(seed: int) -> None:
    lost = lost_flags(Impairment(loss=0.1), 20_000, seed)
    assert sum(lost) / len(lost) == pytest.approx(0.1, abs=0.01)
    runs = loss_runs(lost)
    assert sum(runs) / len(runs) == pytest.approx(1 / 0.9, rel=0.08)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_correlated_loss_keeps_rate_and_makes_bursts(seed: int) -> None:
    lost = lost_flags(Impairment(loss=0.1, loss_correlation=0.8), 50_000, seed)
    assert sum(lost) / len(lost) == pytest.approx(0.1, abs=0.02)
    runs = loss_runs(lost)
    expected_burst = 1 / ((1 - 0.8) * (1 - 0.1))  # ≈ 5.56 packets
    assert sum(runs) / len(runs) == pytest.approx(expected_burst, rel=0.15)


def test_loss_extremes() -> None:
    assert run(Impairment(loss=1.0), 200) == []
    assert len(run(Impairment(loss=0.0), 200)) == 200


def test_same_seed_replays_exactly() -> None:
    imp = Impairment(
        delay_ms=20,
        jitter_ms=5,
        loss=0.2,
        loss_correlation=0.5,
        duplicate=0.1,
        reorder=0.1,
        reorder_extra_ms=15,
    )
    assert run(imp, 1000, seed=7) == run(imp, 1000, seed=7)
    assert run(imp, 1000, seed=7) != run(imp, 1000, seed=8)


def test_duplicate_rate() -> None:
    out = run(Impairment(delay_ms=5, duplicate=0.2), 20_000)
    seqs = [s for s, _ in out]
    assert len(set(seqs)) == 20_000
    assert (len(seqs) - 20_000) / 20_000 == pytest.approx(0.2, abs=0.015)
    # The copy follows its original directly.
    for i in range(1, len(seqs)):
        assert seqs[i] >= seqs[i - 1]


def test_reorder_rate_and_extra_delay() -> None:
    n = 20_000
    out = run(Impairment(delay_ms=10, reorder=0.05, reorder_extra_ms=20), n)
    assert sorted(s for s, _ in out) == list(range(n))
    held = [seq for seq, at in out if at - seq * 0.001 > 0.010 + 1e-9]
    assert len(held) / n == pytest.approx(0.05, abs=0.008)
    held_set = set(held)
    for seq, at in out:
        expected = 0.030 if seq in held_set else 0.010
        assert at - seq * 0.001 == pytest.approx(expected)
    # Held packets are overtaken: they come out after higher sequence numbers.
    order = [s for s, _ in out]
    overtaken = sum(1 for i in range(1, len(order)) if order[i] < order[i - 1])
    assert overtaken >= len(held) * 0.9


def test_no_reorder_without_the_knob() -> None:
    out = run(Impairment(delay_ms=10, jitter_ms=9, duplicate=0.3), 5000)
    order = [s for s, _ in out]
    assert order == sorted(order)


@pytest.mark.parametrize("rate_kbit, size", [(1000, 1250), (8000, 500), (64, 100)])
def test_rate_spaces_packets_by_serialization_time(rate_kbit: float, size: int) -> None:
    # A burst of 20 packets at t=0 leaves the bottleneck one serialization time apart.
    sched = WanScheduler(random.Random(0))
    sched.set_impairment(
        "a", "b", Impairment(delay_ms=10, rate_kbit=rate_kbit, queue_limit_ms=10_000)
    )
    for i in range(20):
        sched.submit(packet(i, size), "a", "b", 0.0)
    times: list[float] = []
    while (at := sched.next_due()) is not None:
        times.extend(at for _ in sched.due(at))
    serialization = size * 8 / (rate_kbit * 1000)
    assert len(times) == 20
    assert times[0] == pytest.approx(0.010 + serialization)
    for earlier, later in zip(times, times[1:], strict=False):
        assert later - earlier == pytest.approx(serialization)


def test_rate_does_not_delay_a_slow_sender() -> None:
    # 1250-byte packets at 1000 kbit/s take 10 ms; sent every 20 ms they never queue.
    out = run(Impairment(rate_kbit=1000), 50, interval=0.02, size=1250)
    for seq, at in out:
        assert at == pytest.approx(seq * 0.02 + 0.010)


def test_rate_queue_limit_tail_drops() -> None:
    sched = WanScheduler(random.Random(0))
    # 1000-byte packets at 800 kbit/s: 10 ms each; the queue may hold 50 ms of wait.
    sched.set_impairment("a", "b", Impairment(rate_kbit=800, queue_limit_ms=50))
    for i in range(20):
        sched.submit(packet(i, 1000), "a", "b", 0.0)
    assert len(sched) == 6  # waits of 0, 10, ..., 50 ms
    assert sched.stats("a", "b").queue_dropped == 14


def test_blackhole_drops_everything_and_counts() -> None:
    assert run(Impairment(blackhole=True), 100) == []
    sched = WanScheduler(random.Random(0))
    sched.set_impairment("a", "b", Impairment(blackhole=True))
    sched.submit(b"x", "a", "b", 0.0)
    assert sched.stats("a", "b").blackholed == 1 and len(sched) == 0


def test_directions_are_independent() -> None:
    sched = WanScheduler(random.Random(0))
    sched.set_impairment("a", "b", Impairment(delay_ms=50))
    sched.set_impairment("b", "a", Impairment(blackhole=True))
    sched.set_impairment("a", "c", Impairment(rate_kbit=8, queue_limit_ms=10_000))
    sched.submit(b"ab", "a", "b", 0.0)
    sched.submit(b"ba", "b", "a", 0.0)
    for _ in range(3):
        sched.submit(b"ac" * 500, "a", "c", 0.0)  # fills the a→c bottleneck for 3 s
    sched.submit(b"ca", "c", "a", 0.0)  # never configured: a perfect link
    assert sched.due(0.0) == [b"ca"]
    assert sched.due(0.05) == [b"ab"]
    assert sched.impairment("c", "a") == Impairment()
    assert sched.stats("b", "a").blackholed == 1
    assert sched.next_due() == pytest.approx(1.0)


def test_changing_an_impairment_keeps_held_packets() -> None:
    sched = WanScheduler(random.Random(0))
    sched.set_impairment("a", "b", Impairment(delay_ms=100))
    sched.submit(b"old", "a", "b", 0.0)
    sched.set_impairment("a", "b", Impairment(blackhole=True))
    sched.submit(b"new", "a", "b", 0.0)
    assert sched.due(1.0) == [b"old"]


@pytest.mark.parametrize(
    "values",
    [
        {"loss": 1.5},
        {"delay_ms": -1},
        {"jitter_ms": float("nan")},
        {"reorder": -0.1},
        {"bogus": 1},
        {"delay_ms": "fast"},
    ],
)
def test_invalid_impairments_name_the_field(values: dict[str, object]) -> None:
    with pytest.raises(ImpairmentError, match=next(iter(values))):
        Impairment.from_mapping(values)


def test_impairment_from_mapping_accepts_strings() -> None:
    imp = Impairment.from_mapping({"delay_ms": "40", "blackhole": "true", "loss": 0})
    assert imp == Impairment(delay_ms=40.0, blackhole=True)
    assert Impairment.from_mapping(imp.to_json()) == imp


def test_bad_site_names_are_rejected() -> None:
    sched = WanScheduler(random.Random(0))
    with pytest.raises(ImpairmentError, match="site name"):
        sched.set_impairment("a>b", "c", Impairment())


# --- classification --------------------------------------------------------


def ipv4(src: str, dst: str, payload: bytes = b"hello", ihl: int = 5) -> bytes:
    total = ihl * 4 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | ihl,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        bytes(int(x) for x in src.split(".")),
        bytes(int(x) for x in dst.split(".")),
    )
    return header + bytes((ihl - 5) * 4) + payload


SITES = SiteMap.parse("a=10.1.1.0/24,b=10.1.2.0/24,wide=10.1.0.0/16,a=192.168.7.0/24")


def test_classify_by_subnet() -> None:
    assert SITES.classify(ipv4("10.1.1.2", "10.1.2.2")) == ("a", "b")
    assert SITES.classify(ipv4("10.1.2.9", "192.168.7.1")) == ("b", "a")
    assert SITES.names == ["a", "b", "wide"]


def test_classify_longest_prefix_wins() -> None:
    assert SITES.classify(ipv4("10.1.9.9", "10.1.1.5")) == ("wide", "a")


def test_classify_with_ip_options() -> None:
    assert SITES.classify(ipv4("10.1.1.2", "10.1.2.2", ihl=7)) == ("a", "b")


def test_classify_unknown_address_is_none() -> None:
    assert SITES.classify(ipv4("10.1.1.2", "8.8.8.8")) is None
    assert SITES.classify(ipv4("172.16.0.1", "10.1.1.1")) is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x45",
        bytes(19),
        b"\x60" + bytes(39),  # IPv6
        b"\x44" + bytes(39),  # IHL 4 < 5
        b"\x4f" + bytes(25),  # IHL 15 words > packet
        ipv4("10.1.1.2", "10.1.2.2")[:-1],  # total length beyond the packet
        b"\x45\x00\x00\x05" + bytes(16),  # total length shorter than the header
    ],
)
def test_classify_garbage_is_none(garbage: bytes) -> None:
    assert ipv4_addresses(garbage) is None
    assert SITES.classify(garbage) is None


def test_random_bytes_never_raise() -> None:
    rng = random.Random(3)
    for _ in range(5000):
        SITES.classify(rng.randbytes(rng.randrange(0, 64)))


@pytest.mark.parametrize("spec", ["a10.0.0.0/8", "a=10.0.0.300/24", "a-b=10.0.0.0/8"])
def test_bad_site_map(spec: str) -> None:
    with pytest.raises(ImpairmentError):
        SiteMap.parse(spec)
