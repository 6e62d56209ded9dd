"""Cheap single-writer histograms and counters for ``/metrics``.

Theory of operation. Values that can be read at scrape time are read then
(raftstate/metrics.py); what cannot (how long each heartbeat waited for its
commit, how many heartbeats each log entry carried) is recorded where it
happens, with as little work as possible: :meth:`Histogram.observe` is one
``bisect`` and three additions, no lock, no label lookup. One thread writes
a histogram; a scrape on another thread reads a :meth:`snapshot` (a torn
read misplaces at most the observation in flight, and Prometheus tolerates
a count that is one off for one scrape).

Buckets are upper bounds, Prometheus-style (``le``); the snapshot turns the
per-bucket counts into the cumulative ones the exposition format wants.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

#: Request latencies, 0.5 ms to 10 s (gRPC handling, heartbeat acks).
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Slow operations (snapshots), 10 ms to 5 min.
SLOW_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Counts of things per batch (heartbeats per log entry), 1 to 4096.
SIZE_BUCKETS = tuple(float(2**i) for i in range(13))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A copy of a histogram: ``buckets`` are the upper bounds, ``cumulative``
    the cumulative counts for each bound and then +Inf (so its last value is
    ``count``)."""

    buckets: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Histogram:
    """Counts of observations per bucket, their number and sum. Not
    thread-safe for writers: one writer thread; any thread may snapshot."""

    __slots__ = ("buckets", "_counts", "_sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        """``buckets``: strictly increasing upper bounds (+Inf is implicit).
        Raises ``ValueError`` otherwise."""
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError("histogram buckets must be non-empty and strictly increasing")
        self.buckets = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (a value equal to a bound falls in that bucket)."""
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        """The current state, cumulative. Any thread."""
        running = 0
        cumulative = []
        for n in list(self._counts):
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.buckets, tuple(cumulative), self._sum)


__all__ = [
    "LATENCY_BUCKETS_S",
    "SIZE_BUCKETS",
    "SLOW_BUCKETS_S",
    "Histogram",
    "HistogramSnapshot",
]
