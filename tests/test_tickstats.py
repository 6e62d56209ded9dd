"""Tick work statistics: the histogram, the stall count and the resettable max."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from raftstate.tickstats import BUCKETS_S, STALL_S, TickStats


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=200))
def test_histogram_is_cumulative_and_counts_every_tick(works: list[float]) -> None:
    stats = TickStats()
    for w in works:
        stats.observe(w)
    snap = stats.snapshot()
    assert snap.count == len(works)
    assert snap.buckets[-1] == len(works)
    assert list(snap.buckets) == sorted(snap.buckets)
    for bound, n in zip(BUCKETS_S, snap.buckets, strict=False):
        assert n == sum(1 for w in works if w <= bound)
    assert snap.stalls == sum(1 for w in works if w > STALL_S)
    assert snap.max_s == max(works, default=0.0)


def test_take_max_reports_the_window_and_starts_over() -> None:
    stats = TickStats()
    stats.observe(0.2)
    stats.observe(0.01)
    assert stats.take_max() == 0.2
    stats.observe(0.03)
    assert stats.take_max() == 0.03
    assert stats.take_max() == 0.0
    assert stats.snapshot().max_s == 0.2
