"""``raftstate bench --security secure,insecure``: what security costs.

Two local clusters run side by side: one with the default configuration
(TLS on gRPC, bearer-token authentication and authorization on every call)
and one started ``--insecure`` (plaintext, no auth). Each round runs the
chosen phases (default ``sequential,write,stream``: unary latency, unary
throughput, stream throughput) on both, alternating which goes first, so
drift on a shared machine hits both alike; the report gives the median of
the rounds per phase and the cost of security against the targets
(<= 15 % throughput, <= 1 ms p50).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.phases import client_env, command_line, local_raftstate, run_phase
from bench.stats import PhaseResult
from raftstate.cli.words import plural

DEFAULT_SECURITY_PHASES = ("sequential", "write", "stream")
MAX_THROUGHPUT_COST = 0.15
MAX_P50_COST_MS = 1.0


def _median(rows: list[PhaseResult], key: str) -> float:
    if key == "ops":
        return float(statistics.median(r.ops_per_s for r in rows))
    return float(statistics.median(float(getattr(r.latency_ms, key)) for r in rows))


def security_main(args: argparse.Namespace) -> int:
    """Run the side-by-side comparison; print a table and save JSON."""
    phases = tuple(args.phases or DEFAULT_SECURITY_PHASES)
    modes = tuple(args.security)
    rounds = max(1, args.rounds)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: dict[tuple[str, str], list[PhaseResult]] = {(m, p): [] for m in modes for p in phases}
    print(
        f"== security: {','.join(modes)}, phases {','.join(phases)}, {plural(rounds, 'round')}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="raftstate-bench-") as tmp,
        contextlib.ExitStack() as st,
    ):
        clusters = {m: st.enter_context(local_raftstate(args, Path(tmp), m)) for m in modes}
        for r in range(rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                endpoints, pids, env = clusters[mode]
                with client_env(env):
                    for phase in phases:
                        res = run_phase("raftstate", phase, endpoints, pids, args)
                        rows[(mode, phase)].append(res)
                        print(
                            f"   round {r + 1} {mode:<8} {phase:<12} {res.ops_per_s:8.0f} ops/s "
                            f"p50 {res.latency_ms.p50:6.2f} ms  errors {res.errors}",
                            flush=True,
                        )
    lines = [
        f"{'phase':<12} {'security':<9} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        "   (medians of rounds)"
    ]
    summary: dict[str, Any] = {}
    ok = True
    for phase in phases:
        for mode in modes:
            rs = rows[(mode, phase)]
            lines.append(
                f"{phase:<12} {mode:<9} {_median(rs, 'ops'):8.0f} {_median(rs, 'p50'):8.2f} "
                f"{_median(rs, 'p99'):8.2f} {sum(x.errors for x in rs):>6}"
            )
        if set(modes) == {"secure", "insecure"}:
            sec, ins = rows[("secure", phase)], rows[("insecure", phase)]
            cost = 1 - _median(sec, "ops") / max(_median(ins, "ops"), 1e-9)
            dp50 = _median(sec, "p50") - _median(ins, "p50")
            verdict = cost <= MAX_THROUGHPUT_COST and dp50 <= MAX_P50_COST_MS
            ok = ok and verdict
            summary[phase] = {"throughput_cost": round(cost, 4), "p50_cost_ms": round(dp50, 3)}
            lines.append(
                f"{'':<12} cost of security: {cost:+.1%} throughput, {dp50:+.2f} ms p50 "
                f"(target <= {MAX_THROUGHPUT_COST:.0%}, <= {MAX_P50_COST_MS:g} ms): "
                + ("met" if verdict else "MISSED")
            )
    print("\n" + "\n".join(lines))
    record = {
        "command": command_line(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "rounds": rounds,
        "results": {f"{m}/{p}": [asdict(x) for x in rs] for (m, p), rs in rows.items()},
        "cost": summary,
    }
    path = out_dir / f"bench-security-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    path.write_text(json.dumps(record, indent=2))
    errors = sum(x.errors for rs in rows.values() for x in rs)
    met = "targets met" if ok else "targets missed"
    print(f"saved {path.resolve()}\n{met}; {plural(errors, 'error')}")
    return 0 if errors == 0 else 1


__all__ = ["security_main"]
