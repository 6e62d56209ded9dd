"""The WAN emulator measured through the lab: ``sudo raftstate lab probe``.

The lab's claims about its emulator (:mod:`chaos.wan`) rest on this: one
cone site, the emulator between it and the public namespace, and standard
tools on both ends (``ping`` from iputils, ``iperf3``) with nothing of ours
in the measuring path. Each row sets one impairment, runs one probe and
compares what was measured with what was configured:

* ``ping`` rows (round trip through the emulator twice: ``s1>pub`` and
  ``pub>s1``): RTT p50/p99 against the configured ones, so the difference is
  the emulator's delay error; loss against the configured loss;
* ``iperf3`` UDP and TCP rows through a rate limit on ``s1>pub``: delivered
  throughput against the configured rate;
* the capacity row: ``iperf3`` UDP with 64-byte payloads and no rate cap
  through a perfect link: datagrams per second the emulator delivered, and
  its CPU time per packet (``/proc``), which is the emulator's ceiling.

Results are a table on stdout and JSON (with the raw settings). Root only,
like every lab command.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import proccpu

IPERF_PORT = 5201

_PING_TIME = re.compile(r"time=([0-9.]+) ms")


@dataclass(slots=True)
class ProbeRow:
    """One impairment, one probe, configured vs measured."""

    name: str
    probe: str  # "ping", "iperf3-udp", "iperf3-tcp", "capacity"
    impairment: dict[str, float]
    configured: dict[str, float]
    measured: dict[str, float]
    samples: int
    notes: list[str] = field(default_factory=list)


def rtt_quantiles(
    delay_ms: float,
    jitter_ms: float,
    q: float,
    interval_ms: float | None = None,
    draws: int = 100_000,
) -> float:
    """The configured round trip's ``q`` quantile when both directions add
    ``delay_ms ± U(jitter_ms)``. Exact without jitter. With jitter, sampled
    (seeded, so tables are reproducible) from an independent model of the
    emulator's documented rules: ``interval_ms`` apart, pings go out, each
    direction delays them and, being FIFO, releases none before the one
    ahead of it; the reply leaves when the request arrives. ``interval_ms``
    ``None`` gives independent draws (no FIFO), the sum of two uniforms."""
    if jitter_ms <= 0:
        return 2 * delay_ms
    rng = random.Random(1)

    def one_way(sends: list[float]) -> list[float]:
        out, floor = [], -math.inf
        for t in sends:
            at = t + max(0.0, delay_ms + rng.uniform(-jitter_ms, jitter_ms))
            if interval_ms is not None:
                at = floor = max(at, floor)
            out.append(at)
        return out

    sends = [i * (interval_ms or 0.0) for i in range(draws)]
    back = one_way(one_way(sends))
    rtts = sorted(b - s for b, s in zip(back, sends, strict=True))
    return rtts[min(len(rtts) - 1, int(q * len(rtts)))]


def parse_ping(text: str) -> tuple[list[float], int, int]:
    """``ping`` output -> (RTTs in ms, transmitted, received)."""
    rtts = [float(m.group(1)) for m in _PING_TIME.finditer(text)]
    sent = received = 0
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if m:
        sent, received = int(m.group(1)), int(m.group(2))
    return rtts, sent, received


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class LabProbe:
    """Runs the probe rows against a one-site :class:`~cluster.natlab.NatLab`."""

    def __init__(self, lab: Any, progress: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.progress = progress
        self._server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LabProbe:
        self._server = subprocess.Popen(
            [*self.lab.public_exec_prefix(), "iperf3", "-s", "-J", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._server_listening():
            if self._server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start in the public namespace")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.terminate()
            try:
                self._server.wait(5)
            except subprocess.TimeoutExpired:
                self._server.kill()

    def _server_listening(self) -> bool:
        out = subprocess.run(
            [*self.lab.public_exec_prefix(), "ss", "-Htln", f"sport = :{IPERF_PORT}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return bool(out.strip())

    def _set(self, **fields: float) -> None:
        """Impair ``s1>pub`` with ``fields``, and ``pub>s1`` too for the delay
        fields (so a ping's two passes both see them)."""
        both = {k: v for k, v in fields.items() if k in ("delay_ms", "jitter_ms")}
        self.lab.impair(1, "pub", **fields)
        self.lab.impair("pub", 1, **both)

    def ping(self, name: str, count: int, interval_s: float, **fields: float) -> ProbeRow:
        self._set(**fields)
        self.progress(f"   ping: {name} ({count} pings)")
        out = subprocess.run(
            [*self.lab.exec_prefix(1), "ping", "-n", "-c", str(count), "-i", str(interval_s),
             "-W", "2", self.lab.public_ip],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        rtts, sent, received = parse_ping(out)
        delay, jitter = fields.get("delay_ms", 0.0), fields.get("jitter_ms", 0.0)
        p50, p99 = _quantile(rtts, 0.5), _quantile(rtts, 0.99)
        gap = interval_s * 1000
        c50, c99 = rtt_quantiles(delay, jitter, 0.5, gap), rtt_quantiles(delay, jitter, 0.99, gap)
        loss = 1 - received / sent if sent else math.nan
        return ProbeRow(
            name=name,
            probe="ping",
            impairment=dict(fields),
            configured={"rtt_p50_ms": c50, "rtt_p99_ms": c99, "loss": fields.get("loss", 0.0)},
            measured={
                "rtt_p50_ms": p50,
                "rtt_p99_ms": p99,
                "rtt_max_ms": max(rtts) if rtts else math.nan,
                "error_p50_ms": p50 - c50,
                "error_p99_ms": p99 - c99,
                "loss": loss,
            },
            samples=sent,
        )

    def _iperf(self, args: list[str], seconds: float) -> dict[str, Any]:
        cmd = [*self.lab.exec_prefix(1), "iperf3", "-c", self.lab.public_ip, "-p",
               str(IPERF_PORT), "-t", str(seconds), "-J", "--get-server-output",
               *args]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 30)
        try:
            data: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"iperf3 gave no JSON: {res.stderr.strip()[:300]}") from exc
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return data

    @staticmethod
    def receiver_intervals(data: Mapping[str, Any]) -> list[dict[str, float]]:
        """The server's (receiver's) per-interval sums, first and last interval
        left out: the first includes filling the emulator's queue, the last the
        sender stopping. What stays is the steady state."""
        server = data.get("server_output_json") or {}
        sums = [i["sum"] for i in server.get("intervals", []) if "sum" in i]
        return sums[1:-1] if len(sums) > 2 else sums

    def throughput(self, name: str, proto: str, rate_kbit: float, seconds: float) -> ProbeRow:
        self._set(rate_kbit=rate_kbit)
        self.progress(f"   iperf3 {proto}: {name} ({seconds:g} s)")
        offered = 2 * rate_kbit
        args = ["-u", "-b", f"{offered:g}K", "-l", "1200"] if proto == "udp" else []
        steady = self.receiver_intervals(self._iperf(args, seconds))
        if not steady:
            raise RuntimeError("iperf3 returned no receiver intervals")
        # Received bits per interval (for UDP the server counts what arrived).
        delivered = statistics.median(i["bits_per_second"] for i in steady) / 1000
        measured = {"delivered_kbit": delivered, "ratio": delivered / rate_kbit}
        if proto == "udp":
            measured["offered_kbit"] = offered
        return ProbeRow(
            name=name,
            probe=f"iperf3-{proto}",
            impairment={"rate_kbit": rate_kbit},
            configured={"rate_kbit": rate_kbit},
            measured=measured,
            samples=int(seconds),
            notes=["median of the receiver's 1 s intervals, first and last left out"]
            + (["UDP offered at twice the rate"] if proto == "udp" else
               ["TCP goodput (payload): below the IP-level rate by the headers"]),  # fmt: skip
        )

    def capacity(self, seconds: float) -> ProbeRow:
        """Small datagrams as fast as iperf3 sends them through a perfect link."""
        self._set()
        self.progress(f"   iperf3 udp: emulator capacity ({seconds:g} s, 64-byte payloads)")
        pid = self.lab.wan_pid
        before_stats = self.lab.wan_stats().driver
        before_cpu = proccpu.sample(pid) if pid else None
        data = self._iperf(["-u", "-b", "0", "-l", "64"], seconds)
        after_cpu = proccpu.sample(pid) if pid else None
        after_stats = self.lab.wan_stats().driver
        s = data["end"]["sum"]
        secs = float(s["seconds"]) or seconds
        steady = self.receiver_intervals(data)
        received_pps = statistics.median(
            (i["packets"] - i["lost_packets"]) / (i["seconds"] or 1.0) for i in steady
        ) if steady else math.nan  # fmt: skip
        forwarded = after_stats.written - before_stats.written
        cpu = proccpu.cpu_between(before_cpu, after_cpu).seconds
        return ProbeRow(
            name="capacity: 64-byte UDP, perfect link",
            probe="capacity",
            impairment={},
            configured={},
            measured={
                "sent_pps": int(s["packets"]) / secs,
                "delivered_pps": received_pps,
                "lost_percent": float(s["lost_percent"]),
                "emulator_written": forwarded,
                "emulator_cpu_s": cpu,
                "emulator_us_per_packet": cpu / forwarded * 1e6 if forwarded else math.nan,
            },
            samples=int(s["packets"]),
            notes=["iperf3 sends as fast as it can; what the emulator did not read "
                   "in time is dropped at the TUN queue"],  # fmt: skip
        )


