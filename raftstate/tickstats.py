"""How long each Raft tick keeps pysyncobj's tick thread busy.

Theory of operation. pysyncobj's tick thread does all Raft work: it reads
messages, applies entries, sends AppendEntries, takes snapshots. While one
tick runs, nothing else in Raft happens: a tick that works for longer than
the election timeout makes followers start an election. A tick's *work* is
its wall time minus the time it spent waiting in the poller for input
(``RaftNode`` measures both); this module keeps the numbers:

* the longest tick since start and since the last :meth:`TickStats.take_max`
  (a benchmark reads and resets it per phase);
* a cumulative histogram over fixed buckets, Prometheus-style, and the count
  and sum, for ``/metrics``;
* how many ticks worked longer than :data:`STALL_S` (the target bound).

Written by the tick thread only. Readers on other threads see a consistent
copy through :meth:`snapshot` (values are replaced, never mutated in place,
and a torn read of two counters only misplaces one tick between them).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

#: A tick that works longer than this is a stall (the [million] bound).
STALL_S = 0.050
#: Upper bounds of the histogram buckets, in seconds (+Inf is implicit).
BUCKETS_S = (0.001, 0.002, 0.005, 0.010, 0.020, 0.050, 0.100, 0.250, 0.500, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class TickSnapshot:
    """A copy of the tick statistics at one moment."""

    count: int
    sum_s: float
    max_s: float
    #: Longest tick since the last ``take_max`` (or start).
    recent_max_s: float
    stalls: int
    #: CPU time of the longest tick (wall work minus CPU = time the thread
    #: waited for the GIL or a core: contention, not Raft work).
    max_cpu_s: float
    #: Cumulative counts per bucket in ``BUCKETS_S`` order, then +Inf.
    buckets: tuple[int, ...]


class TickStats:
    """Tick work durations. ``observe`` on the tick thread only."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS_S) + 1)
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0
        self.recent_max_s = 0.0
        self.stalls = 0
        self.max_cpu_s = 0.0

    def observe(self, work_s: float, cpu_s: float = 0.0) -> None:
        """Record one tick that worked ``work_s`` seconds of wall time, of
        which ``cpu_s`` on a core."""
        work_s = max(work_s, 0.0)
        self._counts[bisect.bisect_left(BUCKETS_S, work_s)] += 1
        self.count += 1
        self.sum_s += work_s
        if work_s > self.max_s:
            self.max_s = work_s
            self.max_cpu_s = cpu_s
        if work_s > self.recent_max_s:
            self.recent_max_s = work_s
        if work_s > STALL_S:
            self.stalls += 1

    def take_max(self) -> float:
        """Return the longest tick since the previous call and start over.
        Any thread (a tick finishing concurrently may land in either window)."""
        value, self.recent_max_s = self.recent_max_s, 0.0
        return value

    def snapshot(self) -> TickSnapshot:
        """A consistent-enough copy for status and metrics. Any thread."""
        cumulative: list[int] = []
        total = 0
        for n in list(self._counts):
            total += n
            cumulative.append(total)
        return TickSnapshot(
            self.count,
            self.sum_s,
            self.max_s,
            self.recent_max_s,
            self.stalls,
            self.max_cpu_s,
            tuple(cumulative),
        )
