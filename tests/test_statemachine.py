"""DeviceTable: the deterministic state machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftstate import snapshotfile
from raftstate.errors import DecodeError
from raftstate.model import Heartbeat, OnlineFilter
from raftstate.statemachine import DeviceTable, encode_batch, encode_expire


def hb(device_id: str, seq: int, **reported: str) -> Heartbeat:
    return Heartbeat(device_id, seq, reported)


def test_first_heartbeat_creates_device_and_bumps_revision() -> None:
    t = DeviceTable()
    [res] = t.apply(encode_batch([hb("a", 5, temp="20")], proposed_at_ms=1000))
    assert (res.revision, res.duplicate, res.stored_seq) == (1, False, 5)
    d = t.get("a")
    assert d is not None
    assert (d.seq, dict(d.reported), d.first_seen_ms, d.last_seen_ms, d.heartbeats) == (
        5,
        {"temp": "20"},
        1000,
        1000,
        1,
    )
    assert d.ttl_s == 30


def test_stale_or_equal_seq_is_a_duplicate_that_changes_nothing() -> None:
    t = DeviceTable()
    t.apply(encode_batch([hb("a", 5, v="new")], 1000))
    before = t.digest()
    results = t.apply(encode_batch([hb("a", 5, v="x"), hb("a", 3, v="y")], 2000))
    assert [(r.duplicate, r.revision, r.stored_seq) for r in results] == [
        (True, 1, 5),
        (True, 1, 5),
    ]
    assert t.digest() == before
    assert t.revision == 1


def test_retried_batch_applies_each_heartbeat_once() -> None:
    t = DeviceTable()
    entry = encode_batch([hb("a", 1), hb("b", 1), hb("a", 2)], 1000)
    first = t.apply(entry)
    second = t.apply(entry)
    assert [r.duplicate for r in first] == [False, False, False]
    assert [r.duplicate for r in second] == [True, True, True]
    a = t.get("a")
    assert a is not None and a.heartbeats == 2 and t.revision == 3


def test_last_seen_never_goes_backwards_with_skewed_proposers() -> None:
    t = DeviceTable()
    t.apply(encode_batch([hb("a", 1)], 5000))
    t.apply(encode_batch([hb("a", 2)], 4000))  # a follower with a slow clock proposed it
    d = t.get("a")
    assert d is not None and d.last_seen_ms == 5000 and d.first_seen_ms == 5000


def test_ttl_comes_from_heartbeat_and_persists_until_changed() -> None:
    t = DeviceTable(default_ttl_s=30)
    t.apply(encode_batch([Heartbeat("a", 1, {}, ttl_s=120)], 0))
    t.apply(encode_batch([hb("a", 2)], 1))
    d = t.get("a")
    assert d is not None and d.ttl_s == 120
    assert d.online and d.deadline_ms == 1 + 120_000


def test_empty_batch_is_a_read_barrier_with_no_effect() -> None:
    t = DeviceTable()
    assert t.apply(encode_batch([], 1)) == []
    assert t.revision == 0 and len(t) == 0


def test_apply_is_deterministic_across_replicas() -> None:
    entries = [encode_batch([hb(f"d{i % 7}", i, n=str(i))], 1000 + i) for i in range(1, 200)]
    a, b = DeviceTable(), DeviceTable()
    for e in entries:
        a.apply(e)
        b.apply(e)
    assert a.digest() == b.digest()


def test_garbage_entry_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        DeviceTable().apply(b"\xff\xff\xff not protobuf")


def test_snapshot_round_trip_preserves_everything(tmp_path: Path) -> None:
    t = DeviceTable()
    for i in range(1, 50):
        t.apply(encode_batch([hb(f"dev-{i % 10}", i, k=str(i))], 100 * i))
    path = str(tmp_path / "snapshot.bin")
    capture = t.capture()
    snapshotfile.write(
        path, capture, snapshotfile.RaftFields((b"", 1, 1), (b"", 0, 0), ()), fsync=False
    )
    t.release(capture)
    restored = DeviceTable()
    restored.install(snapshotfile.load(path).table)
    assert restored.digest() == t.digest()
    assert restored.revision == t.revision
    assert restored.list(limit=100).devices == t.list(limit=100).devices


def test_list_pages_in_id_order_with_prefix() -> None:
    t = DeviceTable()
    ids = ["a-3", "b-1", "a-1", "a-2", "c", "a-10"]
    t.apply(encode_batch([hb(i, 1) for i in ids], 0))
    page1 = t.list(prefix="a-", limit=2)
    assert [d.device_id for d in page1.devices] == ["a-1", "a-10"]
    assert page1.next_after == "a-10"
    page2 = t.list(prefix="a-", after=page1.next_after, limit=2)
    assert [d.device_id for d in page2.devices] == ["a-2", "a-3"]
    page3 = t.list(prefix="a-", after=page2.next_after, limit=2)
    assert page3.devices == [] and page3.next_after is None


def test_list_filters_by_committed_presence() -> None:
    t = DeviceTable(default_ttl_s=10)
    t.apply(encode_batch([hb("old", 1)], 0))
    t.apply(encode_batch([hb("new", 1)], 50_000))
    # Past old's deadline but nothing committed: still online (no read-time clock).
    assert [d.device_id for d in t.list(online=OnlineFilter.ONLINE).devices] == ["new", "old"]
    t.apply_control(encode_expire([("old", 1)], 50_001))
    assert [d.device_id for d in t.list(online=OnlineFilter.ONLINE).devices] == ["new"]
    assert [d.device_id for d in t.list(online=OnlineFilter.OFFLINE).devices] == ["old"]
