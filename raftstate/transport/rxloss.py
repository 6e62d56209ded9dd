"""Loss of the frames a link *receives* (the peer -> us direction).

Theory of operation
-------------------
The sender's loss estimate (:mod:`~raftstate.transport.recovery`) measures
the frames *it* sends. A follower's election timer, though, waits on frames
it receives from the leader, and the two directions of a path can differ
(a clean uplink and a lossy downlink). This meter measures the receive
direction from the frame numbers alone: the sender numbers every frame it
sends 0, 1, 2, ... (bare ACKs, retransmissions and redundant copies each
ride in a frame with a new number, never reusing one), so a number that never
arrives is a lost frame, whatever it carried.

A number is judged once the largest number seen is ``REORDER_SLACK`` past it
(arrived: its slot in a ring of recent arrivals holds it; else lost), so
reordering by fewer frames is not taken for loss. A frame arriving later
still counts as lost (conservative). The judged fates of the last
``WINDOW`` numbers form a sliding window with running counts: the mean loss
is the lost fraction, the burst loss q = P(lost | previous lost) the
fraction of lost numbers whose successor is lost too. Each arrival judges
the numbers it moves past the slack: amortised O(1) per frame the peer sent,
and never more than ``WINDOW + 1`` judgements for one arrival (a jump over a
long silence only has to fill the window). No clock: numbers only.
"""

from __future__ import annotations

#: Numbers a frame may be overtaken by before its absence counts as a loss.
REORDER_SLACK = 32
#: Judged numbers in the sliding window (±2.5 % at 20 % loss).
WINDOW = 256
#: Judged numbers needed before a loss rate is reported.
MIN_JUDGED = 32
#: (lost, next) pairs needed before a burst loss is reported.
MIN_PAIRS = 8

#: Arrival ring; above REORDER_SLACK, so a slot is reused only after its number is judged.
_RING = 2 * REORDER_SLACK


class RxLossMeter:
    """Receive-direction loss by frame number. Not thread-safe."""

    __slots__ = (
        "_arrived", "_fate", "_lost", "_next", "_pairs", "_prev_lost", "_runs", "_stored",
        "largest",
    )  # fmt: skip

    def __init__(self) -> None:
        self._arrived = [-1] * _RING  # slot n % _RING: n if frame n arrived
        #: Per judged number (slot n % WINDOW): 1 lost; 2 predecessor lost; 4 both.
        self._fate = bytearray(WINDOW)
        self._stored = 0  # judged numbers in the window (<= WINDOW)
        self._lost = 0  # ... that were lost
        self._pairs = 0  # ... whose predecessor was lost
        self._runs = 0  # ... lost with their predecessor lost
        self._prev_lost = False  # fate of the last judged number
        self._next = 0  # lowest number not judged yet
        #: Highest frame number seen.
        self.largest = -1

    def on_frame(self, number: int) -> None:
        """Record that frame ``number`` arrived (once per new frame; a
        duplicate is harmless). Judges the numbers it moves past the slack."""
        if number > self.largest:
            self.largest = number
            end = number - REORDER_SLACK  # judge every number up to this one
            start = self._next
            if end - start >= WINDOW:
                # the older numbers would leave the window at once: only the
                # fate of the first kept one's predecessor matters.
                start = end - WINDOW + 1
                self._prev_lost = self._arrived[(start - 1) % _RING] != start - 1
            for m in range(start, end + 1):
                self._judge(m, self._arrived[m % _RING] != m)
            self._next = max(self._next, end + 1)
        if number >= self._next:
            self._arrived[number % _RING] = number

    def loss(self) -> float | None:
        """Lost fraction of the last ``WINDOW`` judged numbers; ``None``
        before ``MIN_JUDGED`` are judged."""
        if self._stored < MIN_JUDGED:
            return None
        return self._lost / self._stored

    def burst(self) -> float | None:
        """P(lost | previous lost) over the window; ``None`` before
        ``MIN_PAIRS`` judged numbers followed a lost one."""
        if self._pairs < MIN_PAIRS:
            return None
        return self._runs / self._pairs

    def _judge(self, number: int, lost: bool) -> None:
        slot = number % WINDOW
        if self._stored == WINDOW:  # evict the number WINDOW below
            old = self._fate[slot]
            self._lost -= old & 1
            self._pairs -= (old >> 1) & 1
            self._runs -= (old >> 2) & 1
        else:
            self._stored += 1
        after = self._prev_lost
        bits = int(lost) | (2 if after else 0) | (4 if after and lost else 0)
        self._fate[slot] = bits
        self._lost += lost
        self._pairs += after
        self._runs += after and lost
        self._prev_lost = lost


__all__ = ["MIN_JUDGED", "REORDER_SLACK", "WINDOW", "RxLossMeter"]
