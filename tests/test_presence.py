"""Committed presence, sans IO: the deadline wheel, the clock anchor, the
expiry planner, and applying ExpireDevices."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.eventwindow import KIND_HEARTBEAT, KIND_OFFLINE, KIND_ONLINE
from raftstate.model import Heartbeat
from raftstate.presence import ClockAnchor, DeadlineWheel, ExpiryPlanner
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete, encode_expire

# ---- the deadline wheel ------------------------------------------------------------------


def test_a_device_is_due_once_its_deadline_passes_and_not_before() -> None:
    deadlines = {"a": 10_000}
    w = DeadlineWheel(bucket_ms=250)
    w.add("a", 10_000)
    w.advance(9_999, deadlines.get, 100)
    assert not w.due
    w.advance(10_000, deadlines.get, 100)
    assert list(w.due) == ["a"]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 1000), st.integers(0, 10**7))
def test_due_is_at_most_one_bucket_late(bucket_ms: int, deadline: int) -> None:
    w = DeadlineWheel(bucket_ms=bucket_ms)
    w.add("a", deadline)
    w.advance(deadline + bucket_ms - 1, {"a": deadline}.get, 10)
    assert "a" in w.due
    w2 = DeadlineWheel(bucket_ms=bucket_ms)
    w2.add("a", deadline)
    w2.advance(deadline - 1, {"a": deadline}.get, 10)
    assert not w2.due


def test_a_device_that_heartbeated_is_rebucketed_and_a_gone_one_dropped() -> None:
    state: dict[str, int | None] = {"moved": 50_000, "gone": None, "stays": 1_000}
    w = DeadlineWheel()
    for device_id in state:
        w.add(device_id, 1_000)
    w.advance(2_000, state.get, 100)
    assert list(w.due) == ["stays"] and len(w) == 1  # "moved" is in a later bucket
    w.advance(50_000, state.get, 100)
    assert list(w.due) == ["stays", "moved"] and len(w) == 0


def test_advance_examines_at_most_its_budget() -> None:
    w = DeadlineWheel()
    state = {f"d{i}": 1_000 for i in range(10_000)}
    for device_id in state:
        w.add(device_id, 1_000)
    assert w.advance(5_000, state.get, 3_000) == 3_000 and len(w.due) == 3_000
    assert w.advance(5_000, state.get, 3_000) == 3_000 and len(w.due) == 6_000
    while w.advance(5_000, state.get, 3_000):
        pass
    assert len(w.due) == 10_000


def test_rebuild_scans_in_budgeted_steps_and_skips_offline_devices() -> None:
    state: dict[str, int | None] = {f"d{i}": 1_000 + i for i in range(1000)}
    state["d7"] = None
    w = DeadlineWheel()
    w.add("stale", 1)
    w.rebuild(list(state))
    assert w.rebuilding
    assert w.advance(0, state.get, 400) == 400
    w.advance(0, state.get, 400)
    w.advance(0, state.get, 400)
    assert not w.rebuilding and len(w) == 999
    w.advance(10**6, state.get, 10**6)
    assert set(w.due) == set(state) - {"d7"}


# ---- the clock anchor -----------------------------------------------------------------------


def _follow(anchor: ClockAnchor, leader_offset: int, mono_start: int, stamps: int) -> int:
    """Apply ``stamps`` entries of a leader whose clock is ``mono + leader_offset``
    (as this node's monotonic clock sees it), one per 10 ms, each applied 1-3 ms
    after it was stamped. Returns this node's mono after the last."""
    mono = mono_start
    for i in range(stamps):
        stamped = mono + leader_offset
        mono += 1 + i % 3
        anchor.observe(stamped, mono)
        mono += 10
    return mono


@settings(max_examples=200, deadline=None)
@given(
    skew=st.integers(-600_000, 600_000),  # the new leader's clock minus the old one's
    max_skew=st.integers(0, 60_000),
    ttl_ms=st.integers(1_000, 600_000),
    seen_before=st.integers(0, 599_000),
)
def test_a_new_leader_never_expires_early_by_more_than_max_skew_nor_late_for_skew(
    skew: int, max_skew: int, ttl_ms: int, seen_before: int
) -> None:
    """The old leader's clock is log time. A device last seen ``seen_before``
    ms before the election has deadline ``last_seen + ttl``. Whatever the new
    leader's wall clock says, it expires the device no earlier than
    ``deadline - max_skew`` and no later than ``deadline + 25 ms`` (the
    estimate's apply delay and one step) in log time."""
    anchor = ClockAnchor(max_skew)
    old_offset = 1_700_000_000_000  # log time = mono + old_offset
    mono = _follow(anchor, old_offset, 0, 50)
    anchor.become_leader(mono, mono + old_offset + skew, mono + old_offset - 10)
    log_now = mono + old_offset
    last_seen = log_now - seen_before
    deadline = last_seen + ttl_ms
    first = None
    for step in range(0, 700_000, 5):
        m = mono + step
        if anchor.may_expire(last_seen, deadline, m, m + old_offset + skew, log_now - 10):
            first = m + old_offset
            break
    assert first is not None
    assert first >= deadline - max_skew
    assert first <= max(deadline, log_now) + 25


def test_a_leader_change_never_resets_a_deadline() -> None:
    """Leader A dies 5 s after a device's last heartbeat (ttl 10 s); B is
    elected 2 s later: the device expires at its deadline in log time, not
    ttl after the election (etcd-io/etcd#9395), even with B's clock 3 s behind."""
    old_offset = 10**12
    anchor = ClockAnchor(500)
    mono = _follow(anchor, old_offset, 0, 100)
    last_seen = mono + old_offset
    deadline = last_seen + 10_000
    mono += 7_000  # A's last 5 s + the election
    anchor.leader_changed()  # followers saw the leader go: the estimate restarts...
    anchor.offset = None
    mono = _follow(anchor, old_offset, mono - 100, 5)  # ...from B's peer's last entries
    anchor.become_leader(mono, mono + old_offset - 3_000, last_seen)
    expire_at = next(
        m for m in range(mono, mono + 30_000, 5)
        if anchor.may_expire(last_seen, deadline, m, m + old_offset - 3_000, last_seen)
    )  # fmt: skip
    assert deadline - 500 <= expire_at + old_offset <= deadline + 25
    # B's own stamps never go below the anchor, so log time stays continuous.
    assert anchor.stamp(expire_at, expire_at + old_offset - 3_000, 0) >= expire_at + old_offset - 15


def test_a_device_seen_in_this_term_expires_by_the_leaders_stamp() -> None:
    anchor = ClockAnchor(500)
    anchor.become_leader(0, 1_000_000, 0)
    assert anchor.term_start_ms == 1_000_000
    seen = 1_000_100
    assert not anchor.may_expire(seen, seen + 2_000, 2_099, 1_002_099, 0)
    assert anchor.may_expire(seen, seen + 2_000, 2_100, 1_002_100, 0)


def test_a_stamp_never_goes_below_the_committed_log_time() -> None:
    anchor = ClockAnchor(500)
    anchor.become_leader(0, 5_000, 0)
    assert anchor.stamp(10, 5_010, 9_999) == 9_999


# ---- the planner and ExpireDevices ---------------------------------------------------------


def _expire_all(t: DeviceTable, planner: ExpiryPlanner, now: int, between: int = 0) -> list[int]:
    """Drive wheel + planner to completion the way the leader's tick does,
    applying each entry as it commits (at most two unanswered). Heartbeats
    of ``between`` other devices commit between expiry entries. Returns the
    entry sizes."""
    sizes: list[int] = []
    wheel = t.wheel
    inflight: list[tuple[int, list[tuple[str, int]]]] = []
    seq = 10
    for _ in range(100_000):
        wheel.advance(now, t.deadline_of, 10_000)
        inflight += planner.plan(wheel, t.presence_state, lambda s, d: now >= d, now, 10_000)
        assert len(planner.inflight) <= 2 and len(inflight) <= 2
        upcoming = wheel.next_deadline_ms()
        if not inflight and not wheel.due and (upcoming is None or upcoming > now):
            break
        if inflight:
            token, batch = inflight.pop(0)
            assert len(batch) <= planner.max_per_entry
            sizes.append(len(batch))
            result = t.apply_control(encode_expire(batch, now))
            planner.done(token, wheel, result.expired)
        if between:
            seq += 1
            hbs = [Heartbeat(f"live-{i}", seq, {}, 3600) for i in range(between)]
            assert all(not r.duplicate for r in t.apply(encode_batch(hbs, now)))
    return sizes


def test_a_mass_outage_of_100000_devices_commits_in_bounded_entries() -> None:
    t = DeviceTable()
    ids = [f"dev-{i:06d}" for i in range(100_000)]
    for i in range(0, len(ids), 5000):
        t.apply(encode_batch([Heartbeat(d, 1, {}, 1) for d in ids[i : i + 5000]], 1_000))
    t.apply(encode_batch([Heartbeat(f"live-{i}", 1, {}, 3600) for i in range(10)], 1_000))
    rev = t.revision
    sizes = _expire_all(t, ExpiryPlanner(), 2_000, between=10)
    assert sum(sizes) == 100_000 and max(sizes) == 1000 and len(sizes) == 100
    assert all(not t.get(d).online for d in ids[::997])  # type: ignore[union-attr]
    assert all(t.get(f"live-{i}").online for i in range(10))  # type: ignore[union-attr]
    assert t.revision == rev + 100_000 + 100 * 10


def test_a_heartbeat_racing_an_expiry_wins() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 1, {}, 1)], 1_000))
    t.wheel.advance(2_000, t.deadline_of, 10)
    planner = ExpiryPlanner()
    [(token, batch)] = planner.plan(t.wheel, t.presence_state, lambda s, d: True, 2_000, 10)
    assert batch == [("a", 1)]
    t.apply(encode_batch([Heartbeat("a", 2, {}, 1)], 2_001))  # committed first
    result = t.apply_control(encode_expire(batch, 2_002))
    assert not result.changed and result.expired == () and t.revision == 2
    d = t.get("a")
    assert d is not None and d.online
    planner.done(token, t.wheel, result.expired)
    assert "a" in t.wheel.due  # re-checked: back in the wheel at its new deadline
    t.wheel.advance(2_003, t.deadline_of, 10)
    assert planner.plan(t.wheel, t.presence_state, lambda s, d: 2_003 >= d, 2_003, 10) == []
    assert _expire_all(t, planner, 3_001 + 248) == []  # at most one bucket late
    assert _expire_all(t, planner, 3_001 + 249) == [1]
    assert t.get("a").online is False  # type: ignore[union-attr]


