"""The watch hub (raftstate/watchhub.py), sans-IO, against a small fake event
window that follows the EventWindow interface (raftstate/eventwindow.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from watchfakes import Ev, FakeWindow

from raftstate.errors import RevisionCompacted, Unavailable, WatcherTooSlow
from raftstate.watchhub import (
    ALL_KINDS,
    KIND_DELETED,
    KIND_HEARTBEAT,
    KIND_OFFLINE,
    KIND_ONLINE,
    KIND_REPORTED_CHANGED,
    Watcher,
    WatchFilter,
    WatchHub,
)

KINDS = [KIND_REPORTED_CHANGED, KIND_HEARTBEAT, KIND_ONLINE, KIND_OFFLINE, KIND_DELETED]


def tag(ev: object, prev: bool) -> bytes:
    assert isinstance(ev, Ev)
    return f"{ev.revision}{'p' if prev else ''}".encode()


def drain(hub: WatchHub, w: Watcher, max_events: int = 7) -> list[int]:
    """Every revision ``w`` gets now, by repeated takes of small responses."""
    out: list[int] = []
    while True:
        frames, _ = hub.take(w, max_events, 1 << 20)
        if not frames and not hub.catching_up(w):
            return out
        out += [int(f.rstrip(b"p")) for f in frames]


def make(limit: int = 1_000_000, max_pending: int = 1000) -> tuple[FakeWindow, WatchHub]:
    window = FakeWindow(limit)
    return window, WatchHub(window, tag, max_pending=max_pending)


filters = st.builds(
    WatchFilter,
    prefix=st.sampled_from(["", "a", "ab", "b", "abc"]),
    kinds=st.integers(1, 31).map(lambda m: sum(k for i, k in enumerate(KINDS) if m >> i & 1)),
)
id_filters = st.builds(
    WatchFilter,
    device_ids=st.frozensets(st.sampled_from(["a", "ab", "abc", "b", "ba"]), min_size=1),
)


@settings(max_examples=60, deadline=None)
@given(
    flts=st.lists(st.one_of(filters, id_filters), min_size=1, max_size=8),
    events=st.lists(
        st.tuples(st.sampled_from(["a", "ab", "abc", "abd", "b", "ba", "c"]), st.integers(1, 31)),
        max_size=80,
    ),
    split=st.integers(0, 80),
)
def test_each_watcher_gets_exactly_its_matching_events_in_order(
    flts: list[WatchFilter], events: list[tuple[str, int]], split: int
) -> None:
    window, hub = make()
    watchers = [hub.register(f) for f in flts]
    got: dict[int, list[int]] = {w.id: [] for w in watchers}
    for i, (dev, m) in enumerate(events):
        window.append(dev, sum(k for j, k in enumerate(KINDS) if m >> j & 1))
        if i == split:  # dispatch in two rounds, taking in between
            hub.advance_all()
            for w in watchers:
                got[w.id] += drain(hub, w)
    hub.advance_all()
    for w in watchers:
        got[w.id] += drain(hub, w)
        want = [r for r, ev in sorted(window.events.items()) if w.filter.matches(ev)]
        assert got[w.id] == want


def test_prefix_ids_and_kinds_select_events() -> None:
    window, hub = make()
    by_prefix = hub.register(WatchFilter(prefix="pump-"))
    by_ids = hub.register(WatchFilter(device_ids=frozenset({"valve-2"})))
    offline = hub.register(WatchFilter(kinds=KIND_OFFLINE))
    window.append("pump-1")
    window.append("valve-2")
    window.append("valve-3", KIND_OFFLINE)
    window.append("pump-9", KIND_OFFLINE | KIND_DELETED)
    hub.advance_all()
    assert drain(hub, by_prefix) == [1, 4]
    assert drain(hub, by_ids) == [2]
    assert drain(hub, offline) == [3, 4]


def test_catch_up_from_history_then_live_events_in_order_once() -> None:
    window, hub = make()
    for i in range(50):
        window.append(f"d{i % 3}")
    hub.advance_all()
    w = hub.register(WatchFilter(start_revision=10, device_ids=frozenset({"d1"})))
    for i in range(50, 60):  # live events queue while the catch-up is unread
        window.append(f"d{i % 3}")
    hub.advance_all()
    assert drain(hub, w, max_events=2) == [r for r in range(10, 61) if (r - 1) % 3 == 1]


def test_start_older_than_the_window_is_revision_compacted() -> None:
    window, hub = make(limit=10)
    for _ in range(30):
        window.append("a")
    hub.advance_all()
    with pytest.raises(RevisionCompacted) as err:
        hub.register(WatchFilter(start_revision=20))
    assert (err.value.oldest_revision, err.value.current_revision) == (21, 30)
    assert hub.watchers == 0
    assert drain(hub, hub.register(WatchFilter(start_revision=21))) == list(range(21, 31))


def test_catch_up_overtaken_by_trimming_fails_with_revision_compacted() -> None:
    window, hub = make(limit=20)
    for _ in range(20):
        window.append("a")
    hub.advance_all()
    w = hub.register(WatchFilter(start_revision=1))
    frames, _ = hub.take(w, 5, 1 << 20)
    assert len(frames) == 5
    for _ in range(10):  # trims revisions 1..10 before the watcher read 6..10
        window.append("a")
    hub.advance_all()
    with pytest.raises(RevisionCompacted):
        drain(hub, w)
    assert hub.watchers == 0


def test_future_start_waits_and_skips_earlier_events() -> None:
    window, hub = make()
    window.append("a")
    hub.advance_all()
    w = hub.register(WatchFilter(start_revision=5))
    assert w.served_through == 1
    for _ in range(6):
        window.append("a")
    hub.advance_all()
    assert drain(hub, w) == [5, 6, 7]


def test_a_watcher_past_max_pending_is_dropped_with_its_resume_revision() -> None:
    window, hub = make(max_pending=8)
    w = hub.register(WatchFilter(prefix="a"))
    other = hub.register(WatchFilter(prefix="b"))
    window.append("a")
    window.append("a")
    hub.advance_all()
    assert drain(hub, w) == [1, 2]
    for _ in range(8):
        window.append("a")
    hub.advance_all()
    assert not w.failed  # exactly max_pending queued: still alive
    window.append("a")
    hub.advance_all()
    assert isinstance(w.failed, WatcherTooSlow)
    assert w.failed.resume_revision == 3
    assert "watch_max_pending" in w.failed.message
    assert not w.pending  # memory freed at once
    assert hub.watchers == 1 and hub.stats.slow_dropped == 1
    with pytest.raises(WatcherTooSlow):
        hub.take(w, 10, 1 << 20)
    window.append("b")
    hub.advance_all()
    assert drain(hub, other) == [12]  # the others go on


def test_events_lost_before_dispatch_fail_watchers_never_a_silent_gap() -> None:
    window, hub = make(limit=5)
    w = hub.register(WatchFilter())
    for _ in range(12):  # the loop did not run while the window moved on
        window.append("a")
    hub.advance_all()
    assert isinstance(w.failed, WatcherTooSlow)
    assert w.failed.resume_revision == 1
    assert hub.position == 12 and hub.stats.gaps == 1


def test_progress_revision_covers_non_matching_events() -> None:
    window, hub = make()
    w = hub.register(WatchFilter(prefix="x"))
    for _ in range(5):
        window.append("a")
    hub.advance_all()
    assert hub.take(w, 10, 1 << 20) == ([], 5)
    assert w.resume_revision == 6


def test_each_event_is_encoded_once_per_prev_flag_across_watchers() -> None:
    window = FakeWindow()
    calls: list[tuple[int, bool]] = []

    def counting(ev: object, prev: bool) -> bytes:
        assert isinstance(ev, Ev)
        calls.append((ev.revision, prev))
        return tag(ev, prev)

    hub = WatchHub(window, counting, max_pending=100)
    plain = [hub.register(WatchFilter()) for _ in range(50)]
    prev = [hub.register(WatchFilter(prev_device=True)) for _ in range(50)]
    for _ in range(10):
        window.append("a")
    hub.advance_all()
    assert sorted(calls) == sorted([(r, p) for r in range(1, 11) for p in (False, True)])
    assert drain(hub, plain[0]) == list(range(1, 11))
    assert hub.take(prev[0], 1, 100)[0] == [b"1p"]


def test_response_size_is_capped_by_events_and_bytes() -> None:
    window, hub = make()
    w = hub.register(WatchFilter())
    for _ in range(20):
        window.append("a")
    hub.advance_all()
    assert len(hub.take(w, 5, 1 << 20)[0]) == 5
    assert hub.take(w, 100, 3)[0] == [b"6", b"7", b"8"]  # a fourth would pass 3 bytes
    assert hub.take(w, 100, 1)[0] == [b"9"]
    assert hub.take(w, 100, 1)[0] == [b"10"]  # one event larger than the cap still goes
    assert hub.watchers == 1


def test_unregister_leaves_no_index_entries() -> None:
    _, hub = make()
    ws = [
        hub.register(WatchFilter(prefix="p")),
        hub.register(WatchFilter(device_ids=frozenset({"x", "y"}))),
        hub.register(WatchFilter()),
    ]
    for w in ws:
        hub.unregister(w)
        hub.unregister(w)
    assert hub.watchers == 0
    assert not hub._by_id and not hub._by_prefix and not hub._all


def test_notify_from_another_thread_is_coalesced_into_few_runs() -> None:
    window, hub = make()
    runs = 0
    real_run = hub.run

    def counted() -> None:
        nonlocal runs
        runs += 1
        real_run()

    hub.run = counted  # type: ignore[method-assign]

    async def main() -> list[int]:
        hub.attach(asyncio.get_running_loop())
        w = hub.register(WatchFilter())

        def tick_thread() -> None:
            for _ in range(200):
                window.append("a")
                hub.notify(window.latest)

        t = threading.Thread(target=tick_thread)
        t.start()
        t.join()
        for _ in range(10):
            await asyncio.sleep(0)
        return drain(hub, w, max_events=1000)

    assert asyncio.run(main()) == list(range(1, 201))
    assert 1 <= runs < 20


def test_all_kinds_mask_is_every_event_kind() -> None:
    assert sum(KINDS) == ALL_KINDS


def test_close_ends_every_watch_with_the_given_error() -> None:
    _, hub = make()
    ws = [hub.register(WatchFilter()), hub.register(WatchFilter(prefix="p"))]
    woken: list[int] = []
    for w in ws:
        w.on_ready = lambda w=w: woken.append(w.id)
    hub.close(Unavailable("shutting down", "SHUTTING_DOWN"))
    assert sorted(woken) == sorted(w.id for w in ws) and hub.watchers == 0
    with pytest.raises(Unavailable):
        hub.take(ws[0], 10, 100)
