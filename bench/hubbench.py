"""The watch hub in process: encoding cost per event and fan-out per watcher.

``python3 -m bench.hubbench --out bench-results`` applies real heartbeat
batches to a :class:`~raftstate.statemachine.DeviceTable` (so the events and
their records are the real ones), then measures, in CPU seconds of this
process (the box is shared; wall time would measure the neighbours):

* encoding one event, the hand-written wire form (``watchwire.encode_event``)
  against building and serializing the ``Event`` message
  (``watchwire.event_pb``), alternated in rounds, medians and their ratio;
* fan-out: events dispatched per second by ``WatchHub.advance`` and events
  handed to watchers per second (``take`` + response assembly), for 1, 100
  and 1,000 watchers of every device and for 1,000 watchers of 100 prefixes.

No gRPC: this is the hub's share of a delivery. Prints a table, saves JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from raftstate.eventwindow import Event, EventWindow
from raftstate.model import Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch
from raftstate.watchhub import WatchFilter, WatchHub
from raftstate.watchwire import encode_event, event_pb, response


def _table(events: int) -> DeviceTable:
    table = DeviceTable(30, EventWindow(max_events=events + 10, max_age_s=10**6))
    seq = 0
    while table.revision < events:
        seq += 1
        batch = [
            Heartbeat(f"d{i % 100:02d}-{i}", seq, {"temp_c": f"{20 + seq % 7}.5", "fw": "1.4.2"})
            for i in range(min(500, events - table.revision))
        ]
        table.apply(encode_batch(batch, proposed_at_ms=1_000 + seq))
    return table


def _encode(events: list[Event], rounds: int) -> dict[str, float]:
    fast: list[float] = []
    ref: list[float] = []
    for _ in range(rounds):
        for out, fn in (
            (fast, encode_event),
            (ref, lambda e, p: event_pb(e, p).SerializeToString()),
        ):
            t = time.process_time()
            for ev in events:
                fn(ev, True)
            out.append((time.process_time() - t) / len(events) * 1e6)
    f, r = statistics.median(fast), statistics.median(ref)
    return {"encode_us": f, "reference_us": r, "speedup": r / f}


def _fanout(window: EventWindow, watchers: int, prefixed: bool) -> dict[str, float]:
    hub = WatchHub(window, encode_event, max_pending=10**9)
    hub.position = window.oldest - 1
    ws = [
        hub.register(WatchFilter(prefix=f"d{i % 100:02d}-" if prefixed else ""))
        for i in range(watchers)
    ]
    n = window.latest - hub.position
    t0 = time.process_time()
    hub.advance_all()
    t1 = time.process_time()
    sent = 0
    for w in ws:
        while True:
            frames, through = hub.take(w, 1000, 1 << 20)
            if not frames:
                break
            response(frames, through)
            sent += len(frames)
    t2 = time.process_time()
    return {
        "watchers": watchers,
        "prefixed": prefixed,
        "events": n,
        "dispatch_events_per_s": n / (t1 - t0),
        "deliveries": sent,
        "deliveries_per_s": sent / (t2 - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    table = _table(args.events)
    window = table.window
    events = window.range(window.oldest, window.latest)
    enc = _encode(events, args.rounds)
    fan = [
        _fanout(window, 1, False),
        _fanout(window, 100, False),
        _fanout(window, 1000, False),
        _fanout(window, 1000, True),
    ]
    print(f"encode one event (with prev_device), CPU µs, median of {args.rounds} alternated rounds")
    print(
        f"  hand-written {enc['encode_us']:.1f}  message {enc['reference_us']:.1f}"
        f"  ratio {enc['speedup']:.2f}x"
    )
    print(f"{'watchers':>9} {'filter':>8} {'dispatch ev/s':>14} {'deliveries/s':>13}")
    for row in fan:
        print(
            f"{row['watchers']:>9} {'prefix' if row['prefixed'] else 'all':>8} "
            f"{row['dispatch_events_per_s']:>14,.0f} {row['deliveries_per_s']:>13,.0f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hubbench-{int(time.time())}.json"
    path.write_text(json.dumps({"encode": enc, "fanout": fan}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
