"""The watch hub: fan-out of committed events to the watchers of one node.

Theory of operation
-------------------
The state machine records one :class:`~raftstate.eventwindow.Event` per store
revision in the node's event window (raftstate/eventwindow.py) on the tick
thread. The hub runs on the event loop and follows the window:

1. **Wake-up, coalesced.** The window's listener (tick thread) calls
   :meth:`WatchHub.notify`, which schedules :meth:`WatchHub.run` with
   ``loop.call_soon_threadsafe`` unless a run is already scheduled. Commits
   never wait on watchers: the tick thread only sets a flag.
2. **Each event once.** :meth:`WatchHub.advance` takes the events after
   :attr:`WatchHub.position` (at most ``chunk`` per call, so a backlog never
   holds the loop long) and, per event, finds the matching watchers through
   an index (all-device watchers, an exact-id dict, and one dict per prefix
   length) without scanning every watcher. The event is encoded once per
   ``prev_device`` flag (``encode``, raftstate/watchwire.py) and the same
   bytes are appended to each matching watcher's ``pending`` deque.
3. **Bounded.** A watcher whose pending deque exceeds ``max_pending`` events
   is failed with :class:`~raftstate.errors.WatcherTooSlow` carrying the
   revision to resume from, and dropped from the index: a slow watcher never
   grows memory without bound. If the window dropped events the hub had not
   yet dispatched (a stalled loop, a snapshot install), every watcher is
   failed the same way: a gap is never silent (resuming then gets
   ``RevisionCompacted`` if the history is gone).
4. **Catch-up.** A watcher registered with ``start_revision`` at or below
   the hub's position first reads ``start .. position`` from the window
   (:meth:`WatchHub.take`), while live events after ``position`` queue in its
   pending deque, so its events come out in revision order, each once.
   A start older than the window raises ``RevisionCompacted``; a start after
   the position waits (events before it are skipped).
5. :meth:`WatchHub.take` returns the next response's events (capped by count
   and bytes) and the revision through which the watcher has then been
   served: every matching event up to it has been handed out.

No sockets and no clock: the serving loop (raftstate/watchserve.py) owns
streams and timers. Event-loop only, except :meth:`notify` (any thread).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from raftstate.errors import RaftStateError, RevisionCompacted, WatcherTooSlow

#: Bits of ``Event.kinds`` (1 << EventKind value), as raftstate/eventwindow.py.
KIND_REPORTED_CHANGED = 1 << 1
KIND_HEARTBEAT = 1 << 2
KIND_ONLINE = 1 << 3
KIND_OFFLINE = 1 << 4
KIND_DELETED = 1 << 5
ALL_KINDS = KIND_REPORTED_CHANGED | KIND_HEARTBEAT | KIND_ONLINE | KIND_OFFLINE | KIND_DELETED

#: Events dispatched per :meth:`WatchHub.advance` call (one loop callback).
DEFAULT_CHUNK = 4096
#: Encoded events kept for reuse (catch-ups of many watchers from about the
#: same revision, e.g. after a failover, encode each event once).
ENCODE_CACHE = 8192
#: Window events one :meth:`WatchHub.take` examines at most during a
#: catch-up (a narrow filter over a long history must not hold the loop).
CATCHUP_EXAMINE = 4096


class EventLike(Protocol):
    """What the hub reads of an event (``raftstate.eventwindow.Event``)."""

    @property
    def revision(self) -> int: ...
    @property
    def device_id(self) -> str: ...
    @property
    def kinds(self) -> int: ...
    @property
    def after(self) -> bytes | None: ...
    @property
    def before(self) -> bytes | None: ...
    @property
    def time_ms(self) -> int: ...


class EventSource(Protocol):
    """What the hub reads of the event window (``EventWindow``)."""

    @property
    def oldest(self) -> int: ...
    @property
    def latest(self) -> int: ...
    def range(self, start: int, end: int) -> Sequence[EventLike]: ...


#: ``encode(event, prev_device) -> bytes``: the event as the framed
#: ``WatchResponse.events`` field (tag, length, Event message).
Encoder = Callable[[EventLike, bool], bytes]


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which events a watcher wants (a validated WatchRequest)."""

    start_revision: int = 0
    prefix: str = ""
    device_ids: frozenset[str] = frozenset()
    kinds: int = ALL_KINDS
    prev_device: bool = False

    def matches(self, ev: EventLike) -> bool:
        """True when ``ev`` is of a wanted kind and device (not the revision)."""
        if not ev.kinds & self.kinds:
            return False
        if self.device_ids:
            return ev.device_id in self.device_ids
        return ev.device_id.startswith(self.prefix)


