"""Results of ``raftstate bench --transport``: CPU per committed heartbeat,
medians over rounds, the UDP/TCP ratios and the tables. All pure.

:class:`HbCpuResult` is one ``hb-open`` run: a fixed offered rate of
heartbeats (unary, at the leader) against one cluster, with the CPU every
node process used inside the measurement window divided by the heartbeats
the leader committed and applied in the same window (its revision delta),
split into the leader and the two followers. :func:`summarize` turns the
runs of every phase and round into one :class:`MetricRow` per metric, the
median over rounds per transport and the ratio of the medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.stats import LatencySummary, PhaseResult

if TYPE_CHECKING:
    from bench.transportcost import TransportCost

#: Phases only ``raftstate bench --transport`` runs (see ``PHASE_HELP``).
COMPARISON_PHASES = ("hb-open", "transport-cost")
COMPARISON_PHASE_HELP = {
    "hb-open": "open loop: --hb-rate heartbeats/s (fixed spacing) at the leader; "
    "node CPU per committed heartbeat, leader vs followers",
    "transport-cost": "in-process codec micro-benchmark: CPU us to send/receive one "
    "Raft message per transport (no Raft, no sockets)",
}
#: What ``--transport`` runs without ``--phases``.
COMPARISON_DEFAULT_PHASES = ("hb-open", "write", "stream", "transport-cost")
#: The goal for UDP: CPU per committed heartbeat at most this times TCP's.
CPU_RATIO_TARGET = 1.5
#: An hb-open run is clean if it committed at least this share of the
#: offered heartbeats, with no errors and one leader throughout.
CLEAN_COMMIT_FRACTION = 0.95
CPU_METRIC = "hb-open cpu us/hb, all nodes"


@dataclass(frozen=True, slots=True)
class HbCpuResult:
    """One ``hb-open`` run on one transport. CPU in seconds inside the
    window; ``*_us_per_hb`` are µs of one core per committed heartbeat."""

    transport: str
    round: int
    offered_per_s: float
    duration_s: float
    #: Heartbeats committed and applied on the leader in the window.
    committed: int
    #: Log entries (batches) committed in the window.
    entries: int
    #: Heartbeats started in the window and acknowledged to the client.
    acked: int
    errors: int
    leader: str
    #: The leader at the end of the window was not the one at its start
    #: (or did not answer): the leader/follower split is then unreliable.
    leader_changed: bool
    node_cpu_s: dict[str, float]
    cpu_source: str
    cpu_us_per_hb: float
    leader_us_per_hb: float
    followers_us_per_hb: float
    #: All nodes' CPU per committed log entry: the cost per Raft round,
    #: whatever the batching (which follows latency, hence noise) was.
    cpu_us_per_entry: float
    hb_per_entry: float
    latency_ms: LatencySummary
    load_cpu_s: float
    other_cpu_s: float

    @property
    def committed_per_s(self) -> float:
        return self.committed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def clean(self) -> bool:
        """The cluster kept up with the offered rate: no errors (nothing
        dropped at the in-flight bound), at least
        :data:`CLEAN_COMMIT_FRACTION` of the offered heartbeats committed,
        and the same leader at both ends. Only then did it do the same work
        as a clean run of the other transport; a starved run commits fewer
        heartbeats in bigger batches, which flatters its CPU per heartbeat."""
        offered = self.offered_per_s * self.duration_s
        return (
            self.errors == 0
            and not self.leader_changed
            and self.committed >= CLEAN_COMMIT_FRACTION * offered
        )


def clean_runs(hb: Sequence[HbCpuResult], transport: str) -> list[HbCpuResult]:
    """``transport``'s clean runs, or all its runs if none was clean."""
    mine = [r for r in hb if r.transport == transport]
    return [r for r in mine if r.clean] or mine


def clean_note(hb: Sequence[HbCpuResult], transports: Sequence[str]) -> str | None:
    """Which hb-open runs the medians use, or ``None`` if every run was clean."""
    if all(r.clean for r in hb):
        return None
    counts = []
    for t in transports:
        mine = [r for r in hb if r.transport == t]
        ok = sum(r.clean for r in mine)
        counts.append(f"{t} {ok}/{len(mine)}" + ("" if ok else " (none clean: all used)"))
    return (
        "hb-open medians use clean runs only (no errors, >= "
        f"{CLEAN_COMMIT_FRACTION:.0%} of offered committed, one leader): " + ", ".join(counts)
    )


