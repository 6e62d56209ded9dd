"""Raft timers derived from link estimates (raftstate/linktiming.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.linktiming import (
    HEARTBEATS_PER_TIMEOUT,
    SPURIOUS_TARGET,
    STEP_DOWN_FACTOR,
    LinkSample,
    Timing,
    TimingBounds,
    derive,
    election_timeout_for,
    raw_election_timeout,
    spurious_probability,
)

BOUNDS = TimingBounds(floor=0.3, ceiling=5.0, min_heartbeat=0.02)
CONFIGURED = Timing(heartbeat=0.05, election_min=0.6, election_max=1.2, step_down=0.8)

# RTT from loopback to a satellite hop, loss from none to half, bursts up to
# almost always-repeat, copies as the link may add them (0..redundancy_max).
srtts = st.floats(min_value=0.0, max_value=2.0, allow_nan=False)
rttvars = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
losses = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)
bursts = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)
copies = st.integers(min_value=0, max_value=3)
links = st.builds(LinkSample, srtts, rttvars, losses, bursts, copies)
bounds = st.builds(
    lambda floor, factor, spread: TimingBounds(floor, floor * factor, spread),
    st.floats(min_value=0.2, max_value=2.0),
    st.floats(min_value=2.0, max_value=20.0),
    st.floats(min_value=1.2, max_value=2.0),
)


@given(links, bounds)
def test_derived_timeouts_stay_within_the_configured_bounds(
    link: LinkSample, b: TimingBounds
) -> None:
    t = derive({"n2": link}, "n2", b, CONFIGURED)
    assert b.floor <= t.election_min <= t.election_max <= b.ceiling + 1e-12
    assert b.min_heartbeat <= t.heartbeat
    assert t.heartbeat == max(t.election_min / HEARTBEATS_PER_TIMEOUT, b.min_heartbeat)
    assert t.election_min <= t.step_down <= b.ceiling


@given(links, srtts, rttvars)
def test_the_timeout_never_shrinks_when_the_rtt_grows(
    link: LinkSample, more_srtt: float, more_var: float
) -> None:
    worse = LinkSample(
        link.srtt + more_srtt, link.rttvar + more_var, link.loss, link.burst, link.copies
    )
    assert raw_election_timeout(worse) >= raw_election_timeout(link)
    assert election_timeout_for(worse, BOUNDS).seconds >= election_timeout_for(link, BOUNDS).seconds


@given(links, losses, bursts)
def test_the_timeout_never_shrinks_when_the_loss_grows(
    link: LinkSample, more_loss: float, more_burst: float
) -> None:
    worse = LinkSample(
        link.srtt,
        link.rttvar,
        min(link.loss + more_loss, 0.99),
        min(link.burst + more_burst, 0.99),
        link.copies,
    )
    assert raw_election_timeout(worse) >= raw_election_timeout(link)


@settings(max_examples=300)
@given(links)
def test_a_spurious_timeout_is_below_the_target_unless_the_ceiling_held_it_down(
    link: LinkSample,
) -> None:
    t = election_timeout_for(link, BOUNDS)
    p = spurious_probability(link, t.seconds, t.seconds / HEARTBEATS_PER_TIMEOUT)
    if not t.capped:
        assert p <= SPURIOUS_TARGET * (1 + 1e-9)
    # and the derivation asks for no more than it needs: one repair less misses it
    shorter = t.seconds - link.tail / (1 - 2 / HEARTBEATS_PER_TIMEOUT)
    if not t.capped and t.seconds > BOUNDS.floor and link.first_attempt_loss() > 0:
        assert spurious_probability(link, shorter, shorter / HEARTBEATS_PER_TIMEOUT) > (
            SPURIOUS_TARGET
        )


def test_the_lab_profiles_get_the_expected_timeouts() -> None:
    """lan at the floor (failover within a second), weak below today's 600 ms
    default, bad well above the 600 ms that let it elect spuriously."""
    lan = LinkSample(0.0005, 0.0002, 0.0, 0.3, 0)
    weak = LinkSample(0.062, 0.012, 0.03, 0.27, 3)
    bad = LinkSample(0.150, 0.035, 0.10, 0.33, 3)
    assert election_timeout_for(lan, BOUNDS).seconds == BOUNDS.floor
    assert 0.3 < election_timeout_for(weak, BOUNDS).seconds < 0.6
    assert 1.2 < election_timeout_for(bad, BOUNDS).seconds < 2.5


def test_a_follower_times_out_by_its_link_to_the_leader() -> None:
    near = LinkSample(0.001, 0.0005)
    far = LinkSample(0.3, 0.05, 0.1, 0.3, 1)
    follows_near = derive({"n2": near, "n3": far}, "n2", BOUNDS, CONFIGURED)
    follows_far = derive({"n2": near, "n3": far}, "n3", BOUNDS, CONFIGURED)
    assert follows_near.election_min == BOUNDS.floor
    assert follows_far.election_min > follows_near.election_min
    assert follows_near.basis == "n2" and follows_far.basis == "n3"


def test_without_a_leader_the_slowest_link_sets_the_timeout() -> None:
    near = LinkSample(0.001, 0.0005)
    far = LinkSample(0.3, 0.05, 0.1, 0.3, 1)
    t = derive({"n2": near, "n3": far}, None, BOUNDS, CONFIGURED)
    assert t.basis == "n3"
    assert t.election_min == election_timeout_for(far, BOUNDS).seconds


def test_the_heartbeat_serves_the_shortest_timeout_and_check_quorum_the_longest() -> None:
    near = LinkSample(0.001, 0.0005)
    far = LinkSample(0.3, 0.05, 0.1, 0.3, 1)
    t = derive({"n2": near, "n3": far}, None, BOUNDS, CONFIGURED)
    assert t.heartbeat == BOUNDS.floor / HEARTBEATS_PER_TIMEOUT
    assert t.step_down == election_timeout_for(far, BOUNDS).seconds * STEP_DOWN_FACTOR


def test_no_measured_link_keeps_the_timing_in_force() -> None:
    assert derive({}, None, BOUNDS, CONFIGURED) is CONFIGURED


def test_a_link_past_the_ceiling_is_capped_and_says_so() -> None:
    awful = LinkSample(1.5, 0.5, 0.4, 0.9, 0)
    t = derive({"n2": awful}, "n2", BOUNDS, CONFIGURED)
    assert t.capped
    assert t.election_max == BOUNDS.ceiling
