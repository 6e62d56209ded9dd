"""An open-loop device fleet for ``raftstate chaos bench``, recorded for the verifier.

Three streams of calls leave on a fixed schedule, whatever the answers do (an
open loop: a slow cluster gets a backlog, not a gentler load):

* **devices**: heartbeat *i* at ``i / rate`` seconds, from device
  ``i mod devices``. Device *k* talks to device endpoint ``k mod n`` first
  (``prefer_leader=False``): through the profile's device link, to
  followers as well as to the leader.
* **probes**: ``probe_rate`` heartbeats/s from ``probe_devices`` devices
  that talk to the *leader's* gRPC port directly (the node endpoints, no
  proxy), re-learning the leader twice a second. They measure the commit
  latency at the leader with no device link and no follower forwarding.
* **reads**: ``read_rate`` LINEARIZABLE gets/s, spread like the devices.

Every call's deadline covers its retries. Every call is recorded in a
:class:`~chaos.history.History`; acked ``(device_id, seq)`` pairs are kept
for the durability check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from chaos.history import DeviceValue, History, ReadResult, WriteResult
from raftstate.errors import NotFound, RaftStateError
from raftstate.model import Consistency
from raftstate.sdk.client import AsyncDeviceClient

__all__ = ["Cohort", "FleetPlan", "LoadOutcome", "drive_fleet"]

_LEADER_REFRESH_S = 0.5
_READ_DEADLINE_S = 2.0
_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class FleetPlan:
    heartbeats: int = 100_000
    devices: int = 64
    rate: float = 200.0
    read_rate: float = 10.0
    probe_rate: float = 20.0
    probe_devices: int = 8
    deadline_s: float = 5.0


@dataclass
class Cohort:
    """What one stream of heartbeats saw (mutable while the load runs)."""

    attempted: int = 0
    acked_in_deadline: int = 0
    failures: int = 0
    ms: list[float] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.acked_in_deadline / self.attempted if self.attempted else float("nan")


@dataclass
class LoadOutcome:
    devices: Cohort = field(default_factory=Cohort)
    probes: Cohort = field(default_factory=Cohort)
    reads: int = 0
    read_ms: list[float] = field(default_factory=list)
    #: Every acknowledged (device_id, seq), both cohorts.
    acked: list[tuple[str, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    #: Acks answered "duplicate" with a newer seq stored: recorded as unknown.
    ambiguous: int = 0


async def drive_fleet(
    device_endpoints: list[str],
    node_endpoints: list[str],
    plan: FleetPlan,
    history: History,
    progress: Callable[[str], None] = lambda _line: None,
) -> LoadOutcome:
    """Run the plan until ``plan.heartbeats`` device heartbeats were sent and
    every call has ended; return what was seen. Never raises for a failed
    call (it is counted and recorded as an unknown outcome)."""
    out = LoadOutcome()
    clients = [
        AsyncDeviceClient(
            device_endpoints[k:] + device_endpoints[:k],
            deadline_s=plan.deadline_s,
            prefer_leader=False,
        )
        for k in range(len(device_endpoints))
    ]
    probe_client = AsyncDeviceClient(node_endpoints, deadline_s=plan.deadline_s)
    ids = [f"bench-{d:04d}" for d in range(plan.devices)]
    probe_ids = [f"probe-{d:02d}" for d in range(plan.probe_devices)]
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    def note_error(err: RaftStateError) -> None:
        out.errors[type(err).__name__] = out.errors.get(type(err).__name__, 0) + 1

    async def heartbeat(
        cohort: Cohort, client: AsyncDeviceClient, device_id: str, op_name: str
    ) -> None:
        seq = client.next_seq(device_id)
        reported = {"op": op_name}
        op = history.invoke_write(op_name, device_id, seq, reported)
        start = time.perf_counter()
        try:
            ack = await client.heartbeat(device_id, reported, seq=seq)
        except RaftStateError as err:
            history.fail(op)
            cohort.failures += 1
            note_error(err)
            return
        ms = (time.perf_counter() - start) * 1000
        if ack.duplicate and ack.stored_seq != seq:
            # Acked, but another of this device's heartbeats (open loop: they
            # overlap) is stored: this one may have been applied by an earlier
            # attempt before it, or never. Unknown outcome, not "changed nothing".
            history.fail(op)
            out.ambiguous += 1
        else:
            history.ok(op, WriteResult(False, ack.stored_seq, ack.revision))
        cohort.ms.append(ms)
        out.acked.append((device_id, seq))
        if ms <= plan.deadline_s * 1000:
            cohort.acked_in_deadline += 1

    async def read(j: int) -> None:
        client, device_id = clients[j % len(clients)], ids[(j * 7) % plan.devices]
        op = history.invoke_read(f"rd{j}", device_id)
        start = time.perf_counter()
        try:
            dev = await client.get(device_id, Consistency.LINEARIZABLE, deadline_s=_READ_DEADLINE_S)
        except NotFound:
            history.ok(op, ReadResult.not_found())
        except RaftStateError as err:
            history.fail(op)
            note_error(err)
            return
        else:
            history.ok(op, ReadResult(DeviceValue.of(dev.seq, dict(dev.reported))))
        out.read_ms.append((time.perf_counter() - start) * 1000)

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def follow_leader() -> None:
        while True:
            with contextlib.suppress(RaftStateError):
                await probe_client.find_leader(timeout_s=_LEADER_REFRESH_S)
            await asyncio.sleep(_LEADER_REFRESH_S)

    follower = asyncio.ensure_future(follow_leader()) if plan.probe_rate > 0 else None
    dev, probes = out.devices, out.probes
    t0 = loop.time()
    next_report = _PROGRESS_EVERY_S
    tick = min(1 / plan.rate, 0.01)
    try:
        while dev.attempted < plan.heartbeats:
            now = loop.time() - t0
            while dev.attempted < plan.heartbeats and dev.attempted / plan.rate <= now:
                i = dev.attempted
                d = i % plan.devices
                spawn(heartbeat(dev, clients[d % len(clients)], ids[d], f"hb{i}"))
                dev.attempted += 1
            while plan.probe_rate > 0 and probes.attempted / plan.probe_rate <= now:
                j = probes.attempted
                spawn(heartbeat(probes, probe_client, probe_ids[j % len(probe_ids)], f"pr{j}"))
                probes.attempted += 1
            while plan.read_rate > 0 and out.reads / plan.read_rate <= now:
                spawn(read(out.reads))
                out.reads += 1
            if now >= next_report:
                next_report += _PROGRESS_EVERY_S
                progress(
                    f"{dev.attempted}/{plan.heartbeats} sent, {len(dev.ms)} acked, "
                    f"{dev.failures} failed, {len(tasks)} calls in flight, "
                    f"commit probes {len(probes.ms)}/{probes.attempted} acked"
                )
            await asyncio.sleep(tick)
        if tasks:
            await asyncio.wait(set(tasks))
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        for c in [*clients, probe_client]:
            await c.close()
    return out