def hb_cpu_result(
    transport: str,
    round_no: int,
    *,
    offered_per_s: float,
    duration_s: float,
    committed: int,
    entries: int,
    acked: int,
    errors: int,
    leader: str,
    leader_changed: bool,
    node_cpu_s: Mapping[str, float],
    cpu_source: str,
    latencies_ms: Sequence[float],
    load_cpu_s: float,
    other_cpu_s: float,
) -> HbCpuResult:
    """Derive the per-heartbeat figures. With nothing committed they are
    ``nan`` (the run measured nothing), never a division by zero."""
    per_hb = 1e6 / committed if committed > 0 else math.nan
    total = sum(node_cpu_s.values())
    lead = node_cpu_s.get(leader, 0.0)
    return HbCpuResult(
        transport=transport,
        round=round_no,
        offered_per_s=offered_per_s,
        duration_s=duration_s,
        committed=committed,
        entries=entries,
        acked=acked,
        errors=errors,
        leader=leader,
        leader_changed=leader_changed,
        node_cpu_s={k: round(v, 4) for k, v in node_cpu_s.items()},
        cpu_source=cpu_source,
        cpu_us_per_hb=round(total * per_hb, 1),
        leader_us_per_hb=round(lead * per_hb, 1),
        followers_us_per_hb=round((total - lead) * per_hb, 1),
        cpu_us_per_entry=round(total * 1e6 / entries, 1) if entries > 0 else math.nan,
        hb_per_entry=round(committed / entries, 2) if entries > 0 else math.nan,
        latency_ms=LatencySummary.of(latencies_ms),
        load_cpu_s=round(load_cpu_s, 2),
        other_cpu_s=round(other_cpu_s, 2),
    )


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One metric over the rounds: each transport's values in round order,
    their median, and the UDP/TCP ratio of the medians (``None`` unless both
    transports ran)."""

    name: str
    runs: dict[str, list[float]]
    medians: dict[str, float]
    ratio: float | None


def _row(name: str, runs: Mapping[str, Sequence[float]]) -> MetricRow:
    clean = {t: [v for v in vs if not math.isnan(v)] for t, vs in runs.items() if vs}
    medians = {t: statistics.median(vs) if vs else math.nan for t, vs in clean.items()}
    udp, tcp = medians.get("udp"), medians.get("tcp")
    ratio = None
    if udp is not None and tcp is not None and tcp > 0 and not math.isnan(udp):
        ratio = round(udp / tcp, 3)
    return MetricRow(name, {t: list(vs) for t, vs in runs.items()}, medians, ratio)


#: (metric name, HbCpuResult field or property) of the hb-open phase.
_HB_METRICS = (
    (CPU_METRIC, "cpu_us_per_hb"),
    ("hb-open cpu us/hb, leader", "leader_us_per_hb"),
    ("hb-open cpu us/hb, 2 followers", "followers_us_per_hb"),
    ("hb-open cpu us/log entry, all nodes", "cpu_us_per_entry"),
    ("hb-open committed hb/s", "committed_per_s"),
    ("hb-open hb per log entry", "hb_per_entry"),
)
#: (metric suffix, PhaseResult attribute path) of the closed-loop phases.
_PHASE_METRICS = (
    ("ops/s", "ops_per_s"),
    ("p50 ms", "latency_ms.p50"),
    ("p99 ms", "latency_ms.p99"),
    ("server cpu us/op", "server_cpu_us_per_op"),
)
_COST_METRICS = (
    ("AE send us", "send_us"),
    ("AE recv us", "recv_us"),
    ("reply send+recv us", None),
    ("timer+ack frames us/exch", "timer_us"),
    ("exchange us (both ends)", "exchange_us"),
    ("wire units/exchange", "datagrams_per_exchange"),
)


def _attr(obj: object, path: str) -> float:
    for part in path.split("."):
        obj = getattr(obj, part)
    return float(obj)  # type: ignore[arg-type]


def summarize(
    hb: Sequence[HbCpuResult],
    phases: Sequence[PhaseResult],
    costs: Sequence[TransportCost],
    transports: Sequence[str],
) -> list[MetricRow]:
    """One row per metric of every phase that ran, in a fixed order.
    ``phases`` are closed-loop results whose ``system`` is the transport;
    hb-open metrics come from :func:`clean_runs`."""
    rows: list[MetricRow] = []
    if hb:
        hb_latency = (
            ("hb-open ack p50 ms", "latency_ms.p50"),
            ("hb-open ack p99 ms", "latency_ms.p99"),
        )
        for name, path in (*_HB_METRICS, *hb_latency):
            runs = {t: [_attr(r, path) for r in clean_runs(hb, t)] for t in transports}
            rows.append(_row(name, runs))
    kinds = list(dict.fromkeys(r.phase.split()[0] for r in phases))
    for kind in kinds:
        for suffix, path in _PHASE_METRICS:
            runs = {
                t: [_attr(r, path) for r in phases if r.system == t and r.phase.split()[0] == kind]
                for t in transports
            }
            rows.append(_row(f"{kind} {suffix}", runs))
    if costs:
        for name, field in _COST_METRICS:
            runs = {}
            for t in transports:
                mine = [c for c in costs if c.transport == t]
                if field is None:
                    runs[t] = [_attr(c, "reply_send_us") + _attr(c, "reply_recv_us") for c in mine]
                else:
                    runs[t] = [_attr(c, field) for c in mine]
            rows.append(_row(f"transport-cost {name}", runs))
    return rows


@dataclass(frozen=True, slots=True)
class RoundRatio:
    """UDP/TCP CPU per committed heartbeat in one round; ``clean`` if both
    runs of the round were (see :attr:`HbCpuResult.clean`)."""

    round: int
    ratio: float
    clean: bool


def per_round_ratios(hb: Sequence[HbCpuResult]) -> list[RoundRatio]:
    """The ratio of each round that ran both transports, in round order."""
    by = {(r.transport, r.round): r for r in hb}
    out = []
    for k in sorted({r.round for r in hb}):
        udp, tcp = by.get(("udp", k)), by.get(("tcp", k))
        if udp is None or tcp is None or not tcp.cpu_us_per_hb > 0:
            continue
        if not math.isnan(udp.cpu_us_per_hb):
            ratio = round(udp.cpu_us_per_hb / tcp.cpu_us_per_hb, 3)
            out.append(RoundRatio(k, ratio, udp.clean and tcp.clean))
    return out


def cpu_ratio_line(rows: Sequence[MetricRow]) -> str | None:
    """``UDP/TCP CPU per committed heartbeat = X.XX× (target ≤ 1.5×): met``,
    or ``None`` when the hb-open phase did not run on both transports."""
    row = next((r for r in rows if r.name == CPU_METRIC), None)
    if row is None or row.ratio is None:
        return None
    verdict = "met" if row.ratio <= CPU_RATIO_TARGET else "MISSED"
    return (
        f"UDP/TCP CPU per committed heartbeat = {row.ratio:.2f}\u00d7 "
        f"(target \u2264 {CPU_RATIO_TARGET:g}\u00d7): {verdict}"
    )


def _cell(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def render_summary(rows: Sequence[MetricRow], transports: Sequence[str]) -> str:
    """Medians over rounds, one row per metric, with the UDP/TCP ratio."""
    both = "udp" in transports and "tcp" in transports
    head = f"{'metric (median over rounds)':<40}" + "".join(f"{t:>10}" for t in transports)
    head += f"{'udp/tcp':>9}" if both else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{_cell(r.medians.get(t, math.nan)):>10}" for t in transports)
        ratio = (f"{r.ratio:8.2f}x" if r.ratio is not None else f"{'-':>9}") if both else ""
        lines.append(f"{r.name:<40}{cells}{ratio}")
    return "\n".join(lines)


def render_hb_runs(hb: Sequence[HbCpuResult]) -> str:
    """Every hb-open run: committed heartbeats, CPU per node and per heartbeat."""
    head = (
        f"{'transport':<9} {'round':>5} {'offered/s':>9} {'commit/s':>8} {'hb/entry':>8} "
        f"{'errors':>6} {'cpu s per node':<26} {'us/hb':>7} {'leader':>7} {'follow':>7} "
        f"{'us/entry':>8} {'other cpu':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in hb:
        nodes = " ".join(
            f"{k}{'*' if k == r.leader else ''}={v:.2f}" for k, v in sorted(r.node_cpu_s.items())
        )
        lines.append(
            f"{r.transport:<9} {r.round:>5} {r.offered_per_s:>9.0f} {r.committed_per_s:>8.0f} "
            f"{_cell(r.hb_per_entry):>8} {r.errors:>6} {nodes:<26} {_cell(r.cpu_us_per_hb):>7} "
            f"{_cell(r.leader_us_per_hb):>7} {_cell(r.followers_us_per_hb):>7} "
            f"{_cell(r.cpu_us_per_entry):>8} {r.other_cpu_s:>9.2f}"
            + ("" if r.clean else "  not clean")
            + ("  leader changed!" if r.leader_changed else "")
        )
    return "\n".join(lines)


__all__ = [
    "CLEAN_COMMIT_FRACTION",
    "COMPARISON_DEFAULT_PHASES",
    "COMPARISON_PHASES",
    "COMPARISON_PHASE_HELP",
    "CPU_METRIC",
    "CPU_RATIO_TARGET",
    "HbCpuResult",
    "MetricRow",
    "RoundRatio",
    "clean_note",
    "clean_runs",
    "cpu_ratio_line",
    "hb_cpu_result",
    "per_round_ratios",
    "render_hb_runs",
    "render_summary",
    "summarize",
]
