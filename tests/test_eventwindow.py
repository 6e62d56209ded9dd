"""The event window: one event per revision, trimmed by count and age."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.eventwindow import (
    EVENT_OVERHEAD_BYTES,
    KIND_DELETED,
    KIND_HEARTBEAT,
    KIND_OFFLINE,
    KIND_ONLINE,
    KIND_REPORTED_CHANGED,
    Event,
    EventWindow,
)
from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete, encode_expire


def ev(rev: int, time_ms: int = 0, before: bytes | None = None) -> Event:
    return Event(rev, f"d{rev}", KIND_HEARTBEAT, b"after", before, rev - 1, time_ms)


def test_revisions_must_be_contiguous() -> None:
    w = EventWindow()
    w.append_checked(ev(1))
    with pytest.raises(ValueError, match="revision 3 after 1"):
        w.append_checked(ev(3))
    assert (w.oldest, w.latest, len(w)) == (1, 1, 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 700))
def test_trim_by_count_keeps_exactly_the_newest(max_events: int, n: int) -> None:
    w = EventWindow(max_events=max_events)
    for rev in range(1, n + 1):
        w.append(ev(rev))
        w.trim(0)
    kept = min(n, max_events)
    assert len(w) == kept and w.latest == n and w.oldest == n - kept + 1
    assert [e.revision for e in w.range(0, n + 5)] == list(range(n - kept + 1, n + 1))
    assert w.get(w.oldest - 1) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.lists(st.integers(0, 5000), min_size=1, max_size=200))
def test_trim_by_age_drops_events_older_than_the_window(max_age_s: int, gaps: list[int]) -> None:
    w = EventWindow(max_events=10_000, max_age_s=max_age_s)
    t = 0
    times = []
    for rev, gap in enumerate(gaps, start=1):
        t += gap
        times.append(t)
        w.append(ev(rev, t))
        w.trim(t)
    cutoff = t - max_age_s * 1000
    expected = [rev for rev, at in enumerate(times, start=1) if at >= cutoff]
    # Trimming is from the oldest: every event from the first kept one on.
    assert [e.revision for e in w.range(1, len(gaps))] == list(range(expected[0], len(gaps) + 1))
    assert w.oldest == expected[0]


def test_an_empty_window_is_oldest_latest_plus_one_and_reset_moves_it() -> None:
    w = EventWindow()
    assert (w.oldest, w.latest) == (1, 0)
    w.append(ev(1))
    w.reset(41)
    assert (w.oldest, w.latest, len(w), w.range(0, 100)) == (42, 41, 0, [])
    w.append(ev(42))
    assert w.get(42) is not None


def test_stats_count_the_records_only_the_window_keeps() -> None:
    w = EventWindow(max_events=2)
    w.append(ev(1, before=b"x" * 100))
    w.append(ev(2))
    s = w.stats()
    assert (s.events, s.oldest, s.latest) == (2, 1, 2)
    assert s.bytes == 2 * EVENT_OVERHEAD_BYTES + 100 + 33
    w.append(ev(3))
    w.trim(0)
    assert w.stats().bytes == 2 * EVENT_OVERHEAD_BYTES


def test_the_listener_hears_each_entry_that_recorded_events_once() -> None:
    t = DeviceTable()
    heard: list[int] = []
    t.window.set_listener(heard.append)
    t.apply(encode_batch([Heartbeat("a", 1, {}), Heartbeat("b", 1, {})], 1000))
    t.apply(encode_batch([Heartbeat("a", 1, {})], 1001))  # duplicate: no event
    t.apply(encode_batch([], 1002))  # barrier
    t.apply_control(encode_delete("a", 1003))
    t.apply_control(encode_delete("a", 1004))  # nothing to delete
    assert heard == [2, 3]


def test_every_change_is_one_event_with_its_kinds_and_chain() -> None:
    t = DeviceTable(default_ttl_s=5)
    t.apply(encode_batch([Heartbeat("a", 1, {"k": "1"})], 1000))  # 1: new
    t.apply(encode_batch([Heartbeat("a", 2, {"k": "1"})], 2000))  # 2: same map
    t.apply(encode_batch([Heartbeat("a", 3, {"k": "2"})], 3000))  # 3: changed
    t.apply_control(encode_expire([("a", 3)], 9000))  # 4: offline
    t.apply(encode_batch([Heartbeat("a", 4, {"k": "2"}, ttl_s=7)], 9500))  # 5: back
    t.apply_control(encode_delete("a", 9600))  # 6: deleted
    t.apply(encode_batch([Heartbeat("a", 1, {})], 9700))  # 7: recreated
    events = t.window.range(1, 7)
    hb, rc, on, off, dl = (
        KIND_HEARTBEAT, KIND_REPORTED_CHANGED, KIND_ONLINE, KIND_OFFLINE, KIND_DELETED,
    )  # fmt: skip
    assert [e.kinds for e in events] == [hb | rc | on, hb, hb | rc, off, hb | on, dl, hb | rc | on]
    assert [e.prev_rev for e in events] == [0, 1, 2, 3, 4, 5, 6]
    assert [e.time_ms for e in events] == [1000, 2000, 3000, 9000, 9500, 9600, 9700]
    assert events[0].before is None and events[5].after is None and events[6].before is None
    for e in events[1:6]:
        assert e.before is events[e.revision - 2].after  # the same bytes object, no copy
    assert t.window.latest == t.revision == 7


def test_a_reordered_reported_map_is_not_a_change() -> None:
    """Map entries may be encoded in any order; the comparison is of maps."""
    t = DeviceTable()
    many = {f"k{i}": str(i) for i in range(20)}
    t.apply(encode_batch([Heartbeat("a", 1, many)], 1))
    t.apply(encode_batch([Heartbeat("a", 2, dict(reversed(many.items())))], 2))
    t.apply(encode_batch([Heartbeat("a", 3, {**many, "k0": "x"})], 3))
    t.apply(encode_batch([Heartbeat("a", 4, {**many, "k0": "x"}, ttl_s=99)], 4))
    kinds = [e.kinds & KIND_REPORTED_CHANGED for e in t.window.range(1, 4)]
    assert kinds == [KIND_REPORTED_CHANGED, 0, KIND_REPORTED_CHANGED, 0]


def test_stats_bytes_match_the_memory_the_window_holds() -> None:
    """``stats().bytes`` within 25 % of what tracemalloc sees the window keep."""
    t = DeviceTable()
    t.window.max_events = 40_000
    ids = [f"dev-{i:05d}" for i in range(1000)]
    t.apply(encode_batch([Heartbeat(d, 1, {"temp": "20.5", "fw": "1.2.3"}) for d in ids], 1))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        before = t.window.stats().bytes
        for seq in range(2, 22):
            t.apply(encode_batch([Heartbeat(d, seq, {"temp": f"{seq}.5", "fw": "1.2.3"})
                                  for d in ids], seq))  # fmt: skip
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    counted = t.window.stats().bytes - before
    assert 0.75 * grown <= counted <= 1.25 * grown, (counted, grown)
    print(f"window: {grown / 20_000:.0f} bytes per retained event (measured), "
          f"{counted / 20_000:.0f} counted")  # fmt: skip