def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Build a one-site lab, run every probe row, tear the lab down. ``quick``
    shortens every probe (a smoke test, not a measurement)."""
    from cluster.natlab import NatLab

    pings, interval, secs = (60, 0.02, 2.0) if quick else (1000, 0.01, 8.0)
    started = time.time()
    rows: list[ProbeRow] = []
    with NatLab(["cone"]) as lab, LabProbe(lab, progress) as probe:
        realtime = bool(lab.wan_realtime)
        prefix = lab.prefix
        rows.append(probe.ping("perfect link", pings, interval))
        rows.append(probe.ping("20 ms each way", pings, interval, delay_ms=20))
        rows.append(probe.ping("30 ± 10 ms each way", pings, interval, delay_ms=30, jitter_ms=10))
        rows.append(probe.ping("75 ± 25 ms each way", pings, interval, delay_ms=75, jitter_ms=25))
        rows.append(probe.ping("3 % loss (s1>pub)", pings * 2, interval, loss=0.03))
        rows.append(probe.ping("10 % loss (s1>pub)", pings, interval, loss=0.10))
        rows.append(probe.throughput("rate 2 Mbit/s", "udp", 2000, secs))
        rows.append(probe.throughput("rate 2 Mbit/s", "tcp", 2000, secs))
        rows.append(probe.throughput("rate 20 Mbit/s", "udp", 20000, secs))
        rows.append(probe.capacity(secs))
    return {
        "command": "raftstate lab probe" + (" --quick" if quick else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        "emulator_realtime": realtime,
        "lab_prefix": prefix,
        "rows": [asdict(r) for r in rows],
    }


def _fmt(value: float, unit: str = "") -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if unit == "%":
        return f"{value * 100:.2f} %"
    return f"{value:,.2f}{unit}"


def table(result: Mapping[str, Any]) -> list[str]:
    """The Markdown table of a :func:`run` result."""
    lines = [
        "| row | probe | configured | measured | error / ratio |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c, m = r["configured"], r["measured"]
        if r["probe"] == "ping":
            if c["loss"]:
                conf = f"loss {_fmt(c['loss'], '%')}"
                meas = f"loss {_fmt(m['loss'], '%')} of {r['samples']}"
                err = f"{(m['loss'] - c['loss']) * 100:+.2f} points"
            else:
                conf = f"RTT p50 {_fmt(c['rtt_p50_ms'])} / p99 {_fmt(c['rtt_p99_ms'])} ms"
                meas = f"RTT p50 {_fmt(m['rtt_p50_ms'])} / p99 {_fmt(m['rtt_p99_ms'])} ms"
                err = f"{m['error_p50_ms']:+.2f} / {m['error_p99_ms']:+.2f} ms"
        elif r["probe"] == "capacity":
            conf = "no impairment"
            meas = (
                f"{m['delivered_pps']:,.0f} pkt/s delivered of {m['sent_pps']:,.0f} sent "
                f"({m['lost_percent']:.1f} % lost)"
            )
            err = f"{_fmt(m['emulator_us_per_packet'])} µs CPU per packet"
        else:
            conf = f"{c['rate_kbit']:,.0f} kbit/s"
            meas = f"{m['delivered_kbit']:,.0f} kbit/s"
            err = f"{m['ratio']:.3f}×"
        lines.append(f"| {r['name']} | {r['probe']} | {conf} | {meas} | {err} |")
    return lines


def write_outputs(result: Mapping[str, Any], stem: Path) -> list[str]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = table(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    header = [
        f"`{result['command']}`, {result['started']}, {result['elapsed_s']} s, "
        f"emulator real-time scheduling: {'yes' if result['emulator_realtime'] else 'no'}, "
        f"load average at end {result['machine']['loadavg_at_end'][0]:.2f}",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(header + md) + "\n")
    return [*md, "", f"saved {stem.with_suffix('.json')} (+ .md)"]


__all__ = ["LabProbe", "ProbeRow", "parse_ping", "rtt_quantiles", "run", "table", "write_outputs"]

