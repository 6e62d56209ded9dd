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
  live in a list indexed by ``revision - base``; the (base, list) pair is
  replaced as one object, and single list operations are atomic under the
  GIL. The table inserts an event BEFORE it stores the new record,
  so a reader that sees a record at revision X finds event X (until trimmed).
* Bounded by count (``max_events``) and age (``max_age_ms`` of log time,
  the entries' ``proposed_at_ms``, so every node trims the same events):
  :meth:`trim` runs after each applied entry.
* REPORTED_CHANGED is exact but settled lazily: apply marks a heartbeat
  whose map bytes differ (``KIND_REPORTED_MAYBE``); the first read
  (:meth:`get`, :meth:`range`) compares the two records as messages and
  stores the settled event back.
* Events are stored as plain tuples (:data:`EventTuple`) and handed out as
  :class:`Event`: a plain tuple of strings, bytes and ints is untracked by
  the cyclic GC after its first collection, so 100,000 retained events add
  nothing to the full collections that stall the tick thread, and building
  one costs a tuple, not a Python-level ``__new__``.
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

from raftstate.devicerecord import same_reported

#: ``Event.kinds`` bits: ``1 << raftstate.v1.EventKind`` value.
KIND_REPORTED_CHANGED = 1 << 1
KIND_HEARTBEAT = 1 << 2
KIND_ONLINE = 1 << 3
KIND_OFFLINE = 1 << 4
KIND_DELETED = 1 << 5
#: Internal, never handed out: the reported map's bytes differ from the
#: previous record's. Settled into KIND_REPORTED_CHANGED (or nothing) by
#: :func:`devicerecord.same_reported` when the event is first read, so apply
#: pays one bytes comparison and the parse happens off the tick thread.
KIND_REPORTED_MAYBE = 1 << 9
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


#: An event as stored: the fields of :class:`Event`, in order.
EventTuple = tuple[int, str, int, bytes | None, bytes | None, int, int]
_as_event = tuple.__new__

#: Bytes an event costs besides its ``before`` record: the tuple (7 slots),
#: its revision / prev_rev / time int objects and a list slot (checked
#: against tracemalloc in tests/test_eventwindow.py).
EVENT_OVERHEAD_BYTES = sys.getsizeof((0, "", 0, None, None, 0, 0)) + 3 * sys.getsizeof(2**40) + 8


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
    ``oldest``/``latest`` attributes from any thread.

    Storage: a list of event tuples and the revision of its first slot,
    replaced together as one tuple (``_store``), so a reader on another
    thread always indexes a consistent pair. Trimming only raises ``oldest``;
    the slots before it are cut off in one slice per :data:`COMPACT_EVERY`
    trimmed events (memory holds at most that many events beyond the window)."""

    def __init__(
        self, max_events: int = DEFAULT_MAX_EVENTS, max_age_s: int = DEFAULT_MAX_AGE_S
    ) -> None:
        if max_events < 1 or max_age_s < 1:
            raise ValueError("the event window needs max_events >= 1 and max_age_s >= 1")
        self.max_events = max_events
        self.max_age_ms = max_age_s * 1000
        #: (revision of the list's first slot, the list).
        self._store: tuple[int, list[EventTuple]] = (1, [])
        #: Oldest retained revision; the window is empty when oldest == latest + 1.
        self.oldest = 1
        #: Newest recorded revision (the table's revision once an entry is applied).
        self.latest = 0
        self._before_bytes = 0  # of every event in the list, trimmed or not
        self._listener: Callable[[int], None] | None = None
        self._notified = 0

    # ---- tick thread ---------------------------------------------------------

    def append(self, event: EventTuple) -> None:
        """Record the event of revision ``latest + 1`` (tick thread, before the
        table stores ``event.after``). The caller guarantees contiguity (the
        table checks ``latest`` after each entry; :meth:`append_checked`
        checks each event)."""
        self._store[1].append(event)
        before = event[4]
        if before is not None:
            self._before_bytes += len(before) + _BYTES_OVERHEAD
        self.latest = event[0]

    def append_checked(self, event: EventTuple) -> None:
        """:meth:`append`, raising ``ValueError`` unless the event's revision
        is ``latest + 1``."""
        if event[0] != self.latest + 1:
            raise ValueError(f"event revision {event[0]} after {self.latest}")
        self.append(event)

    def trim(self, now_ms: int) -> int:
        """Drop the oldest events past ``max_events`` or older than
        ``max_age_ms`` before ``now_ms`` (log time); return how many."""
        base, events = self._store
        old, latest = self.oldest, self.latest
        oldest = max(old, latest - self.max_events + 1)
        cutoff = now_ms - self.max_age_ms
        while oldest <= latest and events[oldest - base][6] < cutoff:
            oldest += 1
        if oldest == old:
            return 0
        self.oldest = oldest
        cut = oldest - base
        if cut >= COMPACT_EVERY or cut == len(events):
            dropped = events[:cut]
            self._before_bytes -= sum(len(e[4]) + _BYTES_OVERHEAD for e in dropped if e[4])
            self._store = (oldest, events[cut:])
        return oldest - old

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
        self._store = (revision + 1, [])
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
        if revision < self.oldest:
            return None
        base, events = self._store
        i = revision - base
        if 0 <= i < len(events):
            ev = events[i]
            if ev[2] & KIND_REPORTED_MAYBE:
                ev = events[i] = _settle(ev)
            return _as_event(Event, ev)
        return None

    def range(self, start: int, end: int) -> list[Event]:
        """Retained events with ``start <= revision <= end``, in order and
        contiguous. If part of the range is (or gets, while this reads)
        trimmed, the result starts after ``start``: a caller that needs
        ``start`` compares ``result[0].revision`` (or ``oldest``) with it."""
        start = max(start, self.oldest)
        base, events = self._store
        end = min(end, base + len(events) - 1)
        if end < start:
            return []
        out = []
        for i in range(start - base, end - base + 1):
            ev = events[i]
            if ev[2] & KIND_REPORTED_MAYBE:
                # Stored back: a list item store is atomic; if the tick thread
                # cut the list meanwhile, the new list is settled again later.
                ev = events[i] = _settle(ev)
            out.append(_as_event(Event, ev))
        return out

    def __len__(self) -> int:
        return max(0, self.latest - self.oldest + 1)

    def stats(self) -> WindowStats:
        """Counts and approximate memory (module docstring): every event still
        held, including up to :data:`COMPACT_EVERY` trimmed ones not yet cut."""
        base, events = self._store
        return WindowStats(
            len(self),
            self._before_bytes + len(events) * EVENT_OVERHEAD_BYTES,
            self.oldest,
            self.latest,
        )


def _settle(ev: EventTuple) -> EventTuple:
    """``ev`` with KIND_REPORTED_MAYBE replaced by the exact answer."""
    rev, device_id, kinds, after, before, prev_rev, time_ms = ev
    kinds &= ~KIND_REPORTED_MAYBE
    if after is not None and before is not None and not same_reported(before, after):
        kinds |= KIND_REPORTED_CHANGED
    return (rev, device_id, kinds, after, before, prev_rev, time_ms)


#: Trimmed events are cut from the list in slices of at least this many.
COMPACT_EVERY = 4096
#: A ``bytes`` object's header (its payload is ``len``).
_BYTES_OVERHEAD = sys.getsizeof(b"")
