"""Receive side of the reliable link's acknowledgements: which peer frames
arrived, and when to tell the peer.

State is a cumulative number ``base`` (every peer frame below it is accounted
for: received, or below the peer's advertised *floor*, i.e. frames it no
longer wants acked) plus disjoint ranges of frames received above it. The
peer's floor rises as its frames are acked or given up, so the ranges only
ever describe roughly the last round trip and stay few.

When to ack (RFC 9002 §13.2, RFC 5681 §4.2): at once when a frame arrives
out of order (a gap, or a late one: the peer needs that news for loss
detection), when it asks (the ack-now flag of a probe), or when
``ack_eliciting_threshold`` ack-eliciting frames are unacknowledged;
otherwise within ``max_ack_delay``. Every frame the link sends carries the
current ACK anyway, so a lost ACK is repaired by the next frame.
"""

from __future__ import annotations

from raftstate.transport.frames import MAX_ACK_DELAY_US, Ack, ack_ranges_size, varint_size


class AckTracker:
    """Received peer frame numbers and the ACK timer. Not thread-safe."""

    __slots__ = (
        "_count", "_max_delay", "_max_ranges", "_threshold", "base", "deadline", "largest",
        "largest_time", "ranges", "received_any",
    )  # fmt: skip

    def __init__(self, *, max_ack_delay: float, threshold: int, max_ranges: int) -> None:
        self._max_delay = max_ack_delay
        self._threshold = threshold
        self._max_ranges = max_ranges
        self._count = 0
        self.received_any = False
        self.base = 0
        #: Received frames above :attr:`base`: sorted, disjoint, non-adjacent [lo, hi).
        self.ranges: list[tuple[int, int]] = []
        self.largest = -1
        self.largest_time = 0.0
        #: When an ACK must be sent (``None``: none owed).
        self.deadline: float | None = None

    def seen(self, number: int) -> bool:
        """Whether frame ``number`` (at or above :attr:`base`) already arrived."""
        for lo, hi in reversed(self.ranges):  # new frames are near the top
            if number >= hi:
                return False
            if number >= lo:
                return True
        return False

    def on_frame(
        self, number: int, floor: int, *, ack_eliciting: bool, ack_now: bool, now: float
    ) -> None:
        """Record a new (not :meth:`seen`) frame and schedule the ACK it needs."""
        late = number < self.base  # the peer already stopped waiting for it
        previous = self.largest
        self.received_any = True
        if not late:
            self.ranges = _insert(self.ranges, number)
        self._advance(floor)
        if number > self.largest:
            self.largest = number
            self.largest_time = now
        if late or not ack_eliciting:
            return
        self._count += 1
        if ack_now or number != previous + 1 or self._count >= self._threshold:
            self.deadline = now
        elif self.deadline is None:
            self.deadline = now + self._max_delay

    def block(self, now: float, budget: int) -> tuple[Ack, int] | None:
        """The ACK to send now and its encoded size, keeping the highest
        ranges that fit ``budget`` bytes; ``None`` if nothing arrived yet or
        not even the bare block fits."""
        if not self.received_any:
            return None
        cum = self.base
        largest = self.ranges[-1][1] - 1 if self.ranges else cum - 1
        delay = 0
        if largest == self.largest:
            delay = min(int((now - self.largest_time) * 1e6), MAX_ACK_DELAY_US)
        size = varint_size(cum) + varint_size(delay) + 1
        if size > budget:
            return None
        ranges = self.ranges[-self._max_ranges :] if self._max_ranges else []
        extra = ack_ranges_size(cum, ranges)
        drop = 0
        while drop < len(ranges) and size + extra > budget:
            # Drop the lowest range; the next one's gap is then counted from cum.
            extra -= ack_ranges_size(cum, ranges[drop : drop + 2])
            drop += 1
            extra += ack_ranges_size(cum, ranges[drop : drop + 1])
        return Ack(cum, delay, tuple(ranges[drop:])), size + extra

    def on_ack_sent(self) -> None:
        """An ACK left in a frame: nothing is owed any more."""
        self._count = 0
        self.deadline = None

    def _advance(self, floor: int) -> None:
        base = max(self.base, floor)
        ranges = self.ranges
        i = 0
        while i < len(ranges) and ranges[i][0] <= base:
            base = max(base, ranges[i][1])
            i += 1
        self.base = base
        if i:
            self.ranges = ranges[i:]


def _insert(ranges: list[tuple[int, int]], number: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted, disjoint, non-adjacent) with ``number`` added."""
    for i, (lo, hi) in enumerate(ranges):
        if number < lo - 1:
            return [*ranges[:i], (number, number + 1), *ranges[i:]]
        if number == lo - 1:
            return [*ranges[:i], (number, hi), *ranges[i + 1 :]]
        if number < hi:
            return ranges
        if number == hi:
            if i + 1 < len(ranges) and ranges[i + 1][0] == hi + 1:
                return [*ranges[:i], (lo, ranges[i + 1][1]), *ranges[i + 2 :]]
            return [*ranges[:i], (lo, hi + 1), *ranges[i + 1 :]]
    return [*ranges, (number, number + 1)]
