"""Benchmark results and their summaries.

Nearest-rank percentiles over recorded latencies (:class:`LatencySummary`),
one phase's result (:class:`PhaseResult`), and what ``raftstate bench``
prints from a list of them: the table, per-phase details, the ratios between
raftstate and etcd, and the open-loop read target's verdict. All pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Re-exported: the runtime CLI (``raftstate simulate``) summarises latencies too.
from raftstate.latency import LatencySummary as LatencySummary
from raftstate.latency import percentile as percentile


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """One phase of one system: a row of the table and an entry of the JSON.

    ``phase`` is the table label (e.g. ``read-lin-leader c=256``; its first
    word names the phase), ``latency_ms`` summarises the calls started in the
    measurement window that succeeded, ``errors`` counts those that failed.
    """

    system: str
    phase: str
    ops_per_s: float
    latency_ms: LatencySummary
    errors: int
    load_cpu_s: float
    #: Per server process, inside the measurement window.
    server_cpu_s: dict[str, float]
    seconds: float
    error_samples: tuple[str, ...]
    #: CPU the rest of the machine used inside the window (noise).
    other_cpu_s: float = 0.0
    server_cpu_us_per_op: float = 0.0
    load_cpu_us_per_op: float = 0.0
    loadavg_before: float = 0.0
    reconnects: int = 0
    #: Open loop: reads per second offered, arrivals not sent because
    #: --devices were in flight (included in ``errors``), and how late sends
    #: were against their schedule (p99, ms).
    offered_per_s: float = 0.0
    dropped: int = 0
    send_lag_ms_p99: float = 0.0
    #: mixed: latency per kind of call ("heartbeat", "read").
    split_latency_ms: dict[str, LatencySummary] = field(default_factory=dict)


def _fmt(v: float) -> str:
    return f"{v:8.2f}" if v < 100 else f"{v:8.0f}"


def render_table(results: list[PhaseResult]) -> str:
    """The results as a fixed-width table: a header, a rule, one row each."""
    head = (
        f"{'system':<10} {'phase':<24} {'ops/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>6} {'server cpu s (per proc)':>24} "
        f"{'srv us/op':>9} {'load cpu s':>10} {'other cpu s':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lat = r.latency_ms
        per_proc = "+".join(f"{v:.1f}" for v in r.server_cpu_s.values())
        server = f"{sum(r.server_cpu_s.values()):.1f} ({per_proc})"
        lines.append(
            f"{r.system:<10} {r.phase:<24} {r.ops_per_s:7.0f} {_fmt(lat.p50)} {_fmt(lat.p95)} "
            f"{_fmt(lat.p99)} {_fmt(lat.max)} {r.errors:6d} {server:>24} "
            f"{r.server_cpu_us_per_op:9.0f} {r.load_cpu_s:10.1f} {r.other_cpu_s:11.1f}"
        )
    return "\n".join(lines)


def render_details(results: list[PhaseResult]) -> list[str]:
    """One line per mixed or open-loop phase with what the table leaves out."""
    lines = []
    for r in results:
        if r.split_latency_ms:
            parts = "; ".join(
                f"{kind} {s.count} ok, p50 {s.p50:.2f} p99 {s.p99:.2f} ms"
                for kind, s in r.split_latency_ms.items()
            )
            lines.append(f"{r.system} {r.phase}: {parts}")
        if r.offered_per_s:
            lines.append(
                f"{r.system} {r.phase}: offered {r.offered_per_s:g}/s, completed "
                f"{r.ops_per_s:.0f}/s, {r.dropped} not sent (bound on reads in flight), "
                f"send lag p99 {r.send_lag_ms_p99:.2f} ms"
            )
    return lines


#: Table names (first word) of the concurrent write phases.
_WRITES = frozenset({"write", "stream", "gateway"})


def ratios(results: list[PhaseResult]) -> dict[str, float]:
    """raftstate-over-etcd throughput ratios of the phases both ran, open-loop
    read p50/p99 (keys with ``_ms_``, milliseconds) and the open-loop
    linearizable-over-serializable p99 ratio per system. Only what the
    results allow is present."""
    by = {(r.system, r.phase.split()[0]): r for r in results}
    out: dict[str, float] = {}

    def throughput(key: str, ours: str, theirs: str) -> None:
        rs, et = by.get(("raftstate", ours)), by.get(("etcd", theirs))
        if rs and et and et.ops_per_s:
            out[key] = round(rs.ops_per_s / et.ops_per_s, 2)

    throughput("stream_throughput_raftstate_stream_over_etcd_gateway", "stream", "gateway")
    throughput("write_throughput_raftstate_unary_over_etcd_unary", "write", "write")
    # etcd's best write phase, whichever shape it was: the conservative ratio.
    rs = by.get(("raftstate", "stream"))
    best = max(
        (r.ops_per_s for (system, phase), r in by.items() if system == "etcd" and phase in _WRITES),
        default=0.0,
    )
    if rs and best:
        out["stream_throughput_raftstate_stream_over_etcd_best_write"] = round(
            rs.ops_per_s / best, 2
        )
    rs, et = by.get(("raftstate", "sequential")), by.get(("etcd", "sequential"))
    if rs and et and rs.latency_ms.p50:
        out["sequential_p50_ms_raftstate"] = round(rs.latency_ms.p50, 3)
        out["sequential_p50_ms_etcd"] = round(et.latency_ms.p50, 3)
        out["sequential_p50_etcd_over_raftstate"] = round(et.latency_ms.p50 / rs.latency_ms.p50, 2)
    for kind in ("lin", "ser"):
        for at in ("leader", "follower"):
            phase = f"read-{kind}-{at}"
            throughput(f"read_{kind}_{at}_throughput_raftstate_over_etcd", phase, phase)
    throughput("mixed_throughput_raftstate_over_etcd", "mixed", "mixed")
    for system in ("raftstate", "etcd"):
        lin, ser = by.get((system, "read-lin-open")), by.get((system, "read-ser-open"))
        for kind, r in (("lin", lin), ("ser", ser)):
            if r and r.latency_ms.count:
                out[f"open_read_{kind}_p50_ms_{system}"] = round(r.latency_ms.p50, 3)
                out[f"open_read_{kind}_p99_ms_{system}"] = round(r.latency_ms.p99, 3)
        if lin and ser and lin.latency_ms.count and ser.latency_ms.count:
            out[f"open_read_p99_lin_over_ser_{system}"] = round(
                lin.latency_ms.p99 / ser.latency_ms.p99, 2
            )
    return out


#: The target the open-loop phases check: linearizable read p99 at most this
#: many times the serializable read p99 at the same offered load.
OPEN_LOOP_P99_TARGET = 2.0


def target_verdicts(results: list[PhaseResult]) -> list[str]:
    """One line per system that ran both open-loop phases: whether its
    linearizable read p99 was within :data:`OPEN_LOOP_P99_TARGET` of its
    serializable read p99. A phase with errors cannot meet the target."""
    lines = []
    by = {(r.system, r.phase.split()[0]): r for r in results}
    for system in ("raftstate", "etcd"):
        lin, ser = by.get((system, "read-lin-open")), by.get((system, "read-ser-open"))
        if not (lin and ser and lin.latency_ms.count and ser.latency_ms.count):
            continue
        ratio = round(lin.latency_ms.p99 / ser.latency_ms.p99, 2)
        phases = [lin, ser]
        clean = all(r.errors == 0 for r in phases)
        met = clean and lin.latency_ms.p99 <= OPEN_LOOP_P99_TARGET * ser.latency_ms.p99
        lines.append(
            f"target {system}: linearizable read p99 within {OPEN_LOOP_P99_TARGET:g}x of "
            f"serializable at {phases[0].offered_per_s:g}/s offered: "
            + ("met" if met else "MISSED")
            + f" ({ratio}x"
            + ("" if clean else ", with errors")
            + ")"
        )
    return lines
