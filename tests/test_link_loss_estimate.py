"""What a link reports as its loss rate: measured, or nothing.

The loss EWMA starts at ``initial_loss_rate`` (2 %), a prior that keeps
redundancy on until the path has shown itself. Reporting it as a loss made
``raftstate status`` show 2 % loss (and 0 ms RTT) on idle links between
followers. The reported value divides the prior out, and is absent until
``MIN_LOSS_SAMPLES`` frames' fates are known.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftstate.transport import LinkConfig, LinkProfile, SimLinkHost, SimNetwork
from raftstate.transport.frames import Ack
from raftstate.transport.recovery import MIN_LOSS_SAMPLES, LossRecovery, SentFrame


def recovery_after(fates: list[bool]) -> tuple[LossRecovery, list[bool]]:
    """A LossRecovery that sent ``len(fates)`` frames (plus three acked ones
    so the packet threshold decides the others) and got one ACK covering the
    frames whose fate is True. Returns it and the fates in the order it
    learned them (acks first, then losses)."""
    rec = LossRecovery(LinkConfig().recovery_params())
    acked = [*fates, True, True, True]
    for number in range(len(acked)):
        rec.on_sent(SentFrame(number, 0.0, 100, []))
    cum = next((i for i, ok in enumerate(acked) if not ok), len(acked))
    ranges: list[tuple[int, int]] = []
    for number in range(cum, len(acked)):
        if acked[number]:
            if ranges and ranges[-1][1] == number:
                ranges[-1] = (ranges[-1][0], number + 1)
            else:
                ranges.append((number, number + 1))
    rec.on_ack(Ack(cum=cum, delay_us=0, ranges=tuple(ranges)), now=0.05)
    order = [False] * sum(acked) + [True] * (len(acked) - sum(acked))
    return rec, order


@given(st.lists(st.booleans(), max_size=400))
def test_reported_loss_is_the_ewma_of_the_fates_alone(fates: list[bool]) -> None:
    rec, order = recovery_after(fates)
    n = len(order)
    assert rec.fates == n
    if n < MIN_LOSS_SAMPLES:
        assert rec.measured_loss_rate() is None
        return
    w = LinkConfig().loss_ewma_weight
    weights = [w * (1 - w) ** (n - 1 - i) for i in range(n)]
    expected = sum(wt for wt, lost in zip(weights, order, strict=True) if lost) / sum(weights)
    got = rec.measured_loss_rate()
    assert got is not None and got == pytest.approx(expected, abs=1e-9)


def test_a_link_with_no_fates_reports_no_loss_although_its_prior_is_two_percent() -> None:
    rec = LossRecovery(LinkConfig().recovery_params())
    assert rec.loss_rate == LinkConfig().initial_loss_rate > 0
    assert rec.measured_loss_rate() is None


def test_every_frame_acked_reports_zero_loss_while_the_raw_ewma_still_holds_the_prior() -> None:
    rec, _ = recovery_after([True] * (MIN_LOSS_SAMPLES - 3))
    assert rec.fates == MIN_LOSS_SAMPLES
    assert rec.loss_rate > 0.01  # the prior has barely decayed
    assert rec.measured_loss_rate() == pytest.approx(0.0, abs=1e-12)


def _hosts(seed: int, profile: LinkProfile) -> tuple[SimNetwork, SimLinkHost, SimLinkHost]:
    net = SimNetwork(random.Random(seed))
    a = SimLinkHost(net, "a", lambda _peer, _msg: None)
    b = SimLinkHost(net, "b", lambda _peer, _msg: None)
    net.set_profile("a", "b", profile, both=True)
    return net, a, b


def test_the_direction_that_only_acknowledges_reports_no_rtt_and_no_loss() -> None:
    """b only ACKs what a sends, as a follower's link to another follower
    carries nothing of its own: b has measured neither RTT nor loss."""
    net, a, b = _hosts(1, LinkProfile.from_rtt(0.02))
    for i in range(200):
        assert a.send("b", i.to_bytes(4, "big"))
        net.run_until(net.now + 0.005)
    net.run_until(net.now + 1)
    sender, acker = a.link("b").stats(), b.link("a").stats()
    assert sender.srtt is not None and sender.loss_measured == pytest.approx(0.0, abs=1e-9)
    assert acker.srtt is None and acker.loss_measured is None
    assert acker.loss_rate == LinkConfig().initial_loss_rate  # what status used to show


def test_a_lossy_path_reports_its_loss() -> None:
    net, a, _ = _hosts(2, LinkProfile.from_rtt(0.02, loss=0.1))
    for i in range(2000):
        assert a.send("b", i.to_bytes(4, "big"))
        net.run_until(net.now + 0.002)
    net.run_until(net.now + 2)
    stats = a.link("b").stats()
    assert stats.loss_measured is not None and 0.04 <= stats.loss_measured <= 0.25