class Watcher:
    """One registered watch. Mutated by the hub only (event loop)."""

    __slots__ = (
        "catchup_end",
        "catchup_next",
        "failed",
        "filter",
        "id",
        "kinds",
        "on_ready",
        "pending",
        "prev",
        "served_through",
        "start",
    )

    def __init__(self, wid: int, flt: WatchFilter, start: int, served_through: int) -> None:
        self.id = wid
        self.filter = flt
        #: Copies of ``filter.kinds`` / ``filter.prev_device`` (the dispatch loop).
        self.kinds = flt.kinds
        self.prev = flt.prev_device
        #: First revision this watcher may receive.
        self.start = start
        #: Catch-up from the window still to read: catchup_next..catchup_end.
        self.catchup_next = start
        self.catchup_end = start - 1
        #: Live events (revision, encoded) not yet taken.
        self.pending: deque[tuple[int, bytes]] = deque()
        #: Every matching event up to this revision has been taken.
        self.served_through = served_through
        #: Set when the watch must end with this error.
        self.failed: RaftStateError | None = None
        #: Called when pending becomes non-empty or the watcher fails.
        self.on_ready: Callable[[], None] = _nothing

    @property
    def resume_revision(self) -> int:
        """Where a new watch should start to miss nothing of this one."""
        return self.served_through + 1


def _nothing() -> None:
    pass


@dataclass(slots=True)
class HubStats:
    """Counters for ``/metrics``."""

    events_dispatched: int = 0
    events_sent: int = 0
    responses_sent: int = 0
    slow_dropped: int = 0
    gaps: int = 0


