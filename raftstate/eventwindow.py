"""The event window: the last committed changes, one event per store revision.

Theory of operation
-------------------
Every change to the table (a non-duplicate heartbeat, a delete, an expiry)
takes the next store revision, so revisions are contiguous and the window is
simply ``oldest..latest`` with one :class:`Event` each. An event keeps the
device's record after the change (the same ``bytes`` object the table
stores, so no copy) and before it, plus ``prev_rev``: the revision of the
device's previous change. Walking ``prev_rev`` from a device's current
record gives its state at any retained revision (raftstate/atrevision.py),
and a watcher replays ``range(start, latest)``.

* Written on the tick thread during apply, read from any thread: the events
  live in a dict keyed by revision, and single dict operations are atomic
  under the GIL. The table inserts an event BEFORE it stores the new record,
  so a reader that sees a record at revision X finds event X (until trimmed).
* Bounded by count (``max_events``) and age (``max_age_ms`` of log time,
  the entries' ``proposed_at_ms``, so every node trims the same events):
  :meth:`trim` runs after each applied entry.
* Memory (:meth:`stats`): a record kept alive only by the window is an
  event's ``before`` (its ``after`` is the table's record or the next
  event's ``before``); that plus a measured per-event overhead.
* After a snapshot install the window is empty from the installed revision
  (:meth:`reset`); after a restart it holds what the journal replay applied.

Pure data structure: no clock, no I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

#: ``Event.kinds`` bits: ``1 << raftstate.v1.EventKind`` value.
KIND_REPORTED_CHANGED = 1 << 1
KIND_HEARTBEAT = 1 << 2
KIND_ONLINE = 1 << 3
KIND_OFFLINE = 1 << 4
KIND_DELETED = 1 << 5
ALL_KINDS = (
    KIND_REPORTED_CHANGED | KIND_HEARTBEAT | KIND_ONLINE | KIND_OFFLINE | KIND_DELETED
)

DEFAULT_MAX_EVENTS = 100_000
DEFAULT_MAX_AGE_S = 600


class Event(NamedTuple):
    """One committed change to one device (module docstring)."""

    revision: int
    device_id: str
    #: Bits ``KIND_*``; at least one.
    kinds: int
    #: The device's record after the change (raftstate/devicerecord.py);
    #: ``None``: deleted.
    after: bytes | None
    #: Its record before the change; ``None``: it did not exist.
    before: bytes | None
    #: Revision of the device's previous change: ``before``'s revision, or
    #: the delete's revision if it had been deleted, 0 if none is known.
    prev_rev: int
    #: The entry's ``proposed_at_ms`` (log time).
    time_ms: int


#: Bytes an event costs besides its ``before`` record: the tuple (7 slots),
#: its revision / prev_rev / time int objects and a dict slot (measured in
#: tests/test_eventwindow.py).
EVENT_OVERHEAD_BYTES = (
    sys.getsizeof(Event(0, "", 0, None, None, 0, 0)) + 3 * sys.getsizeof(2**40) + 48
)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What the window holds now."""

    events: int
    #: Approximate bytes the window keeps alive (records only it references,
    #: plus :data:`EVENT_OVERHEAD_BYTES` per event).
    bytes: int
    oldest: int
    latest: int