def test_a_duplicate_expiry_changes_nothing() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 1, {}, 1)], 1_000))
    entry = encode_expire([("a", 1)], 5_000)
    assert t.apply_control(entry).expired == ("a",)
    digest, rev = t.digest(), t.revision
    again = t.apply_control(entry)
    assert not again.changed and t.digest() == digest and t.revision == rev == 2


def test_an_expiry_of_a_deleted_or_unknown_device_changes_nothing() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 1, {}, 1)], 1_000))
    t.apply_control(encode_delete("a", 1_500))
    res = t.apply_control(encode_expire([("a", 1), ("zz", 1)], 5_000))
    assert not res.changed and t.revision == 2


def test_a_comeback_heartbeat_is_online_again_at_a_new_revision() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 1, {"v": "1"}, 1)], 1_000))
    t.apply_control(encode_expire([("a", 1)], 2_000))
    off = t.get("a")
    assert off is not None and not off.online and off.presence_changed_ms == 2_000
    assert off.revision == 2 and off.last_seen_ms == 1_000 and off.seq == 1
    [res] = t.apply(encode_batch([Heartbeat("a", 2, {"v": "1"}, 1)], 7_000))
    on = t.get("a")
    assert res.revision == 3 and on is not None and on.online and on.presence_changed_ms == 7_000
    ev = t.window.get(3)
    assert ev is not None and ev.kinds == KIND_HEARTBEAT | KIND_ONLINE
    assert t.window.get(2).kinds == KIND_OFFLINE  # type: ignore[union-attr]
    # Back in the wheel: due again after its new deadline, not before.
    t.wheel.advance(7_999, t.deadline_of, 10)
    assert "a" not in t.wheel.due
    t.wheel.advance(8_000, t.deadline_of, 10)
    assert "a" in t.wheel.due


