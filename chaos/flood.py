"""The large-payload flood: pipelined streams of new devices, each with a
``reported`` map drawn from the whole allowed size range (up to the 8 KiB
limit), sent at once into the leader and into a follower.

This is the workload that once wedged replication and lost acknowledged
heartbeats (every other suite sent tiny payloads). It records every
acknowledged ``(device_id, seq)``; the caller checks them on every node with
:func:`chaos.verify.verify` or :func:`tests.helpers.assert_acked_present`.

Sizes: each heartbeat's map has 1..64 entries whose keys and values add up
to a total drawn so that a third of the heartbeats sit at the 8 KiB limit
exactly, a third near it, and a third anywhere in [0, 8 KiB]; values mix
ASCII and multi-byte UTF-8, so the byte limit (not the character count) is
what binds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from raftstate.errors import RaftStateError
from raftstate.model import REPORTED_MAX_BYTES, REPORTED_MAX_ENTRIES
from raftstate.sdk import AsyncDeviceClient

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_WIDE = "äöü€漢字🙂"  # 2, 2, 2, 3, 3, 3, 4 bytes in UTF-8


def reported_of_size(rng: random.Random, total: int, entries: int) -> dict[str, str]:
    """A map of ``entries`` (>= 1) non-empty keys whose keys and values are
    exactly ``total`` UTF-8 bytes (``total`` >= 2 * ``entries``)."""
    out: dict[str, str] = {}
    left = total
    for i in range(entries):
        key = f"k{i:02d}"
        budget = left // (entries - i) if i < entries - 1 else left
        vbytes = max(0, budget - len(key))
        out[key] = _text(rng, vbytes)
        left -= len(key) + vbytes
    if left > 0:  # rounding: top up the last value with ASCII
        last = f"k{entries - 1:02d}"
        out[last] += "x" * left
    return out


def _text(rng: random.Random, nbytes: int) -> str:
    """Exactly ``nbytes`` of UTF-8: up to eight multi-byte characters, then
    ASCII (drawn in one call: a flood draws hundreds of megabytes)."""
    wide: list[str] = []
    left = nbytes
    while left >= 4 and len(wide) < 8 and rng.random() < 0.6:
        ch = rng.choice(_WIDE)
        wide.append(ch)
        left -= len(ch.encode())
    return "".join(wide) + "".join(rng.choices(_ALPHABET, k=left))


def draw_reported(
    rng: random.Random,
    max_bytes: int = REPORTED_MAX_BYTES,
    max_entries: int = REPORTED_MAX_ENTRIES,
) -> dict[str, str]:
    """One heartbeat's map, sized as the module docstring says, within
    ``max_bytes`` of keys and values and ``max_entries`` entries (lower them
    to leave room for keys of the caller's own)."""
    kind = rng.randrange(3)
    if kind == 0:
        total = max_bytes
    elif kind == 1:
        total = max_bytes - rng.randrange(min(256, max_bytes + 1))
    else:
        total = rng.randrange(max_bytes + 1)
    entries = rng.randint(1, max(1, min(max_entries, total // 8)))
    if total < 2 * entries:
        return {} if total < 4 else {"k": "v" * (total - 1)}
    return reported_of_size(rng, total, entries)


@dataclass
class FloodResult:
    acked: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0
    bytes_acked: int = 0


async def _one_stream(
    endpoint: str,
    all_endpoints: Sequence[str],
    prefix: str,
    devices: int,
    seed: int,
    window: int,
    result: FloodResult,
) -> None:
    rng = random.Random(seed)
    client = AsyncDeviceClient(all_endpoints, prefer_leader=False, deadline_s=60.0)
    try:
        async with client.stream(endpoint=endpoint, max_in_flight=window) as stream:

            # Draw a payload only when it can be sent soon: drawing all of
            # them first made the last ones miss their deadline unsent.
            ready = asyncio.Semaphore(2 * window)

            async def send(i: int) -> None:
                async with ready:
                    await _send(i)

            async def _send(i: int) -> None:
                device_id = f"{prefix}{i:06d}"
                reported = draw_reported(rng)
                seq = client.next_seq(device_id)
                result.sent += 1
                try:
                    ack = await stream.send(device_id, reported, seq=seq, deadline_s=60.0)
                except RaftStateError as exc:
                    result.errors.append(f"{device_id}: {exc!r}")
                    return
                result.acked[device_id] = max(result.acked.get(device_id, 0), ack.seq)
                result.bytes_acked += sum(len(k.encode()) + len(v.encode())
                                          for k, v in reported.items())

            await asyncio.gather(*(send(i) for i in range(devices)))
    finally:
        await client.close()


async def flood(
    targets: Sequence[str],
    all_endpoints: Sequence[str],
    *,
    devices: int,
    streams_per_target: int = 4,
    window: int = 64,
    seed: int = 1,
) -> FloodResult:
    """Send ``devices`` new devices in total, split evenly over
    ``streams_per_target`` pipelined streams into each of ``targets`` (node
    endpoints; a follower forwards its writes to the leader). Returns every
    acknowledged ``(device_id, seq)`` and the errors seen."""
    result = FloodResult()
    n = len(targets) * streams_per_target
    per = max(1, devices // n)
    start = time.monotonic()
    tasks = []
    for t, endpoint in enumerate(targets):
        for s in range(streams_per_target):
            prefix = f"fl-{t}-{s}-"
            tasks.append(_one_stream(endpoint, all_endpoints, prefix, per, seed * 1000 + t * 10 + s,
                                     window, result))
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - start
    return result


__all__ = ["FloodResult", "draw_reported", "flood", "reported_of_size"]
