"""Batcher: the group-commit policy (sans-IO, time is an input)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from raftstate.batcher import Batcher, SlotSizer, slots_for


def make(**kw: int | float) -> Batcher[int]:
    opts = dict(max_delay=0.005, max_items=4, max_bytes=1000, max_inflight=2)
    opts.update(kw)
    return Batcher(**opts)  # type: ignore[arg-type]


def test_idle_batcher_proposes_immediately() -> None:
    b = make()
    assert b.add(1, 10, now=0.0) == [[1]]
    assert b.inflight == 1


def test_items_accumulate_while_a_batch_is_in_flight() -> None:
    b = make()
    b.add(1, 10, 0.0)
    assert b.add(2, 10, 0.001) == []
    assert b.add(3, 10, 0.002) == []
    assert b.finished(0.003) == [[2, 3]]


def test_full_batch_is_sealed_without_waiting() -> None:
    b = make(max_inflight=1)
    b.add(0, 10, 0.0)
    out = []
    for i in range(1, 5):
        out += b.add(i, 10, 0.0)
    assert out == [[1, 2, 3, 4]]


def test_byte_bound_seals_before_overflow() -> None:
    b = make(max_inflight=1, max_bytes=100)
    b.add(0, 10, 0.0)
    assert b.add(1, 60, 0.0) == []
    assert b.add(2, 60, 0.0) == [[1]]
    assert b.pending == 1


def test_old_batch_pipelines_only_when_a_slot_is_free() -> None:
    b = make(max_inflight=2)
    b.add(1, 10, 0.0)  # in flight: 1
    b.add(2, 10, 0.001)
    assert b.deadline() == 0.001 + 0.005
    assert b.poll(0.004) == []
    assert b.poll(0.006) == [[2]]  # slot 2 used
    b.add(3, 10, 0.007)
    assert b.poll(1.0) == []  # both slots busy: waits however old it is
    assert b.finished(1.0) == [[3]]


def test_drain_returns_pending_and_resets() -> None:
    b = make()
    b.add(1, 10, 0.0)
    b.add(2, 10, 0.0)
    assert b.drain() == [2]
    assert b.pending == 0 and b.deadline() is None


def test_deadline_never_asks_for_a_poll_that_cannot_seal() -> None:
    """With every in-flight slot taken, waiting seals nothing: a past
    deadline would make the driver re-arm its timer in the past and spin
    (seen: a follower's loop at 92-96 % CPU while its leader was stopped)."""
    b: Batcher[str] = Batcher(max_delay=0.005, max_items=512, max_bytes=1 << 20, max_inflight=2)
    assert b.add("a", 1, 0.0) == [["a"]]  # nothing in flight: sealed at once
    assert b.add("b", 1, 0.0) == []
    assert b.poll(0.01) == [["b"]]  # old, and a slot was free
    assert b.add("c", 1, 0.01) == []
    for now in (0.02, 0.5, 10.0):
        assert b.poll(now) == []
        deadline = b.deadline()
        assert deadline is None or deadline > now
    assert b.finished(10.0) == [["c"]]  # a freed slot seals it


# ---------------------------------------------------------------- slots by commit time


@given(st.floats(0.0, 2.0), st.floats(0.0005, 0.05), st.integers(1, 16), st.integers(1, 128))
def test_slots_cover_the_commit_time_within_bounds(
    commit: float, max_delay: float, floor: int, cap: int
) -> None:
    n = slots_for(commit, max_delay, floor, cap)
    assert floor <= n <= max(floor, cap)
    if floor < n < max(floor, cap):
        # enough slots to seal one batch every max_delay while each waits commit
        assert (n - 1) * max_delay >= commit > (n - 2) * max_delay


def test_lan_keeps_the_floor_and_wan_gets_a_bandwidth_delay_worth() -> None:
    lan = SlotSizer(floor=4, cap=32, max_delay=0.005)
    wan = SlotSizer(floor=4, cap=32, max_delay=0.005)
    for _ in range(20):
        n_lan = lan.observe(0.0015)
        n_wan = wan.observe(0.080)
    assert n_lan == 4
    assert n_wan == 17  # ceil(80 / 5) + 1
    bad = SlotSizer(floor=4, cap=32, max_delay=0.005)
    assert max(bad.observe(0.4) for _ in range(5)) == 32  # capped


def test_slow_commits_from_cpu_queueing_do_not_raise_the_slots() -> None:
    """Commits stretched by a busy CPU (not the network) leave the slots
    at what the fastest recent commit, the round trip, needs."""
    lan = SlotSizer(floor=4, cap=32, max_delay=0.005, window=16)
    lan.observe(0.001)
    assert all(lan.observe(0.3) == 4 for _ in range(10))
    assert lan.commit_s == 0.001
    for _ in range(16):  # the old fast sample ages out of the window
        n = lan.observe(0.3)
    assert n == 32
