"""A small event window for watch tests that follows the EventWindow
interface (raftstate/eventwindow.py: oldest, latest, get, range, stats,
set_listener), with real device records when asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from raftstate import devicerecord
from raftstate.internal.v1 import storage_pb2
from raftstate.watchhub import KIND_HEARTBEAT


class Ev(NamedTuple):
    revision: int
    device_id: str
    kinds: int
    after: bytes | None = None
    before: bytes | None = None
    prev_rev: int = 0
    time_ms: int = 0


def record(
    device_id: str, seq: int, revision: int, reported: dict[str, str], time_ms: int = 1_000
) -> bytes:
    """A stored device record (raftstate/devicerecord.py) for these values."""
    body = storage_pb2.HeartbeatRecord(device_id=device_id, seq=seq, reported=reported, ttl_s=30)
    size = len(device_id) + sum(len(k) + len(v) for k, v in reported.items())
    return devicerecord.pack(
        seq, revision, time_ms, time_ms, seq, 30, size, body.SerializeToString()
    )


class FakeWindow:
    """Events by revision, trimmed to ``limit`` events."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.events: dict[int, Ev] = {}
        self.oldest = 1
        self.latest = 0
        self.limit = limit
        self.listener: Callable[[int], None] | None = None
        self._records: dict[str, bytes] = {}

    def append(
        self, device_id: str, kinds: int = KIND_HEARTBEAT, reported: dict[str, str] | None = None
    ) -> Ev:
        """The next revision's event; with ``reported``, carrying real
        before/after records of the device."""
        self.latest += 1
        rev = self.latest
        after = before = None
        if reported is not None:
            before = self._records.get(device_id)
            seq = devicerecord.seq_of(before) + 1 if before else 1
            after = self._records[device_id] = record(device_id, seq, rev, reported, 1000 + rev)
        ev = Ev(rev, device_id, kinds, after, before, 0, 1000 + rev)
        self.events[rev] = ev
        while self.latest - self.oldest + 1 > self.limit:
            del self.events[self.oldest]
            self.oldest += 1
        if self.listener is not None:
            self.listener(self.latest)
        return ev

    def get(self, revision: int) -> Ev | None:
        return self.events.get(revision)

    def range(self, start: int, end: int) -> list[Ev]:
        return [self.events[r] for r in range(max(start, self.oldest), min(end, self.latest) + 1)]

    def set_listener(self, fn: Callable[[int], None] | None) -> None:
        self.listener = fn
