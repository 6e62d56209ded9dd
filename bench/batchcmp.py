"""Heartbeats/s through HeartbeatBatch vs HeartbeatStream vs unary Heartbeat.

``python -m bench.batchcmp`` starts a local three-node cluster
(test timers, plaintext loopback) and runs closed-loop load of each shape in
turn, rotating the order every round so drift on a noisy box hits all three
alike:

* ``unary``: ``--unary-concurrency`` devices, each sending its next
  heartbeat as soon as the last is acknowledged (``client.heartbeat``).
* ``stream``: one gateway, one ``HeartbeatStream``, ``--stream-in-flight``
  sends in progress at once (``client.stream().send``).
* ``batch``: ``--batch-calls`` gateways, each sending ``heartbeat_batch`` of
  ``--batch-size`` devices as soon as the last one is answered.

Counted: heartbeats acknowledged OK during ``--seconds`` after a 1 s warm-up,
and the CPU seconds the three node processes used meanwhile (CPU per
heartbeat). Prints a table of medians over rounds and ratios, and writes
every sample to ``--out`` (JSON). The load runs in this process, on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench import proccpu
from cluster.local import LocalCluster
from raftstate.config import NodeConfig
from raftstate.sdk import AsyncDeviceClient

PAYLOAD = {"temp_c": "21.5", "fw": "1.4.2", "rssi": "-67", "battery_pct": "87"}
MODES = ("unary", "stream", "batch")
WARMUP_S = 1.0


Worker = Callable[[Callable[[int], None], Callable[[], bool]], Awaitable[None]]


async def _window(seconds: float, workers: list[Worker]) -> int:
    """Run ``workers`` until warm-up + ``seconds``; return acks counted in the window."""
    loop = asyncio.get_running_loop()
    start = loop.time() + WARMUP_S
    end = start + seconds
    counted = 0

    def note(n: int) -> None:
        nonlocal counted
        if start <= loop.time() < end:
            counted += n

    def running() -> bool:
        return loop.time() < end

    await asyncio.gather(*(w(note, running) for w in workers))
    return counted


async def _unary(client: AsyncDeviceClient, args: argparse.Namespace, tag: str) -> int:
    def worker(i: int) -> Callable[..., Awaitable[None]]:
        async def run(note: Callable[[int], None], running: Callable[[], bool]) -> None:
            device = f"{tag}-u{i}"
            while running():
                await client.heartbeat(device, PAYLOAD)
                note(1)

        return run

    return await _window(args.seconds, [worker(i) for i in range(args.unary_concurrency)])


async def _stream(client: AsyncDeviceClient, args: argparse.Namespace, tag: str) -> int:
    async with client.stream(max_in_flight=args.stream_in_flight) as stream:

        def worker(i: int) -> Callable[..., Awaitable[None]]:
            async def run(note: Callable[[int], None], running: Callable[[], bool]) -> None:
                device = f"{tag}-s{i}"
                while running():
                    await stream.send(device, PAYLOAD)
                    note(1)

            return run

        return await _window(args.seconds, [worker(i) for i in range(args.stream_in_flight)])


async def _batch(client: AsyncDeviceClient, args: argparse.Namespace, tag: str) -> int:
    def worker(g: int) -> Callable[..., Awaitable[None]]:
        async def run(note: Callable[[int], None], running: Callable[[], bool]) -> None:
            items = [(f"{tag}-b{g}-{i}", PAYLOAD) for i in range(args.batch_size)]
            while running():
                results = await client.heartbeat_batch(items)
                note(sum(1 for r in results if r.ok))

        return run

    return await _window(args.seconds, [worker(g) for g in range(args.batch_calls)])


LOADS = {"unary": _unary, "stream": _stream, "batch": _batch}


async def _measure(cluster: LocalCluster, args: argparse.Namespace) -> list[dict[str, object]]:
    samples: list[dict[str, object]] = []
    pids = [p.pid for p in cluster.nodes.values() if p.pid is not None]
    async with AsyncDeviceClient(cluster.endpoints, deadline_s=30.0) as client:
        await client.heartbeat("warm", {})
        for r in range(args.rounds):
            order = MODES[r % 3 :] + MODES[: r % 3]
            for mode in order:
                if mode not in args.modes:
                    continue
                before = [proccpu.sample(p) for p in pids]
                t0 = time.monotonic()
                acked = await LOADS[mode](client, args, f"r{r}{mode[0]}")
                elapsed = time.monotonic() - t0
                after = [proccpu.sample(p) for p in pids]
                cpu = sum(
                    proccpu.cpu_between(b, a).seconds for b, a in zip(before, after, strict=True)
                )
                # CPU covers the warm-up and tail too: per heartbeat over the whole run,
                # scaled by the share of the run inside the window.
                rate = acked / args.seconds
                share = args.seconds / elapsed
                sample = {
                    "round": r,
                    "mode": mode,
                    "heartbeats_per_s": rate,
                    "node_cpu_us_per_hb": (cpu * share / acked * 1e6) if acked else None,
                }
                samples.append(sample)
                print(f"round {r} {mode:6s} {rate:8.0f} hb/s", flush=True)
    return samples


def _table(samples: list[dict[str, object]]) -> str:
    lines = [
        "| mode | heartbeats/s (median) | node CPU µs/hb (median) | × unary | × stream |",
        "|---|---|---|---|---|",
    ]
    med: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for mode in MODES:
        mine = [s for s in samples if s["mode"] == mode]
        rates = [float(s["heartbeats_per_s"]) for s in mine]  # type: ignore[arg-type]
        cpus = [float(s["node_cpu_us_per_hb"]) for s in mine if s["node_cpu_us_per_hb"]]  # type: ignore[arg-type]
        if rates:
            med[mode] = statistics.median(rates)
            cpu[mode] = statistics.median(cpus) if cpus else float("nan")
    for mode, rate in med.items():
        vs_u = rate / med["unary"] if med.get("unary") else float("nan")
        vs_s = rate / med["stream"] if med.get("stream") else float("nan")
        lines.append(f"| {mode} | {rate:,.0f} | {cpu[mode]:,.0f} | {vs_u:.2f} | {vs_s:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batchcmp", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--unary-concurrency", type=int, default=64)
    p.add_argument("--stream-in-flight", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batch-calls", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="batchcmp.json")
    args = p.parse_args(argv)
    args.modes = tuple(m for m in args.modes.split(",") if m)
    with tempfile.TemporaryDirectory(prefix="batchcmp-") as tmp:
        cluster = LocalCluster(Path(tmp), 3, base_config=NodeConfig.for_tests())
        cluster.start(timeout_s=60)
        try:
            samples = uvloop.run(_measure(cluster, args))
        finally:
            cluster.stop()
    table = _table(samples)
    print(table)
    Path(args.out).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=2))
    print(f"samples written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
