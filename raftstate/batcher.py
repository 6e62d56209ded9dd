"""Group commit: turn heartbeats that arrive together into one log entry.

Theory of operation
-------------------
Each Raft log entry costs a round of replication and a journal write, so
proposing one entry per heartbeat caps throughput at the entry rate. The
batcher is a sans-IO policy object: the driver feeds it items and the current
time, and it answers with the batches to propose *now*.

A batch is sealed and proposed when one of these holds:

1. **Nothing is in flight**: at low load every heartbeat goes out at once,
   so group commit adds no latency.
2. **It is full**: ``max_items`` items or ``max_bytes`` bytes. Sizes are
   the caller's upper bounds per item, kept exactly, so a sealed batch never
   holds more than ``max_bytes`` (an item larger than that alone is a batch
   of one; the caller validates that none is).
3. **It is old and a slot is free**: its oldest item has waited
   ``max_delay`` seconds and fewer than ``max_inflight`` batches are in
   flight. This pipelines a further batch on a long-RTT link instead of
   queueing behind the slow one, while the cap keeps the number of entries
   per second (each costs pysyncobj a journal write and a message per peer)
   from growing with commit latency.

While batches are in flight, items accumulate, so batch size grows with load:
the classic adaptive group commit. (Measured on loopback with 64 closed-loop
devices: sealing on a timer alone, with no in-flight cap, made ~500 tiny
entries/s and saturated the leader at ~1,000 heartbeats/s; this policy with
4 slots and 5 ms gave ~1,500/s at lower latency.) The driver calls :meth:`finished` when a
proposed batch commits or fails, which frees a slot and may seal the next.

The slot count follows the link (:class:`SlotSizer`): a batch occupies its
slot for one commit time, so sealing one every ``max_delay`` needs
``commit / max_delay + 1`` slots. A constant 4 made heartbeats queue for a
slot on WAN links (60 ms commit: a slot frees every 15 ms, not every 5 ms)
while LAN links (commit ~1 ms) need fewer than 4; the driver raises
:attr:`Batcher.max_inflight` from the measured commit time, never below the
configured floor. It sizes by the lowest recent commit time (the round
trip), not the average, so CPU queueing cannot feed back into more slots.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


def slots_for(commit_s: float, max_delay: float, floor: int, cap: int) -> int:
    """In-flight batches needed to keep sealing one every ``max_delay``
    seconds while each stays ``commit_s`` in flight (Little's law):
    ``ceil(commit_s / max_delay) + 1``, within ``[floor, max(floor, cap)]``.
    With ``max_delay`` 0 the cap."""
    if max_delay <= 0:
        return max(floor, cap)
    need = math.ceil(max(commit_s, 0.0) / max_delay) + 1
    return min(max(need, floor), max(floor, cap))


class SlotSizer:
    """In-flight slots sized by the commit round trip: the *lowest* commit
    time among the last ``window`` batches (time from proposal to commit:
    one node-to-leader-to-quorum round trip at best), so a WAN link gets a
    bandwidth-delay's worth of slots and a LAN link keeps the floor. The
    minimum, not an average: queueing for CPU also lengthens commits, and
    more slots would then make more entries and more CPU work (a feedback
    loop); the minimum follows the network. Sans-IO: the caller passes the
    durations it measured."""

    __slots__ = ("_recent", "cap", "floor", "max_delay", "window")

    def __init__(self, *, floor: int, cap: int, max_delay: float, window: int = 64) -> None:
        if floor < 1 or cap < 1 or window < 1:
            raise ValueError("slot bounds must be positive")
        self.floor = floor
        self.cap = cap
        self.max_delay = max_delay
        self.window = window
        self._recent: deque[float] = deque(maxlen=window)

    @property
    def commit_s(self) -> float | None:
        """The commit round trip slots are sized for (``None``: none yet)."""
        return min(self._recent) if self._recent else None

    def observe(self, seconds: float) -> int:
        """Fold in one batch's commit time; return the slots to use now."""
        self._recent.append(seconds)
        return slots_for(min(self._recent), self.max_delay, self.floor, self.cap)


class Batcher(Generic[T]):
    """Decides when pending items become a batch. Not thread-safe: use it
    from one thread (the node's event loop)."""

    def __init__(
        self, *, max_delay: float, max_items: int, max_bytes: int, max_inflight: int
    ) -> None:
        if max_items < 1 or max_bytes < 1 or max_inflight < 1 or max_delay < 0:
            raise ValueError("batcher limits must be positive")
        self.max_delay = max_delay
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_inflight = max_inflight
        self.inflight = 0
        self._items: list[T] = []
        self._sizes: list[int] = []
        self._bytes = 0
        self._oldest: float | None = None

    @property
    def pending(self) -> int:
        """Items waiting to be sealed into a batch."""
        return len(self._items)

    def add(self, item: T, size: int, now: float) -> list[list[T]]:
        """Queue ``item`` (encoded ``size`` bytes); return batches to propose now."""
        if self._items and self._bytes + size > self.max_bytes:
            out = [self._seal()]
        else:
            out = []
        if not self._items:
            self._oldest = now
        self._items.append(item)
        self._sizes.append(size)
        self._bytes += size
        return out + self._ready(now)

    def add_many(self, items: list[T], sizes: list[int], now: float) -> list[list[T]]:
        """Queue ``items`` (encoded ``sizes`` bytes each, in order) that
        arrived together; return batches to propose now. The same as adding
        them one by one, except that an idle batcher (nothing in flight) seals
        them together rather than sending the first one alone."""
        out = []
        for item, size in zip(items, sizes, strict=True):
            if self._items and self._bytes + size > self.max_bytes:
                out.append(self._seal())
            if not self._items:
                self._oldest = now
            self._items.append(item)
            self._sizes.append(size)
            self._bytes += size
        return out + self._ready(now)

    def finished(self, now: float) -> list[list[T]]:
        """A proposed batch committed or failed; return batches to propose now."""
        if self.inflight > 0:
            self.inflight -= 1
        return self._ready(now)

    def poll(self, now: float) -> list[list[T]]:
        """Call at :meth:`deadline`; return batches to propose now."""
        return self._ready(now)

    def deadline(self) -> float | None:
        """When :meth:`poll` should next be called, or ``None`` when waiting
        cannot seal anything: nothing is pending, or every in-flight slot is
        taken (then only :meth:`finished` or a full batch in :meth:`add`
        can). Never a time at which :meth:`poll` would return nothing: a
        driver that re-arms a past deadline would spin."""
        if self._oldest is None or (self.inflight >= self.max_inflight and self.inflight > 0):
            return None
        return self._oldest + self.max_delay

    def drain(self) -> list[T]:
        """Remove and return every pending item (shutdown, lost leadership)."""
        items, self._items, self._sizes = self._items, [], []
        self._bytes, self._oldest = 0, None
        return items

    def _ready(self, now: float) -> list[list[T]]:
        out = []
        while self._items and (
            self.inflight == 0
            or len(self._items) >= self.max_items
            or self._bytes >= self.max_bytes
            or (
                self.inflight < self.max_inflight
                and self._oldest is not None
                and now - self._oldest >= self.max_delay
            )
        ):
            out.append(self._seal())
        return out

    def _seal(self) -> list[T]:
        # The longest prefix within both bounds; at least one item.
        n, total = 0, 0
        for size in self._sizes[: self.max_items]:
            if n and total + size > self.max_bytes:
                break
            n += 1
            total += size
        batch = self._items[:n]
        del self._items[:n]
        del self._sizes[:n]
        self._bytes -= total
        self._oldest = self._oldest if self._items else None
        self.inflight += 1
        return batch
