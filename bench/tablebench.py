"""The device table at fleet size, in process: inserts, memory, snapshots.

``python3 -m bench.tablebench --devices 1000000 --out bench-results`` applies
format-2 batch entries of 1,000 new devices (two small reported fields each)
to a :class:`~raftstate.statemachine.DeviceTable`, then 100,000 updates, and
measures: inserts/s per fifth of the run (the index must not slow down as it
grows), RSS per device (including the event window, which holds the last
``watch_history_events`` inserts), the window's events and bytes per event,
``capture()`` time, the snapshot write (with the longest gap a 1 ms ticker
thread saw meanwhile: how long the writer kept the GIL), ``verify`` and
``load``. Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import threading
import time
from pathlib import Path

from raftstate import snapshotfile
from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch

BATCH = 1000


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(devices: int, seed: int = 1) -> dict[str, float | list[float]]:
    """Measure one table of ``devices`` devices; returns the numbers."""
    ids = [f"dev-{i:07d}" for i in range(devices)]
    random.Random(seed).shuffle(ids)
    entries = [
        encode_batch(
            [Heartbeat(d, 1, {"temp": "21.5", "fw": "1.2.3"}) for d in ids[i : i + BATCH]],
            1_700_000_000_000 + i,
        )
        for i in range(0, devices, BATCH)
    ]
    del ids
    gc.collect()
    table = DeviceTable()
    base = _rss_bytes()
    fifth = max(1, len(entries) // 5)
    rates: list[float] = []
    started = last = time.perf_counter()
    for k, entry in enumerate(entries, 1):
        table.apply(entry)
        if k % fifth == 0:
            now = time.perf_counter()
            rates.append(fifth * BATCH / (now - last))
            last = now
    insert_s = time.perf_counter() - started
    del entries
    gc.collect()
    rss_per_device = (_rss_bytes() - base) / devices
    updates = [
        encode_batch(
            [
                Heartbeat(f"dev-{i:07d}", 2, {"temp": "22.0", "fw": "1.2.3"})
                for i in range(j, j + BATCH)
            ],
            1_700_000_100_000,
        )
        for j in range(0, min(devices, 100_000), BATCH)
    ]
    t0 = time.perf_counter()
    for entry in updates:
        table.apply(entry)
    update_rate = len(updates) * BATCH / (time.perf_counter() - t0)
    window = table.window.stats()  # the event window's share of the RSS above
    gc.collect()
    gc.freeze()  # as a serving node does (raftstate/node.py quiet_gc)
    t0 = time.perf_counter()
    capture = table.capture()
    capture_s = time.perf_counter() - t0
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        previous = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - previous)
            previous = now

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "snapshot.bin")
        thread = threading.Thread(target=ticker)
        thread.start()
        t0 = time.perf_counter()
        raft = snapshotfile.RaftFields((b"", 1, 1), (b"", 0, 0), ())
        written = snapshotfile.write(path, capture, raft, fsync=False)
        write_s = time.perf_counter() - t0
        stop.set()
        thread.join()
        table.release(capture)
        t0 = time.perf_counter()
        snapshotfile.verify(path)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        snapshotfile.load(path)
        load_s = time.perf_counter() - t0
    return {
        "devices": devices,
        "inserts_per_s": devices / insert_s,
        "inserts_per_s_by_fifth": rates,
        "rss_bytes_per_device": rss_per_device,
        "updates_per_s": update_rate,
        "window_events": window.events,
        "window_bytes_per_event": window.bytes / max(1, window.events),
        "capture_ms": capture_s * 1000,
        "snapshot_write_s": write_s,
        "snapshot_bytes": written.bytes,
        "max_ticker_gap_during_write_ms": max(gaps, default=0.0) * 1000,
        "verify_s": verify_s,
        "load_s": load_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1_000_000, help="devices (default 1,000,000)")
    p.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = p.parse_args()
    if args.devices < BATCH:
        p.error(f"--devices: at least {BATCH}")
    result = run(args.devices)
    for key, value in result.items():
        shown = (
            ", ".join(f"{v:,.0f}" for v in value) if isinstance(value, list) else f"{value:,.1f}"
        )
        print(f"{key:<32} {shown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tablebench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
