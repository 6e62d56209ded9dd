"""``raftstate simulate``: a device fleet with live progress.

Each simulated device sends a heartbeat every ``--interval`` seconds (with a
random phase so the fleet does not pulse in step) through the async SDK. A
progress line every second shows heartbeats/s, p50/p99 of the last second
and errors; the run ends with a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time

import uvloop

from raftstate.bench.stats import LatencySummary
from raftstate.cli.words import plural
from raftstate.errors import RaftStateError
from raftstate.sdk import AsyncDeviceClient


async def _device(
    client: AsyncDeviceClient,
    device_id: str,
    interval: float,
    window: list[float],
    errors: list[str],
    stop: asyncio.Event,
    rng: random.Random,
) -> None:
    await asyncio.sleep(rng.uniform(0, interval))
    n = 0
    while not stop.is_set():
        n += 1
        started = time.perf_counter()
        try:
            await client.heartbeat(device_id, {"n": str(n), "temp_c": f"{rng.uniform(15, 30):.1f}"})
            window.append((time.perf_counter() - started) * 1000)
        except RaftStateError as err:
            errors.append(f"{type(err).__name__}: {err.message}")
        next_at = started + interval
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.perf_counter()))
        except TimeoutError:
            pass


async def _run(endpoints: str, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random()
    window: list[float] = []
    all_ms: list[float] = []
    errors: list[str] = []
    async with AsyncDeviceClient(
        endpoints, deadline_s=args.deadline, credentials=args.credentials
    ) as client:
        tasks = [
            asyncio.create_task(
                _device(client, f"{args.prefix}{i:06d}", args.interval, window, errors, stop, rng)
            )
            for i in range(args.devices)
        ]
        started = time.monotonic()
        end = None if args.duration is None else started + args.duration
        shown_errors = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
            batch, window[:] = list(window), []
            all_ms.extend(batch)
            s = LatencySummary.of(batch)
            print(
                f"{time.monotonic() - started:6.0f}s  {len(batch):6d} hb/s  "
                f"p50 {s.p50:7.1f} ms  p99 {s.p99:7.1f} ms  errors {len(errors)}",
                flush=True,
            )
            for e in errors[shown_errors : shown_errors + 3]:
                print(f"        error: {e}", file=sys.stderr)
            shown_errors = len(errors)
            if end is not None and time.monotonic() >= end:
                stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    s = LatencySummary.of(all_ms)
    print(
        f"summary: {plural(args.devices, 'device')}, {plural(s.count, 'heartbeat')} acknowledged "
        f"in {elapsed:.0f}s "
        f"({s.count / elapsed:.0f}/s), p50 {s.p50:.1f} ms, p99 {s.p99:.1f} ms, "
        f"{plural(len(errors), 'error')}"
    )
    return 0 if not errors else 1


def simulate(endpoints: str, args: argparse.Namespace) -> int:
    return uvloop.run(_run(endpoints, args))