class EventWindow:
    """The retained events ``oldest..latest`` (module docstring). Writes on
    the tick thread; :meth:`get`, :meth:`range`, :meth:`stats` and the
    ``oldest``/``latest`` attributes from any thread."""

    def __init__(
        self, max_events: int = DEFAULT_MAX_EVENTS, max_age_s: int = DEFAULT_MAX_AGE_S
    ) -> None:
        if max_events < 1 or max_age_s < 1:
            raise ValueError("the event window needs max_events >= 1 and max_age_s >= 1")
        self.max_events = max_events
        self.max_age_ms = max_age_s * 1000
        self._events: dict[int, Event] = {}
        #: Oldest retained revision; the window is empty when oldest == latest + 1.
        self.oldest = 1
        #: Newest recorded revision (the table's revision once an entry is applied).
        self.latest = 0
        self._before_bytes = 0
        self._listener: Callable[[int], None] | None = None
        self._notified = 0
        #: Called with each DELETED event trimmed (the table drops its tombstone).
        self.on_trim: Callable[[Event], None] | None = None

    # ---- tick thread ---------------------------------------------------------

    def append(self, event: Event) -> None:
        """Record the event of revision ``latest + 1`` (tick thread, before the
        table stores ``event.after``). The caller guarantees contiguity (the
        table checks ``latest`` after each entry; :meth:`append_checked`
        checks each event)."""
        rev = event[0]
        self._events[rev] = event
        before = event[4]
        if before is not None:
            self._before_bytes += len(before) + _BYTES_OVERHEAD
        self.latest = rev

    def append_checked(self, event: Event) -> None:
        """:meth:`append`, raising ``ValueError`` unless the event's revision
        is ``latest + 1``."""
        if event.revision != self.latest + 1:
            raise ValueError(f"event revision {event.revision} after {self.latest}")
        self.append(event)

    def trim(self, now_ms: int) -> int:
        """Drop the oldest events past ``max_events`` or older than
        ``max_age_ms`` before ``now_ms`` (log time); return how many."""
        events = self._events
        oldest, latest = self.oldest, self.latest
        cutoff = now_ms - self.max_age_ms
        dropped = 0
        on_trim = self.on_trim
        while oldest <= latest:
            ev = events[oldest]
            if latest - oldest + 1 <= self.max_events and ev.time_ms >= cutoff:
                break
            del events[oldest]
            oldest += 1
            self.oldest = oldest  # readers never see a missing event inside the range
            if ev.before is not None:
                self._before_bytes -= len(ev.before) + _BYTES_OVERHEAD
            if ev.kinds & KIND_DELETED and on_trim is not None:
                on_trim(ev)
            dropped += 1
        return dropped

    def notify(self) -> None:
        """Tick thread, after an applied entry: call the listener if events
        were recorded since the last call."""
        latest = self.latest
        if latest != self._notified:
            self._notified = latest
            listener = self._listener
            if listener is not None:
                listener(latest)

    def reset(self, revision: int) -> None:
        """Forget every event: the table was replaced at ``revision`` (a
        snapshot install); the next event is ``revision + 1``."""
        self._events = {}
        self._before_bytes = 0
        self.latest = revision
        self.oldest = revision + 1
        self._notified = revision

    # ---- any thread ----------------------------------------------------------

    def set_listener(self, fn: Callable[[int], None] | None) -> None:
        """``fn(latest)`` runs on the tick thread after each applied entry that
        recorded events; keep it cheap (e.g. ``loop.call_soon_threadsafe``)."""
        self._listener = fn

    def get(self, revision: int) -> Event | None:
        """The event of ``revision``, or ``None`` if not retained."""
        return self._events.get(revision)

    def range(self, start: int, end: int) -> list[Event]:
        """Retained events with ``start <= revision <= end``, in order and
        contiguous. If part of the range is (or gets, while this reads)
        trimmed, the result starts after ``start``: a caller that needs
        ``start`` compares ``result[0].revision`` (or ``oldest``) with it."""
        events = self._events
        out: list[Event] = []
        rev = max(start, self.oldest)
        end = min(end, self.latest)
        while rev <= end:
            ev = events.get(rev)
            if ev is None:
                if rev < self.oldest:  # trimmed while we read: skip ahead
                    rev = self.oldest
                    out.clear()
                    continue
                break
            out.append(ev)
            rev += 1
        return out

    def __len__(self) -> int:
        return len(self._events)

    def stats(self) -> WindowStats:
        """Counts and approximate memory (module docstring)."""
        n = len(self._events)
        return WindowStats(
            n, self._before_bytes + n * EVENT_OVERHEAD_BYTES, self.oldest, self.latest
        )


#: A ``bytes`` object's header (its payload is ``len``).
_BYTES_OVERHEAD = sys.getsizeof(b"")