class WatchHub:
    """Matching index + per-watcher pending queues (module docstring)."""

    def __init__(
        self,
        window: EventSource,
        encode: Encoder,
        *,
        max_pending: int,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.window = window
        self._encode = encode
        self.max_pending = max_pending
        # A watcher's writer runs between chunks; a chunk larger than the
        # bound would end even a watcher that keeps up.
        self.chunk = max(1, min(chunk, max_pending // 2))
        #: Every event up to this revision has been dispatched.
        self.position = window.latest
        self.stats = HubStats()
        self._ids = itertools.count(1)
        self._all: set[Watcher] = set()
        self._by_id: dict[str, set[Watcher]] = {}
        self._by_prefix: dict[int, dict[str, set[Watcher]]] = {}
        self._cache: dict[tuple[int, bool], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._count = 0

    # ---- registration ---------------------------------------------------------

    @property
    def watchers(self) -> int:
        """Registered watchers."""
        return self._count

    def register(self, flt: WatchFilter) -> Watcher:
        """Add a watcher. ``start_revision`` 0: changes after now; at or
        below the position: catch up from the window first; later: wait.
        Raises ``RevisionCompacted`` when the start is older than the window."""
        if self._count == 0 and self.window.latest > self.position:
            # Nobody watched, so :meth:`notify` scheduled nothing: there was
            # nothing to dispatch and the position catches up here.
            self.position = self.window.latest
        if self.window.oldest > self.position + 1:
            self._gap(self.window.oldest - 1)  # not this new watcher's loss
        pos = self.position
        if flt.start_revision == 0:
            w = Watcher(next(self._ids), flt, pos + 1, pos)
        else:
            start = flt.start_revision
            if start <= pos and start < self.window.oldest:
                raise RevisionCompacted(self.window.oldest, pos)
            w = Watcher(next(self._ids), flt, start, min(start - 1, pos))
            if start <= pos:
                w.catchup_end = pos
        self._index(w, add=True)
        self._count += 1
        if self.window.latest > self.position:  # appended while we had no watcher
            self.notify()
        return w

    def unregister(self, w: Watcher) -> None:
        """Remove a watcher (idempotent)."""
        if self._index(w, add=False):
            self._count -= 1
        w.pending.clear()

    def _index(self, w: Watcher, *, add: bool) -> bool:
        flt = w.filter
        groups: list[set[Watcher]] = []
        if flt.device_ids:
            for dev in flt.device_ids:
                groups.append(
                    self._by_id.setdefault(dev, set()) if add else self._by_id.get(dev, set())
                )
        elif flt.prefix:
            by_len = self._by_prefix.setdefault(len(flt.prefix), {})
            groups.append(by_len.setdefault(flt.prefix, set()))
        else:
            groups.append(self._all)
        if add:
            for g in groups:
                g.add(w)
            return True
        present = any(w in g for g in groups)
        for g in groups:
            g.discard(w)
        self._prune(flt)
        return present

    def _prune(self, flt: WatchFilter) -> None:
        for dev in flt.device_ids:
            if not self._by_id.get(dev, True):
                del self._by_id[dev]
        if flt.prefix and not flt.device_ids:
            by_len = self._by_prefix.get(len(flt.prefix))
            if by_len is not None:
                if not by_len.get(flt.prefix, True):
                    del by_len[flt.prefix]
                if not by_len:
                    del self._by_prefix[len(flt.prefix)]

    # ---- dispatch -------------------------------------------------------------

    def encoded(self, ev: EventLike, prev: bool) -> bytes:
        """``ev`` encoded (once per revision and flag, while cached)."""
        key = (ev.revision, prev)
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = self._encode(ev, prev)
            if len(self._cache) > ENCODE_CACHE:
                del self._cache[next(iter(self._cache))]
        return data

    def advance(self) -> bool:
        """Dispatch up to ``chunk`` new events; True if more are waiting."""
        window = self.window
        latest = window.latest
        if latest <= self.position:
            return False
        if window.oldest > self.position + 1:
            self._gap(window.oldest - 1)
            if latest <= self.position:
                return False
        end = min(latest, self.position + self.chunk)
        events = window.range(self.position + 1, end)
        if not events or events[0].revision != self.position + 1:
            # Trimmed between the check and the read: same as a gap.
            self._gap(window.oldest - 1)
            return window.latest > self.position
        # A watcher's writer waits only when its pending deque is empty, so
        # it needs waking only when the deque stops being empty.
        ready: list[Watcher] = []
        slow: list[Watcher] = []
        limit = self.max_pending
        by_id = self._by_id
        prefixes = self._by_prefix
        every = self._all
        for ev in events:
            dev = ev.device_id
            rev = ev.revision
            kinds = ev.kinds
            candidates: list[set[Watcher]] = [every] if every else []
            hit = by_id.get(dev)
            if hit:
                candidates.append(hit)
            for length, by_prefix in prefixes.items():
                hit = by_prefix.get(dev[:length])
                if hit:
                    candidates.append(hit)
            plain: bytes | None = None
            with_prev: bytes | None = None
            for group in candidates:
                for w in group:
                    if rev < w.start or not kinds & w.kinds or w.failed is not None:
                        continue
                    if w.prev:
                        if with_prev is None:
                            with_prev = self.encoded(ev, True)
                        data = with_prev
                    else:
                        if plain is None:
                            plain = self.encoded(ev, False)
                        data = plain
                    pending = w.pending
                    pending.append((rev, data))
                    n = len(pending)
                    if n == 1:
                        ready.append(w)
                    elif n > limit:
                        w.failed = WatcherTooSlow(w.resume_revision, limit)
                        slow.append(w)
        self.position = events[-1].revision
        self.stats.events_dispatched += len(events)
        for w in slow:
            self.stats.slow_dropped += 1
            self.unregister(w)
            w.on_ready()
        for w in ready:
            if w.failed is None:
                w.on_ready()
        return window.latest > self.position

    def advance_all(self) -> None:
        """Dispatch everything the window has (tests, registration)."""
        while self.advance():
            pass

    def _gap(self, new_position: int) -> None:
        """Events up to ``new_position`` are gone before they were
        dispatched: fail every watcher that could have wanted them."""
        self.stats.gaps += 1
        for w in list(self._every()):
            if w.start <= new_position:
                w.failed = WatcherTooSlow(w.resume_revision, self.max_pending)
                w.failed.message = (
                    f"watch_max_pending: events up to revision {new_position} left this "
                    f"node's history before they could be sent; resume from revision "
                    f"{w.resume_revision}"
                )
                self.unregister(w)
                w.on_ready()
        self.position = max(self.position, new_position)

    def close(self, err: RaftStateError) -> None:
        """End every watch with ``err`` (the node is shutting down)."""
        for w in list(self._every()):
            w.failed = err
            self.unregister(w)
            w.on_ready()

    def _every(self) -> set[Watcher]:
        out = set(self._all)
        for ws in self._by_id.values():
            out |= ws
        for group in self._by_prefix.values():
            for ws in group.values():
                out |= ws
        return out

    # ---- serving --------------------------------------------------------------

    def take(self, w: Watcher, max_events: int, max_bytes: int) -> tuple[list[bytes], int]:
        """The next events for ``w`` (at most ``max_events``, and no more
        than ``max_bytes`` unless a single event is larger) and the revision
        through which ``w`` is then served. During a catch-up it may return
        no events with the catch-up unfinished (:meth:`catching_up`): call
        again. Raises ``w.failed`` if set, and ``RevisionCompacted`` if its
        catch-up fell out of the window."""
        if w.failed is not None:
            raise w.failed
        out: list[bytes] = []
        size = 0
        if w.catchup_next <= w.catchup_end:
            window = self.window
            nxt = w.catchup_next
            if nxt < window.oldest:
                w.failed = RevisionCompacted(window.oldest, self.position)
                self.unregister(w)
                raise w.failed
            flt = w.filter
            stop = min(w.catchup_end, nxt + CATCHUP_EXAMINE - 1)
            full = False
            while nxt <= stop and not full:
                end = min(stop, nxt + 255)
                batch = window.range(nxt, end)
                if not batch or batch[0].revision != nxt:
                    w.failed = RevisionCompacted(window.oldest, self.position)
                    self.unregister(w)
                    raise w.failed
                for ev in batch:
                    if flt.matches(ev):
                        data = self.encoded(ev, flt.prev_device)
                        if out and (len(out) >= max_events or size + len(data) > max_bytes):
                            full = True
                            break
                        out.append(data)
                        size += len(data)
                    nxt = ev.revision + 1
            w.catchup_next = nxt
            w.served_through = max(w.served_through, nxt - 1)
            if w.catchup_next <= w.catchup_end:
                self._sent(len(out))
                return out, w.served_through
        pending = w.pending
        if pending and not out and len(pending) <= max_events:
            # The usual case: everything queued fits one response.
            datas = [data for _, data in pending]
            if sum(map(len, datas)) <= max_bytes:
                w.served_through = pending[-1][0]
                pending.clear()
                out = datas
        while pending and len(out) < max_events:
            rev, data = pending[0]
            if out and size + len(data) > max_bytes:
                break
            pending.popleft()
            out.append(data)
            size += len(data)
            w.served_through = rev
        if not pending:
            w.served_through = max(w.served_through, self.position)
        self._sent(len(out))
        return out, w.served_through

    @staticmethod
    def catching_up(w: Watcher) -> bool:
        """True while ``w`` still has window history to read."""
        return w.catchup_next <= w.catchup_end

    def _sent(self, n: int) -> None:
        if n:
            self.stats.events_sent += n
            self.stats.responses_sent += 1

    # ---- event-loop driver ----------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch on ``loop`` from now on; :meth:`notify` schedules it."""
        self._loop = loop

    def notify(self, latest: int = 0) -> None:
        """The window has new events (any thread; cheap; coalesced)."""
        loop = self._loop
        if loop is None or self._scheduled or not self._count:
            return  # without watchers the commit path pays nothing for the hub
        self._scheduled = True
        try:
            loop.call_soon_threadsafe(self.run)
        except RuntimeError:  # loop closed during shutdown
            self._scheduled = False

    def run(self) -> None:
        """One dispatch step on the loop; reschedules itself while a backlog
        remains, so other callbacks run between chunks."""
        self._scheduled = False
        if self.advance() and self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.run)


__all__ = [
    "ALL_KINDS",
    "KIND_DELETED",
    "KIND_HEARTBEAT",
    "KIND_OFFLINE",
    "KIND_ONLINE",
    "KIND_REPORTED_CHANGED",
    "Encoder",
    "EventLike",
    "EventSource",
    "HubStats",
    "WatchFilter",
    "WatchHub",
    "Watcher",
]
