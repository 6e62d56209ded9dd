"""Reads at a revision while the tick thread applies (raftstate/atrevision.py).

A reader on another thread looks a device up in two dicts (its record, its
tombstone) that apply changes one operation at a time. These tests replay
the worst interleavings deterministically: the table's record dict runs an
apply step between the reader's two look-ups."""

from __future__ import annotations

from collections.abc import Callable

from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete


class _Interleaved(dict[str, bytes]):
    """The table's record dict; the first reader ``get`` of ``key`` (after
    arming) returns its value and then runs ``step`` (another thread's apply
    happening between two look-ups)."""

    armed: Callable[[], object] | None = None
    key = ""

    def get(self, key: str, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        value = super().get(key, default)
        step, self.armed = self.armed, None
        if step is not None and key == self.key:
            step()
        elif step is not None:
            self.armed = step
        return value


def _table() -> tuple[DeviceTable, _Interleaved]:
    t = DeviceTable()
    recs = _Interleaved()
    t._recs = recs
    return t, recs


def test_get_at_finds_a_device_recreated_between_the_readers_two_lookups() -> None:
    t, recs = _table()
    t.apply(encode_batch([Heartbeat("x", 1, {"v": "old"})], 1))  # rev 1
    t.apply_control(encode_delete("x", 2))  # rev 2
    recs.key = "x"
    recs.armed = lambda: t.apply(encode_batch([Heartbeat("x", 1, {"v": "new"})], 3))
    # The reader sees no record, then apply re-creates x (record stored,
    # tombstone dropped), then the reader looks for the tombstone.
    view = t.get_at("x", 1)
    assert view is not None and view.reported == {"v": "old"}


def test_list_at_keeps_a_device_recreated_between_the_readers_two_lookups() -> None:
    t, recs = _table()
    t.apply(encode_batch([Heartbeat(d, 1, {"v": "old"}) for d in ("x-1", "x-2")], 1))  # 1, 2
    t.apply_control(encode_delete("x-2", 2))  # rev 3
    recs.key = "x-2"
    recs.armed = lambda: t.apply(encode_batch([Heartbeat("x-2", 1, {"v": "new"})], 3))
    page = t.list(prefix="x-", at_revision=2)
    assert [(d.device_id, d.reported["v"]) for d in page.devices] == [
        ("x-1", "old"),
        ("x-2", "old"),
    ]


class _LockThenStep:
    """The table's id-index lock; once armed, leaving it runs ``step`` (an
    apply between the reader's id scan and its tombstone scan)."""

    def __init__(self) -> None:
        self.armed: Callable[[], object] | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        step, self.armed = self.armed, None
        if step is not None:
            step()


def test_list_at_keeps_a_device_recreated_between_the_id_scan_and_the_tombstones() -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat(d, 1, {"v": "old"}) for d in ("x-1", "x-2")], 1))  # 1, 2
    t.apply_control(encode_delete("x-2", 2))  # rev 3
    lock = _LockThenStep()
    t._ids_lock = lock  # type: ignore[assignment]
    # The reader's id scan misses x-2 (deleted); apply then re-creates it,
    # dropping its tombstone, before the reader merges the tombstones in.
    lock.armed = lambda: t.apply(encode_batch([Heartbeat("x-2", 1, {"v": "new"})], 3))
    page = t.list(prefix="x-", at_revision=2)
    assert [(d.device_id, d.reported["v"]) for d in page.devices] == [
        ("x-1", "old"),
        ("x-2", "old"),
    ]
