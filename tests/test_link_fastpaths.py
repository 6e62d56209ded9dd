"""The reliable link's CPU fast paths agree with their plain definitions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.transport.acks import AckTracker
from raftstate.transport.frames import Ack, Frame, decode_frame, encode_frame
from raftstate.transport.recovery import _covered
from raftstate.transport.reliable import ReliableLink


def _ranges(draw_bounds: list[int], cum: int) -> tuple[tuple[int, int], ...]:
    """Ascending, disjoint, non-adjacent ranges above ``cum`` from sorted bounds."""
    out: list[tuple[int, int]] = []
    prev = cum
    for i in range(0, len(draw_bounds) - 1, 2):
        lo = prev + 1 + draw_bounds[i]
        hi = lo + 1 + draw_bounds[i + 1]
        out.append((lo, hi))
        prev = hi
    return tuple(out)


_gap = st.one_of(st.integers(0, 63), st.integers(64, 1 << 20))


@settings(max_examples=300, deadline=None)
@given(
    cum=st.integers(0, 1 << 30),
    bounds=st.lists(_gap, max_size=2 * 63),
    delay=st.integers(0, (1 << 30) - 1),
)
def test_ack_ranges_round_trip_with_one_and_multi_byte_varints(
    cum: int, bounds: list[int], delay: int
) -> None:
    ranges = _ranges(bounds, cum)
    number = (ranges[-1][1] if ranges else cum) + 5
    frame = Frame(number, number, Ack(cum, delay, ranges))
    assert decode_frame(encode_frame(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(
    cum=st.integers(0, 500),
    bounds=st.lists(st.integers(0, 40), max_size=40),
    numbers=st.sets(st.integers(0, 3000), max_size=60),
)
def test_covered_equals_ack_covers(cum: int, bounds: list[int], numbers: set[int]) -> None:
    ack = Ack(cum, 0, _ranges(bounds, cum))
    ghosts = {n: 0.0 for n in sorted(numbers)}
    assert _covered(ghosts, ack) == [n for n in sorted(numbers) if ack.covers(n)]


@settings(max_examples=200, deadline=None)
@given(received=st.lists(st.integers(0, 400), max_size=120), probe=st.integers(0, 450))
def test_ack_tracker_seen_equals_membership(received: list[int], probe: int) -> None:
    tracker = AckTracker(max_ack_delay=0.002, threshold=2, max_ranges=32)
    got: set[int] = set()
    for n in received:
        if n >= tracker.base and not tracker.seen(n):
            tracker.on_frame(n, 0, ack_eliciting=True, ack_now=False, now=0.0)
            got.add(n)
    if probe >= tracker.base:
        assert tracker.seen(probe) == (probe in got)


def test_idle_link_poll_returns_nothing_and_keeps_its_timers() -> None:
    link = ReliableLink()
    assert link.poll_transmit(0.0) == []
    assert link.next_timeout() is None
    assert link.send(b"x", 0.0)
    first = link.poll_transmit(0.0)
    assert len(first) == 1  # the data frame
    due = link.next_timeout()
    assert due is not None
    assert link.poll_transmit(due - 1e-6) == []  # nothing due yet: the fast path
    assert link.next_timeout() == due
    assert link.poll_transmit(due) != []  # the timer (tail copy or probe) fires
