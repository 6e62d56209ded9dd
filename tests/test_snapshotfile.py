"""The scalable table: sorted ids in blocks, compact records, snapshots
captured copy-on-write and written/loaded off the tick thread."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj.config import SERIALIZER_STATE

from raftstate import devicerecord, snapshotfile
from raftstate.integrity import CorruptData, seal_snapshot
from raftstate.internal.v1 import storage_pb2
from raftstate.model import REPORTED_MAX_BYTES, DeviceView, Heartbeat
from raftstate.raftnode import SnapshotCodec
from raftstate.snapshotter import BackgroundSerializer
from raftstate.sortedids import SortedIds
from raftstate.statemachine import DeviceTable, encode_batch, encode_expire

RAFT = snapshotfile.RaftFields((b"last", 9, 2), (b"prev", 8, 2), ("n1:1", "n2:1"))
ids_strategy = st.text(alphabet="ab.:-09", min_size=1, max_size=6)


# ---- SortedIds ------------------------------------------------------------------------


@given(st.lists(st.tuples(st.booleans(), ids_strategy), max_size=400), st.integers(2, 9))
def test_sorted_ids_match_a_sorted_set_through_adds_and_discards(
    ops: list[tuple[bool, str]], block: int
) -> None:
    ids = SortedIds(block=block)
    model: set[str] = set()
    for add, device_id in ops:
        if add:
            assert ids.add(device_id) == (device_id not in model)
            model.add(device_id)
        else:
            assert ids.discard(device_id) == (device_id in model)
            model.discard(device_id)
        assert len(ids) == len(model)
    assert list(ids) == sorted(model)
    for probe in ["", "a", "a.", "b", "9", "zz"]:
        assert (
            ids.window(probe, inclusive=True, limit=7)
            == [i for i in sorted(model) if i >= probe][:7]
        )
        assert (
            ids.window(probe, inclusive=False, limit=3)
            == [i for i in sorted(model) if i > probe][:3]
        )
        assert (probe in ids) == (probe in model)


@given(
    st.lists(ids_strategy, max_size=100, unique=True),
    st.lists(st.tuples(st.booleans(), ids_strategy), max_size=200),
)
def test_a_frozen_copy_never_changes_while_the_ids_do(
    start: list[str], ops: list[tuple[bool, str]]
) -> None:
    ids = SortedIds(sorted(start), block=3)
    frozen = ids.freeze()
    before = [list(b) for b in frozen]
    model = set(start)
    for add, device_id in ops:
        (ids.add if add else ids.discard)(device_id)
        (model.add if add else model.discard)(device_id)
    assert [list(b) for b in frozen] == before
    assert [i for b in frozen for i in b] == sorted(start)
    assert list(ids) == sorted(model)
    ids.thaw()
    ids.add("zzzz")
    assert list(ids)[-1] == "zzzz"


def test_sorted_ids_insert_cost_does_not_grow_with_the_table() -> None:
    """200,000 random inserts into blocks: each touches one block, so the
    largest block stays bounded (a single list would memmove O(n))."""
    rng = random.Random(1)
    ids = SortedIds(block=64)
    for _ in range(200_000):
        ids.add(f"dev-{rng.randrange(10**9):09d}")
    assert max(len(b) for b in ids._blocks) <= 128
    assert list(ids) == sorted(ids)


# ---- compact records ------------------------------------------------------------------


@given(
    st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=128),
    st.integers(1, 2**64 - 1),
    st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=64),
    st.integers(0, 2**63 - 1),
    st.integers(0, 7 * 24 * 3600),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
)
def test_a_record_round_trips_every_field(
    device_id: str,
    seq: int,
    reported: dict[str, str],
    revision: int,
    ttl_s: int,
    online: bool,
    changed_ms: int,
) -> None:
    view = DeviceView(
        device_id, seq, reported, revision, 5, 2**62, 2**40, ttl_s, 77, online, changed_ms
    )
    record = devicerecord.from_view(view)
    assert devicerecord.view(record) == view
    assert devicerecord.device_id_of(record) == device_id
    assert devicerecord.seq_of(record) == seq


def test_a_full_size_heartbeat_is_stored_whole() -> None:
    reported = {f"k{i:02d}": "v" * (REPORTED_MAX_BYTES // 64 - 3) for i in range(64)}
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("x" * 128, 2**64 - 1, reported)], 1))
    d = t.get("x" * 128)
    assert d is not None and d.reported == reported and d.seq == 2**64 - 1


# ---- snapshot file --------------------------------------------------------------------


def _table(n: int, seed: int = 3, payload: int = 12) -> DeviceTable:
    rng = random.Random(seed)
    t = DeviceTable()
    hbs = [
        Heartbeat(
            f"d{rng.randrange(10 * n + 1):07d}",
            rng.randrange(1, 2**64),
            {"p": "x" * rng.randrange(payload + 1)},
        )
        for _ in range(n)
    ]
    for i in range(0, len(hbs), 50):
        t.apply(encode_batch(hbs[i : i + 50], 1000 + i))
    return t


def _write(t: DeviceTable, path: Path) -> snapshotfile.Written:
    capture = t.capture()
    try:
        return snapshotfile.write(str(path), capture, RAFT, fsync=False)
    finally:
        t.release(capture)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 600), st.integers(1, 4096))
def test_a_snapshot_loads_back_equal_whatever_the_piece_size(n: int, piece: int) -> None:
    t = _table(n, payload=300)
    import io

    capture = t.capture()
    buf = io.BytesIO()
    snapshotfile.write_to(buf, capture, RAFT)
    t.release(capture)
    data = buf.getvalue()
    loaded = snapshotfile.load_bytes(data[i : i + piece] for i in range(0, len(data), piece))
    u = DeviceTable()
    u.install(loaded.table)
    assert u.digest() == t.digest() and u.state_bytes == t.state_bytes and len(u) == len(t)
    assert loaded.raft == RAFT


def test_every_bit_flip_and_every_cut_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    _write(_table(20), path)
    data = path.read_bytes()
    for bit in range(0, len(data) * 8, 13):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptData):
            snapshotfile.load_bytes([bytes(flipped)])
    for cut in range(0, len(data), 17):
        with pytest.raises(CorruptData):
            snapshotfile.load_bytes([data[:cut]])
    with pytest.raises(CorruptData):
        snapshotfile.load_bytes([data + b"\0"])


def test_a_sealed_frame_with_records_out_of_order_is_refused() -> None:
    header = storage_pb2.Snapshot(format=snapshotfile.FORMAT, device_count=2).SerializeToString()
    a = devicerecord.from_view(DeviceView("b", 1, {}, 1, 0, 0, 1, 30, 1))
    b = devicerecord.from_view(DeviceView("a", 1, {}, 2, 0, 0, 1, 30, 1))
    import struct

    payload = struct.pack("<I", len(header)) + header
    for r in (a, b):
        payload += struct.pack("<I", len(r)) + r
    sealed = seal_snapshot(payload).replace(b"RSSNAP\x00\x02", snapshotfile.MAGIC_V2, 1)
    with pytest.raises(CorruptData, match="out of order|SHA"):
        snapshotfile.load_bytes([sealed])


def test_a_format_1_snapshot_still_loads(tmp_path: Path) -> None:
    t = _table(30)
    snap = storage_pb2.Snapshot(
        format=1, revision=t.revision, max_proposed_at_ms=t.max_proposed_at_ms
    )
    for device_id in sorted(t._recs):
        d = t.get(device_id)
        assert d is not None
        snap.devices.add(
            device_id=d.device_id, seq=d.seq, reported=d.reported, revision=d.revision,
            first_seen_ms=d.first_seen_ms, last_seen_ms=d.last_seen_ms,
            heartbeats=d.heartbeats, ttl_s=d.ttl_s,
        )  # fmt: skip
    snap.last_entry.index = 9
    path = tmp_path / "old.bin"
    path.write_bytes(seal_snapshot(snap.SerializeToString()))
    snapshotfile.verify(str(path))
    u = DeviceTable()
    u.install(snapshotfile.load(str(path)).table)
    assert u.state_bytes == t.state_bytes and u.revision == t.revision
    # Format 1 had no presence: upgraded online, changed at last_seen_ms.
    for device_id in t._recs:
        old, new = t.get(device_id), u.get(device_id)
        assert old is not None and new is not None
        assert new == dataclasses.replace(old, presence_changed_ms=old.last_seen_ms)


def _presence_table() -> DeviceTable:
    """A table with online and offline devices and varied presence times."""
    t = _table(200)
    ids = sorted(t._recs)
    expire = [(d, devicerecord.revision_of(t._recs[d])) for d in ids[::3]]
    t.apply_control(encode_expire(expire, 10**7))
    t.apply(encode_batch([Heartbeat(d, 2**64 - 1, {"back": "1"}) for d in ids[::9]], 10**7 + 5))
    return t


def test_a_format_3_snapshot_round_trips_presence() -> None:
    t = _presence_table()
    views = {d: t.get(d) for d in t._recs}
    assert any(v is not None and not v.online for v in views.values())
    assert any(v is not None and v.online and v.presence_changed_ms == 10**7 + 5
               for v in views.values())  # fmt: skip
    u = DeviceTable()
    u.install(snapshotfile.copy_table(t))
    assert u.digest() == t.digest()
    assert {d: u.get(d) for d in u._recs} == views


def test_a_format_2_snapshot_still_loads_with_every_device_online() -> None:
    """A format-2 file (48-byte record heads, header format 2), as written
    before committed presence: each record is upgraded on load."""
    import io
    import struct

    t = _table(300)
    capture = t.capture()
    buf = io.BytesIO()
    snapshotfile.write_to(buf, capture, RAFT)
    t.release(capture)
    loaded3 = snapshotfile.load_bytes([buf.getvalue()])
    header = storage_pb2.Snapshot(
        format=2, revision=t.revision, max_proposed_at_ms=t.max_proposed_at_ms,
        device_count=len(t),
    ).SerializeToString()  # fmt: skip
    payload = struct.pack("<I", len(header)) + header
    v2 = devicerecord.HEAD_V2_SIZE
    for device_id in sorted(t._recs):
        r = t._recs[device_id]
        old = r[:v2] + r[devicerecord.HEAD_SIZE :]
        payload += struct.pack("<I", len(old)) + old
    head = struct.pack("<8sQ", snapshotfile.MAGIC_V2, len(payload))
    sealed = head + payload + hashlib.sha256(head + payload).digest()
    loaded2 = snapshotfile.load_bytes([sealed[i : i + 777] for i in range(0, len(sealed), 777)])
    u = DeviceTable()
    u.install(loaded2.table)
    assert u.state_bytes == t.state_bytes and len(u) == len(t) and u.revision == t.revision
    for device_id in t._recs:
        new = u.get(device_id)
        assert new is not None and new.online and new.presence_changed_ms == new.last_seen_ms
    assert loaded3.table.recs == t._recs


def test_a_capture_is_the_table_at_capture_time_while_applies_continue(tmp_path: Path) -> None:
    """A writer thread encodes a capture while this thread keeps applying
    updates, creates and deletes: the file holds exactly the captured table."""
    t = _table(3000)
    expected = t.digest()
    expected_len, expected_rev = len(t), t.revision
    capture = t.capture()
    path = tmp_path / "s.bin"
    done = threading.Event()

    def writer() -> None:
        snapshotfile.write(str(path), capture, RAFT, fsync=False)
        done.set()

    threading.Thread(target=writer).start()
    rng = random.Random(5)
    from raftstate.statemachine import encode_delete

    ids = sorted(t._recs)
    n = 0
    while not done.is_set() or n < 200:
        n += 1
        t.apply(encode_batch([Heartbeat(rng.choice(ids), 2**64 - n, {"new": str(n)})], 10**7 + n))
        t.apply(encode_batch([Heartbeat(f"new-{n}", 1, {})], 10**7 + n))
        t.apply_control(encode_delete(rng.choice(ids), 10**7 + n))
    t.release(capture)
    u = DeviceTable()
    u.install(snapshotfile.load(str(path)).table)
    assert (len(u), u.revision) == (expected_len, expected_rev)
    assert u.digest() == expected
    assert t.digest() != expected


# ---- pysyncobj's serializer protocol ---------------------------------------------------


def _serializer(path: Path, table: DeviceTable) -> tuple[BackgroundSerializer, SnapshotCodec]:
    codec = SnapshotCodec(table, fsync=False)
    s = BackgroundSerializer(
        str(path),
        1024,
        False,
        None,
        None,
        None,
        codec=codec,
        verify=SnapshotCodec.verify,
    )
    return s, codec


def test_serialize_returns_at_once_and_reports_success_when_written(tmp_path: Path) -> None:
    t = _table(2000)
    s, codec = _serializer(tmp_path / "snapshot.bin", t)
    captured = len(t)
    assert s.checkSerializing() == (SERIALIZER_STATE.NOT_SERIALIZING, None)
    s.serialize((None, (b"l", 7, 1), (b"p", 6, 1), set()), 6)
    states = []
    while (state := s.checkSerializing())[0] == SERIALIZER_STATE.SERIALIZING:
        states.append(state)
        t.apply(encode_batch([Heartbeat("late", len(states), {})], 1))
    assert state == (SERIALIZER_STATE.SUCCESS, 6)
    assert t._undo is None  # the capture was released
    u = DeviceTable()
    last, prev, _ = SnapshotCodec(u, fsync=False).read(str(tmp_path / "snapshot.bin"))
    assert last == (b"l", 7, 1) and prev == (b"p", 6, 1)
    assert len(u) == captured and u.get("late") is None


def test_a_received_snapshot_is_installed_only_when_it_verifies(tmp_path: Path) -> None:
    leader = _table(500)
    _write(leader, tmp_path / "leader.bin")
    data = (tmp_path / "leader.bin").read_bytes()
    follower = DeviceTable()
    s, codec = _serializer(tmp_path / "snapshot.bin", follower)

    def receive(blob: bytes) -> bool:
        pieces = [blob[i : i + 999] for i in range(0, len(blob), 999)]
        results = [s.setTransmissionData((p, i == 0, False)) for i, p in enumerate(pieces)]
        assert not any(results)
        return s.setTransmissionData((b"", False, True))

    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    assert receive(bytes(bad)) is False and s.rejected == 1
    assert (
        not (tmp_path / "snapshot.bin").exists()
        and not (tmp_path / "snapshot.bin.incoming").exists()
    )
    assert receive(data) is True
    assert (tmp_path / "snapshot.bin").read_bytes() == data
    codec.read(str(tmp_path / "snapshot.bin"))  # installs the staged table
    assert follower.digest() == leader.digest()
