"""Results of ``raftstate chaos bench`` and what is printed and saved from them.

Pure functions over :class:`ProfileResult` values: the fixed-width table, the
Markdown, the UDP/TCP ratios (:func:`transport_ratios`), the verdicts against
the issue's latency targets (:func:`target_lines`) and the CDF plot
(:func:`plot_cdf`, the only function here that writes a file; matplotlib is
imported lazily, so the core package does not need it).

Two latencies are reported for every profile, and neither replaces the other:

* **device** (``heartbeat_ms``): from the device's call to its ack, retries
  included, through the profile's device link. It contains a device round
  trip (on ``weak``: 2 × 30 ± 10 ms) and, for a device attached to a
  follower, the forward to the leader and the wait for the commit index.
* **commit** (``commit_ms``): heartbeats from probe devices attached to the
  leader directly on loopback (no device link, no forwarding), so it is the
  leader's commit round trip over the node links plus the node's own
  processing: the quantity the ``weak`` target (p99 ≤ 120 ms) is about.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import LatencySummary

__all__ = [
    "ProfileResult",
    "TransportRatio",
    "cdf_points",
    "plot_cdf",
    "render_markdown",
    "render_ratios",
    "render_table",
    "target_lines",
    "transport_ratios",
]

#: The issue's sample size for the latency targets.
TARGET_HEARTBEATS = 100_000


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """One profile on one transport: a row of the table and an entry of the JSON."""

    profile: str
    transport: str
    attempted: int
    acked: int
    #: Acked within the deadline / attempted (device cohort).
    success_rate: float
    heartbeat_ms: LatencySummary
    commit_attempted: int
    commit_acked: int
    commit_success_rate: float
    commit_ms: LatencySummary
    reads_attempted: int
    read_ms: LatencySummary
    lost_acked: int
    linearizable: bool | None
    verifier_ok: bool
    problems: tuple[str, ...]
    load_s: float
    #: Toxics of the profile this transport's proxies could not apply.
    skipped_toxics: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: (latency ms, cumulative fraction) points of the acked heartbeats' CDFs.
    cdf: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    commit_cdf: tuple[tuple[float, float], ...] = field(default=(), repr=False)

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.transport}"


@dataclass(frozen=True, slots=True)
class TransportRatio:
    """UDP latency / TCP latency for one profile (below 1: UDP is faster)."""

    profile: str
    #: False when the TCP run lacked toxics the UDP run had (loss, reordering...).
    like_for_like: bool
    tcp_skipped: tuple[str, ...]
    heartbeat: tuple[float, float, float]  # p50, p99, p99.9
    commit: tuple[float, float, float]


def cdf_points(samples: Iterable[float], points: int = 200) -> tuple[tuple[float, float], ...]:
    """(value, cumulative fraction) pairs of the empirical CDF: ``points``
    evenly spaced in rank, plus ``points`` more spaced evenly in
    log(1 - fraction), so the tail (p99, p99.9, ...) keeps its shape on a log
    plot. Always includes the minimum and the maximum."""
    s = sorted(samples)
    n = len(s)
    if not n:
        return ()
    ranks = {min(n - 1, math.ceil(q * n / points)) for q in range(points + 1)}
    if n > 10:
        deepest = math.log10(n)  # 1 - F down to 1/n
        for k in range(points + 1):
            tail = 10 ** -(1 + (deepest - 1) * k / points)
            ranks.add(min(n - 1, max(0, math.ceil((1 - tail) * n) - 1)))
    return tuple((round(s[i], 3), round((i + 1) / n, 6)) for i in sorted(ranks))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not (math.isnan(a) or math.isnan(b)) else math.nan


def _quantiles(s: LatencySummary) -> tuple[float, float, float]:
    return (s.p50, s.p99, s.p999)


def transport_ratios(results: Iterable[ProfileResult]) -> list[TransportRatio]:
    """One ratio per profile that ran on both ``udp`` and ``tcp``, in the
    order profiles first appear."""
    by_key = {(r.profile, r.transport): r for r in results}
    out = []
    for profile in dict.fromkeys(p for p, _ in by_key):
        udp, tcp = by_key.get((profile, "udp")), by_key.get((profile, "tcp"))
        if udp is None or tcp is None:
            continue
        out.append(
            TransportRatio(
                profile=profile,
                like_for_like=not tcp.skipped_toxics,
                tcp_skipped=tcp.skipped_toxics,
                heartbeat=_zip_ratio(_quantiles(udp.heartbeat_ms), _quantiles(tcp.heartbeat_ms)),
                commit=_zip_ratio(_quantiles(udp.commit_ms), _quantiles(tcp.commit_ms)),
            )
        )
    return out


def _zip_ratio(
    a: tuple[float, float, float], b: tuple[float, float, float]
) -> tuple[float, float, float]:
    return (_ratio(a[0], b[0]), _ratio(a[1], b[1]), _ratio(a[2], b[2]))


# ---- text ------------------------------------------------------------------

_COLUMNS = tuple(
    "profile|hb sent|success|device p50|device p99|device p99.9|device max"
    "|commit p50|commit p99|commit p99.9|read p50|read p99|lost acked|linearizable|load s".split(
        "|"
    )
)
_RATIO_COLUMNS = tuple(
    "profile|like for like|device p50|device p99|device p99.9"
    "|commit p50|commit p99|commit p99.9".split("|")
)


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def _row(r: ProfileResult) -> tuple[str, ...]:
    lin = "n/a" if r.linearizable is None else ("yes" if r.linearizable else "NO")
    hb, cm, rd = r.heartbeat_ms, r.commit_ms, r.read_ms
    latencies = [_ms(v) for v in (hb.p50, hb.p99, hb.p999, hb.max, cm.p50, cm.p99, cm.p999)]
    return (
        r.label,
        str(r.attempted),
        "-" if math.isnan(r.success_rate) else f"{100 * r.success_rate:.3f}%",
        *latencies,
        _ms(rd.p50),
        _ms(rd.p99),
        str(r.lost_acked),
        lin,
        f"{r.load_s:.0f}",
    )


def _ratio_row(t: TransportRatio) -> tuple[str, ...]:
    def x(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.3g}"

    like = "yes" if t.like_for_like else "no: tcp without " + ", ".join(t.tcp_skipped)
    return (t.profile, like, *(x(v) for v in t.heartbeat), *(x(v) for v in t.commit))


def _fixed_width(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _markdown_table(columns: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_table(results: list[ProfileResult]) -> str:
    """A fixed-width table, one row per profile and transport; latencies in ms."""
    return _fixed_width([_COLUMNS, *(_row(r) for r in results)])


def render_ratios(ratios: list[TransportRatio]) -> str:
    """The UDP/TCP latency ratios as a fixed-width table ("" if none)."""
    if not ratios:
        return ""
    return _fixed_width([_RATIO_COLUMNS, *(_ratio_row(t) for t in ratios)])


def target_lines(results: list[ProfileResult]) -> list[str]:
    """One verdict per applicable target of the issue, saying what was measured
    and with how many heartbeats (the targets assume 100,000 per profile)."""
    lines = []
    for r in results:
        n = f"{r.attempted:,} heartbeats" + (
            f" (the target assumes {TARGET_HEARTBEATS:,})"
            if r.attempted < TARGET_HEARTBEATS
            else ""
        )
        if r.profile == "weak":
            commit_ok = r.commit_ms.p99 <= 120
            success_ok = r.success_rate >= 0.99999
            lines.append(
                f"{r.label}: commit p99 {_ms(r.commit_ms.p99)} ms vs <= 120 ms: "
                f"{'met' if commit_ok else 'NOT met'}; device-observed p99 "
                f"{_ms(r.heartbeat_ms.p99)} ms (includes the device link); success "
                f"{100 * r.success_rate:.3f}% vs >= 99.999%: "
                f"{'met' if success_ok else 'NOT met'}; {n}"
            )
        elif r.profile == "bad":
            p999_ok = r.heartbeat_ms.p999 < 1000
            lines.append(
                f"{r.label}: device-observed p99.9 {_ms(r.heartbeat_ms.p999)} ms vs < 1000 ms: "
                f"{'met' if p999_ok else 'NOT met'} (commit p99.9 {_ms(r.commit_ms.p999)} ms); "
                f"lost acked {r.lost_acked}: {'met' if r.lost_acked == 0 else 'NOT met'}; {n}"
            )
    bad_lin = [r.label for r in results if r.linearizable is False]
    lines.append(
        "linearizability violations: "
        + (f"in {', '.join(bad_lin)}" if bad_lin else "none (every history checked)")
    )
    return lines


def render_markdown(results: list[ProfileResult]) -> str:
    """Everything of the run as Markdown: results, ratios, target verdicts."""
    lines = _markdown_table(_COLUMNS, (_row(r) for r in results))
    lines += [
        "",
        "Latencies in ms. *device*: as the device sees it through the profile's device "
        "link (retries included; devices spread over all nodes, so most go through a "
        "follower). *commit*: probe devices on the leader's host (loopback gRPC, no device "
        "link): the commit round trip over the node links. *success*: acked within the "
        "deadline / attempted.",
    ]
    ratios = transport_ratios(results)
    if ratios:
        lines += ["", "UDP / TCP latency ratio (below 1: UDP faster):", ""]
        lines += _markdown_table(_RATIO_COLUMNS, (_ratio_row(t) for t in ratios))
    targets = target_lines(results)
    lines += ["", "Targets:", ""] + [f"* {t}" for t in targets]
    notes = [(r.label, n) for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes:", ""] + [f"* {label}: {n}" for label, n in notes]
    return "\n".join(lines) + "\n"


# ---- plot -----------------------------------------------------------------


def plot_cdf(results: list[ProfileResult], path: Path) -> str:
    """Draw the device-observed and the commit latency CDFs (top) and their
    tails, 1 - CDF on a log axis (bottom), one line per profile and transport
    (colour: profile; solid udp, dashed tcp), log x, into ``path`` (PNG).
    Returns one line saying what happened; without matplotlib the plot is
    skipped, not an error."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "PNG skipped: matplotlib is not installed (pip install matplotlib)"
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex="col")
    panels = (
        ("device-observed heartbeat ack latency", "cdf"),
        ("commit latency at the leader (no device link)", "commit_cdf"),
    )
    for col, (title, attr) in enumerate(panels):
        cdf_ax, tail_ax = axes[0][col], axes[1][col]
        for r in results:
            points = [p for p in getattr(r, attr) if p[0] > 0]
            if not points:
                continue
            colour = colours.setdefault(r.profile, palette[len(colours) % len(palette)])
            count = r.heartbeat_ms.count if attr == "cdf" else r.commit_ms.count
            style = {
                "color": colour,
                "linestyle": "--" if r.transport == "tcp" else "-",
                "label": f"{r.label} (n={count:,})",
            }
            xs = [p[0] for p in points]
            cdf_ax.plot(xs, [p[1] for p in points], **style)
            # 1 - F on a log axis: p99 and p99.9 are where the lines cross
            # 1e-2 and 1e-3 (the last point, F = 1, has no place on it).
            tail = [(x, 1 - f) for x, f in zip(xs, (p[1] for p in points), strict=True) if f < 1]
            tail_ax.plot([t[0] for t in tail], [t[1] for t in tail], **style)
        cdf_ax.set_title(title)
        cdf_ax.set_ylabel("fraction of acked heartbeats" if col == 0 else "")
        tail_ax.set_yscale("log")
        tail_ax.set_ylabel("fraction slower (1 - CDF)" if col == 0 else "")
        for level in (1e-2, 1e-3):
            tail_ax.axhline(level, color="grey", linewidth=0.6)
        tail_ax.set_xlabel("ms (log scale)")
        for ax in (cdf_ax, tail_ax):
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
        cdf_ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"plot saved {path.resolve()}"
