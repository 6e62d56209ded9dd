"""``raftstate lab rejoin``: a follower catches up over a thin link while devices keep sending.

Issue 15, item 5: "a follower rejoins after missing 50,000 heartbeats, on a
``weak`` link capped at 2 Mbit/s, while devices keep sending. Report its
catch-up time, and the heartbeat p99 during the catch-up."

Theory of operation (one run; needs root and the WAN lab):

1. A three-site lab (:class:`chaos.labbench._Raftstate`: raftstate over UDP/ICE,
   one node per site) comes up; every WAN direction gets the ``weak``
   profile's node-link impairment.
2. A follower is stopped. The devices of the two other ("live") sites send
   ``missed`` heartbeats at ``rate`` (the labbench load process, open loop),
   which the cluster commits without it: that is what it misses. Entries
   beyond ``compaction_min_entries`` are compacted into a snapshot, so what
   crosses the link is pysyncobj's AppendEntries batches (up to 2 MB each)
   and/or the snapshot in pieces.
3. Both directions between the leader's site and the follower's get the
   ``weak`` impairment plus ``rate_kbit`` (the WAN emulator's bottleneck,
   ``queue_limit_ms`` of buffer).
4. The live sites' devices start a second load; two seconds in, the follower
   restarts. The catch-up time runs from the restart until the follower has
   applied the leader's last log index at the restart. The heartbeats sent in
   that interval give the "during catch-up" latency (p50/p99/max, success).
5. Every acknowledged heartbeat of both phases is looked up on every node
   (``check_lost``: nothing acknowledged lost, the tables agree).

``--ab`` runs the same with the UDP congestion controller on and off
(``RAFTSTATE_UDP_CONGESTION_CONTROL``, read by every node at start),
alternating, a fresh lab per run. Not thread-safe.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import LatencySummary
from chaos.labbench import REPO_ROOT, _Raftstate

CC_ENV = "RAFTSTATE_UDP_CONGESTION_CONTROL"
_START_LEAD_S = 4.0


@dataclass
class RejoinConfig:
    missed: int = 50_000
    rate: float = 300.0
    profile: str = "weak"
    rate_kbit: float = 2000.0
    queue_limit_ms: float = 1000.0
    #: Length of the load during the catch-up phase (the catch-up must end
    #: within it to be timed).
    window_s: float = 60.0
    deadline_s: float = 5.0
    #: Congestion control per run, in order (``[True, False, ...]`` for A/B).
    variants: list[bool] = field(default_factory=lambda: [True])
    out_dir: Path = Path(".raftstate/rejoinbench")


@dataclass
class RejoinResult:
    congestion_control: bool
    missed: int
    rate: float
    rate_kbit: float
    leader: str
    follower: str
    #: Leader's last log index when the follower restarted (what it had to reach).
    target_index: int
    #: Follower's applied index before it was stopped.
    stopped_at_index: int
    catchup_s: float | None
    #: Heartbeats sent by live-site devices during the catch-up.
    during_sent: int
    during_ok_pct: float
    during_ms: LatencySummary
    #: Same, over the whole catch-up-phase load (before, during and after).
    phase_ms: LatencySummary
    acked_lost: int
    lost_checked: bool
    #: Leader -> follower direction during the catch-up phase: packets the
    #: WAN emulator took, and those its bottleneck queue tail-dropped.
    wan_packets_to_follower: int = 0
    wan_queue_drops: int = 0
    #: "snapshot restored" lines the follower logged after its restart: >= 1
    #: when the leader sent it a snapshot (the rest came as AppendEntries).
    snapshot_restores: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("during_ms", "phase_ms"):
            d[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                      for k, v in d[key].items()}  # fmt: skip
        return d


def _start_load(system: _Raftstate, sites: list[int], count: int, rate: float, tag: str,
                start_at: float, deadline_s: float, run_dir: Path, phase: str,
                ) -> list[tuple[subprocess.Popen[bytes], Path]]:  # fmt: skip
    """One labbench load process per live site (``count`` split over them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    out = []
    per = [count // len(sites) + (1 if k < count % len(sites) else 0) for k in range(len(sites))]
    for k, i in enumerate(sites):
        path = run_dir / f"{phase}-s{i}.jsonl"
        argv = [*system.lab.device_exec_prefix(i), sys.executable, "-m", "chaos.labbench", "load",
                "--system", "raftstate", "--endpoint", system.local_endpoint(i),
                "--tag", f"{tag}-s{i}", "--count", str(per[k]), "--rate", str(rate / len(sites)),
                "--deadline", str(deadline_s), "--start-at", str(start_at),
                "--out", str(path)]  # fmt: skip
        with open(run_dir / f"{phase}-s{i}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO_ROOT, stdin=subprocess.DEVNULL)  # fmt: skip
        out.append((proc, path))
    return out


def _finish_load(procs: list[tuple[subprocess.Popen[bytes], Path]], timeout_s: float,
                 start_at: float) -> list[dict[str, Any]]:  # fmt: skip
    """Wait for the load processes; their records, with ``at`` = wall time sent."""
    records: list[dict[str, Any]] = []
    for proc, path in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    r["at"] = start_at + float(r["t"])
                    records.append(r)
    return records


def _applied(system: _Raftstate, i: int) -> tuple[int, int]:
    """(leader's last log index, node ``i``'s last applied); -1 if unknown."""
    last, applied = system.commit_status()
    return last, applied[i - 1] if len(applied) >= i else -1


def run_one(cfg: RejoinConfig, cc: bool, run_dir: Path,
            progress: Callable[[str], None] = print) -> RejoinResult:  # fmt: skip
    """One rejoin run in a fresh lab; see the module doc."""
    from chaos.profiles import load_profile
    from cluster.wanlab import node_link_impairment

    run_dir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(CC_ENV)
    os.environ[CC_ENV] = "1" if cc else "0"
    prefix = "rj" + secrets.token_hex(2)
    system = _Raftstate("udp", run_dir, ["cone", "cone", "cone"], prefix, progress)
    notes: list[str] = []
    try:
        system.up()
        system.lab.impair_profile(cfg.profile)
        leader = None
        deadline = time.monotonic() + 60
        while leader is None and time.monotonic() < deadline:
            time.sleep(1.0)
            leader = system.leader()
        if leader is None:
            raise RuntimeError("no leader within 60 s of applying the profile")
        lsite = int(leader[1:])
        fsite = next(i for i in (1, 2, 3) if i != lsite)
        live = [i for i in (1, 2, 3) if i != fsite]
        cluster = system.lc.cluster
        assert cluster is not None
        follower = f"n{fsite}"
        _, stopped_at = _applied(system, fsite)
        cluster.stop_node(follower)
        restores0 = dict(cluster.logs()).get(follower, "").count("snapshot restored")
        tag = f"rj-{secrets.token_hex(2)}"
        progress(f"[cc={'on' if cc else 'off'}] leader {leader}, {follower} stopped at "
                 f"{stopped_at}; {cfg.missed} heartbeats at {cfg.rate:g}/s without it")  # fmt: skip
        start_at = time.time() + _START_LEAD_S
        procs = _start_load(system, live, cfg.missed, cfg.rate, tag, start_at, cfg.deadline_s,
                            run_dir, "miss")  # fmt: skip
        missed = _finish_load(procs, cfg.missed / cfg.rate + 120, start_at)
        imp = asdict(node_link_impairment(load_profile(cfg.profile)))
        imp.update(rate_kbit=cfg.rate_kbit, queue_limit_ms=cfg.queue_limit_ms)
        system.lab.impair(lsite, fsite, both=True, **imp)
        tx0 = _wan_direction(system, lsite, fsite)
        count = int(cfg.window_s * cfg.rate)
        start_at = time.time() + _START_LEAD_S
        procs = _start_load(system, live, count, cfg.rate, tag + "c", start_at, cfg.deadline_s,
                            run_dir, "catchup")  # fmt: skip
        time.sleep(max(0.0, start_at + 2.0 - time.time()))
        target, _ = _applied(system, lsite)
        t_restart = time.time()
        cluster.start_node(follower)
        catchup: float | None = None
        end = start_at + cfg.window_s
        while time.time() < end:
            _, applied = _applied(system, fsite)
            if target >= 0 and applied >= target:
                catchup = round(time.time() - t_restart, 2)
                break
            time.sleep(0.1)
        progress(f"[cc={'on' if cc else 'off'}] target index {target}: caught up in "
                 f"{catchup if catchup is not None else 'NOT'} s")  # fmt: skip
        during = _finish_load(procs, cfg.window_s + 120, start_at)
        tx1 = _wan_direction(system, lsite, fsite)
        flog = dict(cluster.logs()).get(follower, "")
        restores = flog.count("snapshot restored") - restores0
        t_end = t_restart + (catchup if catchup is not None else cfg.window_s)
        win = [r for r in during if t_restart <= r["at"] < t_end]
        ok = sorted(float(r["ms"]) for r in win if r["ok"])
        try:
            lost = system.check_lost(missed + during, f"{tag}")
            checked = True
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            lost, checked = 0, False
            notes.append(f"lost check failed: {type(err).__name__}: {err}")
        if system.disagree:
            notes.append(f"{system.disagree} nodes' tables differ from the first node's")
        return RejoinResult(
            congestion_control=cc, missed=cfg.missed, rate=cfg.rate, rate_kbit=cfg.rate_kbit,
            leader=leader, follower=follower, target_index=target, stopped_at_index=stopped_at,
            catchup_s=catchup, during_sent=len(win),
            during_ok_pct=100.0 * len(ok) / len(win) if win else math.nan,
            during_ms=LatencySummary.of(ok),
            phase_ms=LatencySummary.of(sorted(float(r["ms"]) for r in during if r["ok"])),
            acked_lost=lost, lost_checked=checked, wan_packets_to_follower=tx1[0] - tx0[0],
            wan_queue_drops=tx1[1] - tx0[1], snapshot_restores=restores, notes=notes,
        )  # fmt: skip
    finally:
        system.down()
        if saved is None:
            os.environ.pop(CC_ENV, None)
        else:
            os.environ[CC_ENV] = saved


def _wan_direction(system: _Raftstate, src: int, dst: int) -> tuple[int, int]:
    """(packets submitted, packets tail-dropped at the bottleneck) on the WAN
    emulator's ``src`` -> ``dst`` direction so far; (0, 0) if unknown."""
    try:
        d = system.lab.wan_stats().direction(f"s{src}", f"s{dst}")
    except OSError:
        return 0, 0
    return (d.stats.submitted, d.stats.queue_dropped) if d is not None else (0, 0)


def render_table(results: Sequence[RejoinResult]) -> str:
    head = ["cc", "missed", "link", "catch-up s", "hb sent", "ok %", "p50 ms", "p99 ms",
            "max ms", "WAN pkts", "q drops", "lost"]  # fmt: skip
    rows = [head]
    for r in results:
        d = r.during_ms
        rows.append([
            "on" if r.congestion_control else "off", str(r.missed),
            f"{r.rate_kbit / 1000:g} Mbit/s",
            "-" if r.catchup_s is None else f"{r.catchup_s:.1f}", str(r.during_sent),
            f"{r.during_ok_pct:.2f}", f"{d.p50:.0f}", f"{d.p99:.0f}", f"{d.max:.0f}",
            str(r.wan_packets_to_follower), str(r.wan_queue_drops), str(r.acked_lost),
        ])  # fmt: skip
    widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
    lines = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def run(cfg: RejoinConfig, progress: Callable[[str], None] = print) -> list[RejoinResult]:
    """Every variant of ``cfg``, in order, each in a fresh lab."""
    results = []
    for k, cc in enumerate(cfg.variants):
        results.append(run_one(cfg, cc, cfg.out_dir / f"run{k}-cc{'on' if cc else 'off'}",
                               progress))  # fmt: skip
    return results


def write_outputs(results: Sequence[RejoinResult], cfg: RejoinConfig, stem: Path,
                  command: str) -> str:  # fmt: skip
    """``stem``.json; returns the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "missed": cfg.missed, "rate_per_s": cfg.rate,
            "profile": cfg.profile, "rate_kbit": cfg.rate_kbit,
            "queue_limit_ms": cfg.queue_limit_ms, "window_s": cfg.window_s,
            "cpus": os.cpu_count(),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    doc = {"meta": meta, "results": [r.to_json() for r in results]}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    return render_table(results)
