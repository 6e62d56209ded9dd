"""Apply cost per heartbeat, two source trees side by side (A/B, alternating).

``python3 -m bench.applyab --a /path/to/main --b . --devices 200000 --rounds 3``
runs, per round, one child process per tree (its ``PYTHONPATH``), each
applying to a fresh :class:`~raftstate.statemachine.DeviceTable`: inserts of
new devices, then updates whose reported map changes, then updates whose map
does not. Times are CPU seconds of the child (``time.process_time``), so a
busy machine slows them less than wall time would; RSS per device is taken
after the inserts (it includes whatever the tree keeps per change, e.g. the
event window). Prints medians and B/A ratios, and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import gc, json, sys, time
from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch

def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

n = int(sys.argv[1])
ids = [f"dev-{i:07d}" for i in range(n)]
def entries(seq, temp, at):
    rep = {"temp": temp, "fw": "1.2.3"}
    return [encode_batch([Heartbeat(d, seq, rep) for d in ids[i:i + 1000]], at + i)
            for i in range(0, n, 1000)]
def timed(table, es):
    gc.collect()
    t0 = time.process_time()
    for e in es:
        table.apply(e)
    return (time.process_time() - t0) / n * 1e6
inserts = entries(1, "21.5", 1_700_000_000_000)
gc.collect()
table = DeviceTable()
base = rss()
out = {"insert_us": timed(table, inserts)}
del inserts
gc.collect()
out["rss_bytes_per_device"] = (rss() - base) / n
out["update_changed_us"] = timed(table, entries(2, "22.0", 1_700_000_100_000))
out["update_same_us"] = timed(table, entries(3, "22.0", 1_700_000_200_000))
print(json.dumps(out))
"""

KEYS = ("insert_us", "update_changed_us", "update_same_us", "rss_bytes_per_device")


def child(tree: str, devices: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(devices)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--a", required=True, help="source tree A (e.g. a checkout of main)")
    p.add_argument("--b", default=".", help="source tree B (default: this one)")
    p.add_argument("--devices", type=int, default=200_000, help="devices (default 200,000)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = p.parse_args()
    if args.devices < 1000 or args.rounds < 1:
        p.error("--devices: at least 1000; --rounds: at least 1")
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        runs["a"].append(child(args.a, args.devices))
        runs["b"].append(child(args.b, args.devices))
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in KEYS} for side, rs in runs.items()
    }
    print(f"{'per heartbeat (CPU µs) / RSS':<28} {'A':>10} {'B':>10} {'B/A':>7}")
    for k in KEYS:
        a, b = med["a"][k], med["b"][k]
        print(f"{k:<28} {a:>10.2f} {b:>10.2f} {b / a:>7.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"applyab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps({"a": args.a, "b": args.b, "devices": args.devices, "runs": runs, "median": med})
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
