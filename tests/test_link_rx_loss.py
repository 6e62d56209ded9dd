"""The receive-direction loss (raftstate/transport/rxloss.py) and the Raft
timers it feeds (raftstate/raftnode.py ``link_samples``).

A follower's election timer waits on frames it *receives* from the leader.
Before, the timers used only the loss of the frames a node sends, so a
follower with a clean uplink and a lossy downlink derived the floor.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.linktiming import TimingBounds, election_timeout_for, spurious_probability
from raftstate.raftnode import link_samples
from raftstate.transport import LinkProfile, SimLinkHost, SimNetwork
from raftstate.transport.frames import decode_frame
from raftstate.transport.reliable import ReliableLink
from raftstate.transport.rxloss import MIN_JUDGED, REORDER_SLACK, WINDOW, RxLossMeter
from raftstate.transport.udpconfig import PeerLinkStats

BOUNDS = TimingBounds(floor=0.3, ceiling=5.0)


def expected(fates: list[bool]) -> tuple[float | None, float | None]:
    """(loss, burst) over the judged numbers (all but the last
    REORDER_SLACK below the largest arrived), the last WINDOW of them."""
    arrived = [n for n, ok in enumerate(fates) if ok]
    if not arrived:
        return None, None
    judged = fates[: max(arrived[-1] - REORDER_SLACK + 1, 0)]
    window = judged[-WINDOW:]
    loss = None if len(window) < MIN_JUDGED else window.count(False) / len(window)
    first = len(judged) - len(window)
    after = [judged[i] for i in range(max(first, 1), len(judged)) if not judged[i - 1]]
    burst = None if len(after) < 8 else after.count(False) / len(after)
    return loss, burst


@given(st.lists(st.booleans(), max_size=1200))
def test_meter_reports_the_missing_fraction_of_the_last_window_of_numbers(
    fates: list[bool],
) -> None:
    meter = RxLossMeter()
    for n, ok in enumerate(fates):
        if ok:
            meter.on_frame(n)
    loss, burst = expected(fates)
    assert meter.loss() == (pytest.approx(loss) if loss is not None else None)
    assert meter.burst() == (pytest.approx(burst) if burst is not None else None)


@given(st.integers(0, 3000), st.floats(0.0, 0.6), st.floats(0.0, 0.9), st.integers(0, 2**32))
def test_meter_follows_a_long_bursty_pattern_past_many_windows(
    n: int, p: float, corr: float, seed: int
) -> None:
    rnd = random.Random(seed)
    fates, lost = [], False
    for _ in range(n):
        lost = rnd.random() < (p + corr * (1 - p) if lost else p)
        fates.append(not lost)
    meter = RxLossMeter()
    for number, ok in enumerate(fates):
        if ok:
            meter.on_frame(number)
    loss, burst = expected(fates)
    assert meter.loss() == (pytest.approx(loss) if loss is not None else None)
    assert meter.burst() == (pytest.approx(burst) if burst is not None else None)


@given(st.integers(0, 2000), st.integers(1, REORDER_SLACK), st.integers(0, 2**32))
def test_reordering_within_the_slack_is_not_loss(n: int, span: int, seed: int) -> None:
    rnd = random.Random(seed)
    numbers = list(range(n + 200))
    for i in range(0, len(numbers), span):  # shuffle within blocks of `span`
        block = numbers[i : i + span]
        rnd.shuffle(block)
        numbers[i : i + span] = block
    meter = RxLossMeter()
    for x in numbers:
        meter.on_frame(x)
    assert meter.loss() == 0.0


def test_a_jump_over_a_long_silence_fills_the_window_with_losses_in_bounded_work() -> None:
    meter = RxLossMeter()
    for n in range(100):
        meter.on_frame(n)
    meter.on_frame(10**12)  # would be 10**12 judgements without the bound
    assert meter.loss() == 1.0
    assert meter.burst() == 1.0
    meter.on_frame(10**12 + 1)
    assert meter.loss() == 1.0


def _drive_pair(
    rate: float, seed: int, messages: int
) -> tuple[ReliableLink, ReliableLink, list[bool]]:
    """a sends to b by hand: a -> b drops each datagram with ``rate``,
    b -> a is clean. Returns the links and the fate of each of a's frames."""
    rnd = random.Random(seed)
    a, b = ReliableLink(), ReliableLink()
    fates: dict[int, bool] = {}
    now = 0.0
    for i in range(messages):
        assert a.send(i.to_bytes(4, "big"), now)
        for _ in range(3):  # the ACK round trip, and timers run on the way
            for payload in a.poll_transmit(now):
                ok = rnd.random() >= rate
                fates[decode_frame(payload).number] = ok
                if ok:
                    b.receive(payload, now)
            for payload in b.poll_transmit(now):
                a.receive(payload, now)
            now += 0.004
    assert sorted(fates) == list(range(len(fates)))  # every number was sent once
    return a, b, [fates[n] for n in range(len(fates))]


