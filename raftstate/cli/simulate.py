"""``raftstate simulate``: a device fleet with live progress.

Each simulated device sends a heartbeat every ``--interval`` seconds (with a
random phase so the fleet does not pulse in step) through the async SDK.
With ``--gateways G --devices-per-gateway D`` the fleet is G gateways of D
devices each instead: every ``--interval`` a gateway sends the heartbeats of
all its devices with ``heartbeat_batch`` (HeartbeatBatch calls of at most
1,000), as a gateway or broker would. A progress line every second shows
heartbeats/s, p50/p99 of the last second (a batched heartbeat's latency is
its call's) and errors; the run ends with a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time

import uvloop

from raftstate.cli.words import plural
from raftstate.errors import RaftStateError
from raftstate.latency import LatencySummary
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


async def _gateway(
    client: AsyncDeviceClient,
    device_ids: list[str],
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
        items = [(d, {"n": str(n), "temp_c": f"{rng.uniform(15, 30):.1f}"}) for d in device_ids]
        results = await client.heartbeat_batch(items)
        ms = (time.perf_counter() - started) * 1000
        for r in results:
            if r.error is None:
                window.append(ms)
            else:
                errors.append(f"{type(r.error).__name__}: {r.error.message}")
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
    gateways = getattr(args, "gateways", 0) or 0
    per_gateway = getattr(args, "devices_per_gateway", 0) or 0
    devices = gateways * per_gateway if gateways else args.devices
    async with AsyncDeviceClient(
        endpoints, deadline_s=args.deadline, credentials=args.credentials
    ) as client:
        if gateways:
            tasks = [
                asyncio.create_task(
                    _gateway(
                        client,
                        [f"{args.prefix}g{g:04d}-{i:06d}" for i in range(per_gateway)],
                        args.interval,
                        window,
                        errors,
                        stop,
                        rng,
                    )
                )
                for g in range(gateways)
            ]
        else:
            tasks = [
                asyncio.create_task(
                    _device(
                        client, f"{args.prefix}{i:06d}", args.interval, window, errors, stop, rng
                    )
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
    fleet = plural(devices, "device")
    if gateways:
        fleet += f" behind {plural(gateways, 'gateway')}"
    print(
        f"summary: {fleet}, {plural(s.count, 'heartbeat')} acknowledged "
        f"in {elapsed:.0f}s "
        f"({s.count / elapsed:.0f}/s), p50 {s.p50:.1f} ms, p99 {s.p99:.1f} ms, "
        f"{plural(len(errors), 'error')}"
    )
    return 0 if not errors else 1


def simulate(endpoints: str, args: argparse.Namespace) -> int:
    return uvloop.run(_run(endpoints, args))
