"""Fleet benchmark results: a mergeable latency histogram and the phase rows.

A fleet run acknowledges millions of heartbeats, too many to keep one float
each and ship between processes. :class:`LatencyHistogram` keeps counts in
logarithmic buckets 1 % wide (so a percentile read from it is within 1 % of
the exact one), and the histograms of all load processes add up.

:class:`FleetPhaseResult` is one row of ``raftstate bench --fleet``'s table
and one entry of its JSON; :func:`render_fleet_table` prints them and
:func:`fleet_verdicts` checks the [million] targets. All pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Relative width of a histogram bucket.
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)
#: Latencies at or below this (ms) share the lowest bucket.
_FLOOR_MS = 0.001


def _bucket(ms: float) -> int:
    return math.floor(math.log(max(ms, _FLOOR_MS) / _FLOOR_MS) / _LOG_GROWTH)


def _bucket_top(k: int) -> float:
    return _FLOOR_MS * _GROWTH ** (k + 1)


@dataclass(slots=True)
class LatencyHistogram:
    """Counts of latencies (ms) in buckets ``[0.001·1.01^k, 0.001·1.01^(k+1))``.

    Not thread-safe. Picklable (a plain dict inside)."""

    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, ms: float, n: int = 1) -> None:
        """Record ``n`` samples of ``ms`` milliseconds (``n`` >= 1)."""
        k = _bucket(ms)
        self.buckets[k] = self.buckets.get(k, 0) + n
        self.count += n
        self.total_ms += ms * n
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples to this histogram."""
        for k, n in other.buckets.items():
            self.buckets[k] = self.buckets.get(k, 0) + n
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile ``q`` (0..100), as the top of its bucket
        (never above the largest sample); ``nan`` when empty."""
        if not self.count:
            return math.nan
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if seen >= rank:
                return min(_bucket_top(k), self.max_ms)
        return self.max_ms

    @property
    def mean(self) -> float:
        return self.total_ms / self.count if self.count else math.nan

    def summary(self) -> dict[str, float]:
        """count, p50, p99, p99.9, max and mean (ms), rounded for the JSON;
        only the count when there are no samples."""
        if not self.count:
            return {"count": 0}
        return {
            "count": self.count,
            "p50": round(self.percentile(50), 3),
            "p99": round(self.percentile(99), 3),
            "p999": round(self.percentile(99.9), 3),
            "max": round(self.max_ms, 3),
            "mean": round(self.mean, 3),
        }


def merged(hists: Iterable[LatencyHistogram]) -> LatencyHistogram:
    out = LatencyHistogram()
    for h in hists:
        out.merge(h)
    return out


@dataclass(frozen=True, slots=True)
class FleetPhaseResult:
    """One phase of one system in a fleet run.

    ``acked_per_s`` counts heartbeats (etcd: puts) acknowledged OK that were
    sent inside the measurement window, over the window. ``failed`` is set
    (and the numbers are what was measured up to then) when the phase could
    not finish: a node died, the load timed out.
    """

    system: str
    phase: str
    seconds: float
    offered_per_s: float
    acked_per_s: float
    acked: int
    errors: int
    latency_ms: Mapping[str, float]
    server_cpu_s: Mapping[str, float]
    server_cpu_us_per_ack: float
    load_cpu_s: float
    load_cpu_us_per_ack: float
    other_cpu_s: float = 0.0
    term_changes: int = 0
    leader_changes: int = 0
    #: Per node: longest tick since the node started (ms) as read after the
    #: phase, and ticks over 50 ms during the phase.
    max_tick_ms: Mapping[str, float] = field(default_factory=dict)
    tick_stalls: Mapping[str, int] = field(default_factory=dict)
    rss_mib: Mapping[str, float] = field(default_factory=dict)
    snapshot_bytes: Mapping[str, int] = field(default_factory=dict)
    journal_bytes: Mapping[str, int] = field(default_factory=dict)
    compactions: Mapping[str, int] = field(default_factory=dict)
    duplicates: int = 0
    backlog_max: int = 0
    send_lag_ms_p99: float = 0.0
    #: Restart phases: seconds from kill -9 to serving, and what it waited for.
    restart_s: float = 0.0
    notes: tuple[str, ...] = ()
    error_samples: tuple[str, ...] = ()
    failed: str = ""


def _num(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def render_fleet_table(results: list[FleetPhaseResult]) -> str:
    """Fixed-width table: one row per phase, the per-node columns as ``a/b/c``."""
    head = (
        f"{'system':<9} {'phase':<18} {'offered/s':>9} {'acked/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'p99.9':>7} {'err':>5} {'terms+':>6} {'srv us/ack':>10} "
        f"{'load us/ack':>11} {'max tick ms':>17} {'rss MiB':>16} {'snap MiB':>14} {'compact':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lat = r.latency_ms
        ticks = "/".join(f"{v:.0f}" for v in r.max_tick_ms.values()) or "-"
        rss = "/".join(f"{v:.0f}" for v in r.rss_mib.values()) or "-"
        snap = "/".join(f"{v / 2**20:.1f}" for v in r.snapshot_bytes.values()) or "-"
        label = r.phase if not r.failed else f"{r.phase} FAILED"
        if r.restart_s:
            label = f"{r.phase} {r.restart_s:.1f}s"
        lines.append(
            f"{r.system:<9} {label:<18} {r.offered_per_s:9.0f} {r.acked_per_s:8.0f} "
            f"{_num(lat.get('p50', math.nan)):>7} {_num(lat.get('p99', math.nan)):>7} "
            f"{_num(lat.get('p999', math.nan)):>7} {r.errors:5d} {r.term_changes:6d} "
            f"{r.server_cpu_us_per_ack:10.0f} {r.load_cpu_us_per_ack:11.0f} {ticks:>17} "
            f"{rss:>16} {snap:>14} {sum(r.compactions.values()):7d}"
        )
    return "\n".join(lines)


#: [million] targets (issue 16).
TARGET_P99_MS = 50.0
TARGET_TICK_MS = 50.0
TARGET_RESTART_S = 10.0
TARGET_CPU_RATIO = 2.0


def fleet_verdicts(results: list[FleetPhaseResult], rate: float) -> list[str]:
    """One line per [million] target the results allow checking: met or
    MISSED, with the measured number."""
    by = {(r.system, r.phase): r for r in results}
    lines: list[str] = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"target: {text}: {'met' if ok else 'MISSED'}")

    hold = by.get(("raftstate", "hold"))
    if hold is not None:
        p99 = hold.latency_ms.get("p99", math.nan)
        line(
            not hold.failed
            and hold.acked_per_s >= 0.98 * rate
            and p99 <= TARGET_P99_MS
            and hold.errors == 0,
            f"{rate:g} hb/s held with ack p99 <= {TARGET_P99_MS:g} ms "
            f"(achieved {hold.acked_per_s:.0f}/s, p99 {_num(p99)} ms, {hold.errors} errors)",
        )
        line(
            hold.term_changes == 0 and hold.leader_changes == 0,
            f"no leader change during hold ({hold.term_changes} term changes, "
            f"{hold.leader_changes} leader changes)",
        )
    ticks = [v for r in results if r.system == "raftstate" for v in r.max_tick_ms.values()]
    if ticks:
        line(max(ticks) <= TARGET_TICK_MS, f"longest tick <= {TARGET_TICK_MS:g} ms "
             f"(worst {max(ticks):.0f} ms)")  # fmt: skip
    for r in results:
        if r.system == "raftstate" and r.phase.startswith("restart"):
            line(
                not r.failed and 0 < r.restart_s <= TARGET_RESTART_S,
                f"{r.phase} to serving <= {TARGET_RESTART_S:g} s "
                + (f"({r.failed})" if r.failed else f"({r.restart_s:.1f} s)"),
            )
    rs, et = by.get(("raftstate", "saturate")), by.get(("etcd", "saturate"))
    if rs is not None and et is not None and et.acked_per_s and et.server_cpu_us_per_ack:
        line(
            rs.acked_per_s >= et.acked_per_s,
            f"saturation >= etcd Txn puts/s ({rs.acked_per_s:.0f} vs {et.acked_per_s:.0f}, "
            f"{rs.acked_per_s / et.acked_per_s:.2f}x)",
        )
        ratio = rs.server_cpu_us_per_ack / et.server_cpu_us_per_ack
        line(
            0 < ratio <= TARGET_CPU_RATIO,
            f"server CPU per heartbeat <= {TARGET_CPU_RATIO:g}x etcd's per Txn put "
            f"({rs.server_cpu_us_per_ack:.0f} vs {et.server_cpu_us_per_ack:.0f} us, {ratio:.2f}x)",
        )
    return lines


__all__ = [
    "FleetPhaseResult",
    "LatencyHistogram",
    "fleet_verdicts",
    "merged",
    "render_fleet_table",
]