@settings(max_examples=12, deadline=None)
@given(st.floats(0.0, 0.5), st.integers(0, 2**32))
def test_receiver_of_a_lossy_direction_reports_the_injected_loss(rate: float, seed: int) -> None:
    a, b, fates = _drive_pair(rate, seed, 300)
    got = b.stats().rx_loss
    want, _ = expected(fates)
    assert got is not None and want is not None
    assert got == pytest.approx(want)  # exactly the frames the network dropped
    assert abs(got - rate) <= 4.5 * (rate * (1 - rate) / WINDOW) ** 0.5 + 0.02
    assert a.stats().rx_loss in (None, 0.0)  # the clean direction


def test_simnet_asymmetric_loss_shows_only_on_the_receiving_end() -> None:
    net = SimNetwork(random.Random(5))
    a = SimLinkHost(net, "a", lambda _peer, _msg: None)
    b = SimLinkHost(net, "b", lambda _peer, _msg: None)
    net.set_profile("a", "b", LinkProfile.from_rtt(0.04, loss=0.2), both=False)
    net.set_profile("b", "a", LinkProfile.from_rtt(0.04), both=False)
    for i in range(1500):
        assert a.send("b", i.to_bytes(4, "big"))
        assert b.send("a", i.to_bytes(4, "big"))
        net.run_until(net.now + 0.005)
    net.run_until(net.now + 1)
    at_b, at_a = b.link("a").stats(), a.link("b").stats()
    assert at_b.rx_loss is not None and 0.12 <= at_b.rx_loss <= 0.28
    assert at_a.rx_loss is not None and at_a.rx_loss <= 0.01
    # b's own sending direction is clean: the old, send-only view saw nothing
    assert at_b.loss_measured is not None and at_b.loss_measured <= 0.01


def _stats(loss: float, copies: int, rx_loss: float | None, burst: float = 0.2) -> PeerLinkStats:
    base = ReliableLink().stats()
    link = dataclasses.replace(
        base, srtt=0.06, rttvar=0.01, loss_rate=loss, burst_loss=burst, redundancy=copies,
        rx_loss=rx_loss, rx_burst=burst if rx_loss is not None else None,
    )  # fmt: skip
    return PeerLinkStats("l", "static", True, 0.06, 0, loss, 1, 1, link=link)


@given(st.floats(0.05, 0.5), st.integers(0, 3))
def test_lossy_downlink_clean_uplink_gets_at_least_the_symmetric_timeout(
    p: float, sym_copies: int
) -> None:
    down_only = link_samples({"l": _stats(0.0, 0, p)})["l"]
    symmetric = link_samples({"l": _stats(p, sym_copies, p)})["l"]
    t_down = election_timeout_for(down_only, BOUNDS).seconds
    assert t_down >= election_timeout_for(symmetric, BOUNDS).seconds


def test_the_reviewed_case_no_longer_derives_the_floor() -> None:
    """20 % loss leader -> follower, clean back: the floor had a spurious
    probability of 0.2 per message."""
    sample = link_samples({"l": _stats(0.0, 0, 0.2)})["l"]
    t = election_timeout_for(sample, BOUNDS).seconds
    assert t > 1.0
    assert spurious_probability(sample, t, t / 10) <= 1e-6
    without = dataclasses.replace(sample, loss=0.0, burst=0.0)
    assert election_timeout_for(without, BOUNDS).seconds == BOUNDS.floor


def test_a_clean_receive_direction_leaves_the_send_view_unchanged() -> None:
    for rx in (None, 0.0):
        sample = link_samples({"l": _stats(0.1, 2, rx, burst=0.3)})["l"]
        assert (sample.loss, sample.burst, sample.copies) == (0.1, 0.3, 2)
