"""Adversarial checks of committed presence (raftstate/presence.py,
ExpireDevices apply in raftstate/statemachine.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch, encode_expire

BUDGET = 1_000_000


@settings(max_examples=60, deadline=None)
@given(
    old_ttl=st.integers(2, 2**32 - 1),
    new_ttl=st.integers(1, 3600),
    gap_ms=st.integers(0, 60_000),
)
def test_a_heartbeat_that_shortens_the_ttl_moves_the_deadline_earlier(
    old_ttl: int, new_ttl: int, gap_ms: int
) -> None:
    """The wheel holds one entry per online device at the deadline it had
    when it came online; a later heartbeat with a SHORTER ttl_s brings the
    deadline forward, and the device must be due by then, not at the old
    (up to 136 years later) deadline."""
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("d", 1, {}, ttl_s=old_ttl)], 1_000))
    last = 1_000 + gap_ms
    t.apply(encode_batch([Heartbeat("d", 2, {}, ttl_s=new_ttl)], last))
    deadline = last + new_ttl * 1000
    assert t.deadline_of("d") == deadline
    t.wheel.advance(deadline + t.wheel.bucket_ms, t.deadline_of, BUDGET)
    if deadline < 1_000 + old_ttl * 1000:
        assert "d" in t.wheel.due


def test_an_expiry_racing_a_heartbeat_leaves_the_device_online() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("d", 1, {}, ttl_s=1)], 1_000))
    planned_at = t.revision  # the leader read revision 1 and proposed
    t.apply(encode_batch([Heartbeat("d", 2, {}, ttl_s=1)], 1_900))  # committed first
    t.apply_control(encode_expire([("d", planned_at)], 2_100))
    view = t.get("d")
    assert view is not None and view.online and view.revision == 2
    assert t.window.latest == 2  # no event for the no-op expiry


@settings(max_examples=80, deadline=None)
@given(
    beats=st.lists(st.tuples(st.integers(1, 3600), st.integers(0, 5_000)), min_size=1, max_size=200)
)
def test_ttl_changes_keep_at_most_two_wheel_entries_and_the_deadline_on_time(
    beats: list[tuple[int, int]],
) -> None:
    """A device heartbeating with any sequence of TTLs and gaps: the wheel
    never holds more than two entries for it (alternating TTLs cannot grow
    it), and it is due once its last deadline passes."""
    t = DeviceTable()
    now = 1_000
    for seq, (ttl, gap) in enumerate(beats, start=1):
        now += gap
        deadline = t.deadline_of("d")
        if deadline is not None and deadline <= now:
            break  # it would have expired before this beat: stop there
        t.apply(encode_batch([Heartbeat("d", seq, {}, ttl_s=ttl)], now))
        t.wheel.advance(now, t.deadline_of, BUDGET)
        assert len(t.wheel) <= 2
        assert not t.wheel.due
    deadline = t.deadline_of("d")
    assert deadline is not None
    t.wheel.advance(deadline - 1, t.deadline_of, BUDGET)
    assert not t.wheel.due
    t.wheel.advance(deadline + t.wheel.bucket_ms, t.deadline_of, BUDGET)
    assert "d" in t.wheel.due
