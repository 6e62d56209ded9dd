"""Latency summaries: nearest-rank percentiles over recorded samples.

Used by ``raftstate simulate`` and, re-exported by ``bench.stats``, by the
benchmarks. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values;
    ``nan`` for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Milliseconds."""

    count: int
    p50: float
    p95: float
    p99: float
    p999: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> LatencySummary:
        s = sorted(samples_ms)
        mean = sum(s) / len(s) if s else math.nan
        return cls(
            len(s),
            percentile(s, 50),
            percentile(s, 95),
            percentile(s, 99),
            percentile(s, 99.9),
            s[-1] if s else math.nan,
            mean,
        )
