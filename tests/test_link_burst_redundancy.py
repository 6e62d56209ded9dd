"""Redundancy sized for bursty loss: the Gilbert-Elliott estimate, the
residual-loss model, and spaced copies on the simulated network.

On a bursty path a copy in the very next frame is lost with the burst it
should repair: with the lab's ``weak`` loss (3 %, correlation 0.25) P(next
lost | lost) is 0.27, not 0.03. The link measures that conditional loss q,
spaces a chunk's copies 1, 2 and 4 frames apart, and sizes the number of
copies so that p * prod f(gap) meets ``redundancy_target``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftstate.transport import LinkConfig, LinkProfile, SimLinkHost, SimNetwork
from raftstate.transport.frames import Ack
from raftstate.transport.recovery import (
    COPY_GAPS,
    INITIAL_BURST_LOSS,
    LossRecovery,
    SentFrame,
    residual_loss,
)


def _gilbert(rng: random.Random, n: int, p: float, q: float) -> list[bool]:
    """n fates (True: lost) of a two-state chain with mean p, P(lost|lost) q."""
    r = p * (1 - q) / (1 - p)
    out, lost = [], False
    for _ in range(n):
        lost = rng.random() < (q if lost else r)
        out.append(lost)
    return out


def _recovery_after(fates: list[bool]) -> LossRecovery:
    """A LossRecovery that sent one frame per fate and learned them through
    ACKs in batches of 50 (lost frames declared by the packet threshold)."""
    rec = LossRecovery(LinkConfig().recovery_params())
    t = 0.0
    for start in range(0, len(fates), 50):
        batch = fates[start : start + 50] + [False] * 3
        base = start + (start // 50) * 3
        for i in range(len(batch)):
            rec.on_sent(SentFrame(base + i, t, 100, []))
        ranges = [(base + i, base + i + 1) for i, lost in enumerate(batch) if not lost]
        merged: list[tuple[int, int]] = []
        for lo, hi in ranges:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        cum = merged[0][1] if merged and merged[0][0] == base and base == 0 else 0
        if cum:
            merged = merged[1:]
        t += 0.01
        rec.on_ack(Ack(cum=cum, delay_us=0, ranges=tuple(merged[-63:])), now=t)
        t += 1.0  # past the reorder window: every unacked frame is now lost
        rec.detect_losses(t)
    return rec


@pytest.mark.parametrize(("p", "q"), [(0.03, 0.27), (0.10, 0.325), (0.05, 0.05)])
def test_the_burst_estimate_finds_the_conditional_loss(p: float, q: float) -> None:
    fates = _gilbert(random.Random(1), 40_000, p, q)
    rec = _recovery_after(fates)
    assert rec.burst_samples > 200
    assert rec.burst_loss == pytest.approx(q, abs=0.12)
    # iid (q = p) and bursty paths are told apart
    assert (rec.burst_loss > 0.15) == (q > 0.15)


def test_with_no_loss_the_burst_estimate_keeps_its_prior() -> None:
    rec = _recovery_after([False] * 2000)
    assert rec.burst_samples == 0 and rec.burst_loss == INITIAL_BURST_LOSS


@given(st.floats(0.0, 0.5), st.integers(0, len(COPY_GAPS)))
def test_residual_loss_on_an_iid_path_is_p_to_the_copies_plus_one(p: float, copies: int) -> None:
    assert residual_loss(p, p, copies) == pytest.approx(p ** (copies + 1), rel=1e-9, abs=1e-15)


@given(st.floats(0.001, 0.3), st.floats(0.0, 0.9), st.integers(0, len(COPY_GAPS) - 1))
def test_residual_loss_falls_with_every_copy_and_rises_with_burstiness(
    p: float, q: float, copies: int
) -> None:
    assert residual_loss(p, q, copies + 1) <= residual_loss(p, q, copies)
    if q >= p:
        assert residual_loss(p, q, copies) >= residual_loss(p, p, copies) * (1 - 1e-9)


def test_spaced_copies_beat_adjacent_ones_under_the_same_burst() -> None:
    """The model the copy count relies on: for weak's loss, copies at gaps
    1, 2, 4 leave ~25x less residual loss than three adjacent copies."""
    p, q = 0.03, 0.27
    adjacent = p * q**3
    assert residual_loss(p, q, 3) < adjacent / 20


def _one_way(profile: LinkProfile, config: LinkConfig, seed: int) -> list[float]:
    """One-way latencies (ms) of 6000 small messages at 150/s."""
    net = SimNetwork(random.Random(seed), default=profile)
    sent_at: dict[bytes, float] = {}
    lat: list[float] = []
    a = SimLinkHost(net, "a", lambda _p, _m: None, config=config)
    SimLinkHost(net, "b", lambda _p, m: lat.append((net.now - sent_at[m]) * 1000), config=config)
    for i in range(6000):
        msg = i.to_bytes(4, "big") + b"x" * 200
        net.call_at(i / 150, lambda m=msg: (sent_at.__setitem__(m, net.now), a.send("b", m)))
    net.run_until(6000 / 150 + 10)
    assert len(lat) == 6000
    return sorted(lat)


def test_bursty_loss_costs_no_round_trip_at_the_99th_percentile() -> None:
    """3 % loss in bursts (correlation 0.25) on a 30 ms one-way path: the
    99th percentile stays within a few frame intervals of the path delay
    (a repair round trip would add >= 60 ms); without redundancy it does
    not (the test can fail)."""
    profile = LinkProfile(delay=0.030, loss=0.03, loss_correlation=0.25)
    lat = _one_way(profile, LinkConfig(), seed=4)
    p99 = lat[int(0.99 * len(lat))]
    assert p99 <= 30 + 25, p99
    bare = _one_way(profile, dataclasses.replace(LinkConfig(), redundancy_max=0), seed=4)
    assert bare[int(0.99 * len(bare))] > 30 + 25


def test_a_clean_path_sheds_its_copies() -> None:
    """With no loss the copy count falls to the configured floor (0)."""
    net = SimNetwork(random.Random(2), default=LinkProfile(delay=0.01))
    cfg = dataclasses.replace(LinkConfig(), loss_ewma_weight=1 / 16)
    a = SimLinkHost(net, "a", lambda _p, _m: None, config=cfg)
    SimLinkHost(net, "b", lambda _p, _m: None, config=cfg)
    for i in range(600):
        net.call_at(i * 0.005, lambda i=i: a.send("b", b"m%d" % i))
    net.run_until(5.0)
    assert a.links["b"].stats().redundancy == 0


@pytest.mark.parametrize("extra", [1, 300, 1000])
def test_a_lost_full_frame_is_repaired_by_its_copy_frame_without_a_round_trip(extra: int) -> None:
    """A message of a frame or more fills its first frame, so no later data
    frame has room for that chunk's copy. With copies owed, the sender adds a
    frame of them at once: losing the full frame then costs nothing; before,
    the message waited for loss detection (about an RTT)."""
    from raftstate.transport.reliable import ReliableLink

    cfg = LinkConfig(redundancy=1)
    a = ReliableLink(1200, config=cfg)
    b = ReliableLink(1200, config=cfg)
    message = random.Random(extra).randbytes(1200 + extra)
    assert a.send(message, 0.0)
    frames = a.poll_transmit(0.0)
    assert len(frames) >= 3, "data frames plus a copy frame"
    got: list[bytes] = []
    for payload in frames[1:]:  # the first (full) data frame is lost
        got.extend(b.receive(payload, 0.01))
    assert got == [message]
    assert a.stats().redundant_chunks >= 1
