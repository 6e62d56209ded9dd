"""Reads at a revision against a brute-force model of every revision's state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate import devicerecord
from raftstate.errors import FutureRevision, RevisionCompacted
from raftstate.eventwindow import EventWindow
from raftstate.model import Heartbeat, OnlineFilter
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete, encode_expire

IDS = ["a", "a-1", "a-2", "b", "b-1", "c"]

#: (kind, device index, value): heartbeat / delete / expire / stale expire.
op = st.tuples(
    st.sampled_from(["hb", "hb", "hb", "del", "exp", "stale"]),
    st.integers(0, len(IDS) - 1),
    st.sampled_from(["0", "1", "2"]),
)

State = dict[str, tuple[int, tuple[tuple[str, str], ...], bool]]


def _state(t: DeviceTable) -> State:
    out: State = {}
    for device_id in IDS:
        d = t.get(device_id)
        if d is not None:
            out[device_id] = (d.seq, tuple(sorted(d.reported.items())), d.online)
    return out


def _listed(t: DeviceTable, rev: int, prefix: str, limit: int, scan: int, f: OnlineFilter) -> State:
    out: State = {}
    after: str | None = None
    for _ in range(100):
        page = t.list(
            prefix=prefix, after=after, limit=limit, max_scan=scan, online=f, at_revision=rev
        )
        for d in page.devices:
            assert d.device_id not in out, "a device listed twice"
            out[d.device_id] = (d.seq, tuple(sorted(d.reported.items())), d.online)
        if page.next_after is None:
            return out
        after = page.next_after
    raise AssertionError("listing did not end")


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op, max_size=80),
    max_events=st.integers(1, 60),
    limit=st.integers(1, 4),
    scan=st.integers(1, 8),
)
def test_list_and_get_at_every_retained_revision_match_the_model(
    ops: list[tuple[str, int, str]], max_events: int, limit: int, scan: int
) -> None:
    t = DeviceTable(default_ttl_s=1, window=EventWindow(max_events=max_events))
    model: dict[int, State] = {0: {}}
    seq = 0
    now = 1000
    for kind, i, value in ops:
        device_id = IDS[i]
        now += 7
        seq += 1
        if kind == "hb":
            t.apply(encode_batch([Heartbeat(device_id, seq, {"v": value})], now))
        elif kind == "del":
            t.apply_control(encode_delete(device_id, now))
        else:
            record = t._recs.get(device_id)
            rev = devicerecord.revision_of(record) if record is not None else 1
            t.apply_control(encode_expire([(device_id, rev - (kind == "stale"))], now))
        model[t.revision] = _state(t)
    latest = t.revision
    assert t.window.latest == latest and len(t.window) == min(latest, max_events)
    for rev in range(t.window.oldest - 1, latest + 1):
        if rev == 0:
            continue
        want = model[rev]
        for prefix in ("", "a", "a-", "b-1", "z"):
            for f in OnlineFilter:
                got = _listed(t, rev, prefix, limit, scan, f)
                expect = {
                    d: s
                    for d, s in want.items()
                    if d.startswith(prefix)
                    and (f is OnlineFilter.ALL or s[2] == (f is OnlineFilter.ONLINE))
                }
                assert got == expect, (rev, prefix, f)
        for device_id in IDS:
            view = t.get_at(device_id, rev)
            got_one = (
                None
                if view is None
                else (view.seq, tuple(sorted(view.reported.items())), view.online)
            )
            assert got_one == want.get(device_id), (rev, device_id)
            if view is not None:
                assert view.revision <= rev
    if t.window.oldest - 2 >= 1:
        with pytest.raises(RevisionCompacted) as err:
            t.list(at_revision=t.window.oldest - 2)
        assert (err.value.oldest_revision, err.value.current_revision) == (t.window.oldest, latest)
        with pytest.raises(RevisionCompacted):
            t.get_at("a", 1)
    with pytest.raises(FutureRevision) as future:
        t.get_at("a", latest + 1)
    assert future.value.current_revision == latest


def test_a_device_deleted_after_the_revision_is_listed_at_it() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat(d, 1, {}) for d in ("x-1", "x-2", "x-3")], 1))
    t.apply_control(encode_delete("x-2", 2))
    assert [d.device_id for d in t.list(prefix="x-", at_revision=3).devices] == [
        "x-1",
        "x-2",
        "x-3",
    ]
    assert [d.device_id for d in t.list(prefix="x-").devices] == ["x-1", "x-3"]
    assert t.get_at("x-2", 4) is None and t.tombstones == {"x-2": 4}


def test_tombstones_leave_with_their_event() -> None:
    t = DeviceTable(window=EventWindow(max_events=3))
    t.apply(encode_batch([Heartbeat("x", 1, {})], 1))
    t.apply_control(encode_delete("x", 2))
    assert t.tombstones == {"x": 2}
    t.apply(encode_batch([Heartbeat(f"y{i}", 1, {}) for i in range(3)], 3))
    assert t.tombstones == {} and t.window.oldest == 3


def test_a_recreated_device_drops_its_tombstone_and_chains_to_the_delete() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("x", 1, {"v": "old"})], 1))
    t.apply_control(encode_delete("x", 2))
    t.apply(encode_batch([Heartbeat("x", 1, {"v": "new"})], 3))
    assert t.tombstones == {}
    ev = t.window.get(3)
    assert ev is not None and ev.prev_rev == 2 and ev.before is None
    old = t.get_at("x", 1)
    assert old is not None and old.reported == {"v": "old"}
    assert t.get_at("x", 2) is None
    assert t.get_at("x", 3).reported == {"v": "new"}  # type: ignore[union-attr]