def test_a_failed_proposal_puts_its_devices_back() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat(f"d{i}", 1, {}, 1) for i in range(5)], 1_000))
    t.wheel.advance(3_000, t.deadline_of, 100)
    planner = ExpiryPlanner()
    [(token, batch)] = planner.plan(t.wheel, t.presence_state, lambda s, d: True, 3_000, 100)
    assert len(batch) == 5 and not t.wheel.due
    planner.done(token, t.wheel, None)
    assert len(t.wheel.due) == 5 and planner.failures == 1
    [(token2, _)] = planner.plan(t.wheel, t.presence_state, lambda s, d: True, 3_000, 100)
    assert planner.give_up(t.wheel, 10_000, 5_000) == 1 and len(t.wheel.due) == 5
    planner.done(token2, t.wheel, ("d0",))  # a late answer is ignored
    assert len(t.wheel.due) == 5


def test_a_device_not_yet_expirable_by_the_anchor_waits_in_the_wheel() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 1, {}, 1)], 1_000))
    t.wheel.advance(2_000, t.deadline_of, 10)
    planner = ExpiryPlanner()
    assert planner.plan(t.wheel, t.presence_state, lambda s, d: False, 2_000, 10) == []
    assert not t.wheel.due and len(t.wheel) == 1
    t.wheel.advance(2_250, t.deadline_of, 10)
    assert "a" in t.wheel.due
