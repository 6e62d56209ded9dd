"""Load-generator processes for ``raftstate bench``.

Each load process runs its own uvloop and clients and drives a closed loop:
every simulated device sends its next request as soon as the previous one is
answered. All processes start together at ``start_at`` (wall clock) and only
requests *started* inside the measurement window
``[start_at + warmup_s, start_at + warmup_s + duration_s)`` are counted, so
connection set-up and the tail of the run do not distort throughput. The
process's CPU time is sampled at both ends of the same window.

Two shapes of client:

* ``mode="unary"``: one client per process; every device's request is its
  own unary call (raftstate ``Heartbeat`` to the leader, etcd ``Put`` to the
  leader), all multiplexed on that client's channel.
* ``mode="stream"``: the "gateway" shape. The process is ``streams``
  gateways, each attached to one endpoint (gateways are spread over all
  endpoints, as a fleet's gateways attach to their nearest node), and the
  devices are dealt out to the gateways. raftstate: each gateway keeps one
  ``HeartbeatStream`` open and pipelines its devices' heartbeats on it. etcd
  has no streaming put, so an etcd gateway pipelines its devices' concurrent
  unary ``Put`` calls over one channel of its own.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import uvloop

from raftstate.model import Consistency

PAYLOAD = {"temp_c": "21.5", "fw": "1.4.2", "rssi": "-67", "battery_pct": "87"}


class Target(Protocol):
    async def write(self, device_id: str, seq: int) -> None: ...
    async def read(self, device_id: str, linearizable: bool) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadSpec:
    system: str  # "raftstate" | "etcd"
    endpoints: tuple[str, ...]
    op: str  # "write" | "read-linearizable" | "read-serializable"
    first_device: int
    devices: int
    start_at: float
    warmup_s: float
    duration_s: float
    max_ops: int = 0  # per process; 0 = unbounded (sequential runs set it)
    mode: str = "unary"  # "unary" | "stream" (gateways; see the module docstring)
    streams: int = 1  # gateways in this process (mode="stream")
    first_stream: int = 0  # global index of this process's first gateway


@dataclass(slots=True)
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's CPU inside the window (whole run if it never closed)
    window_s: float = 0.0
    reconnects: int = 0  # raftstate streams re-opened after a failure


class _RaftstateTarget:
    def __init__(self, endpoints: tuple[str, ...]) -> None:
        from raftstate.sdk import AsyncDeviceClient

        self.client = AsyncDeviceClient(list(endpoints), deadline_s=10.0)

    async def write(self, device_id: str, seq: int) -> None:
        await self.client.heartbeat(device_id, PAYLOAD, seq=seq)

    async def read(self, device_id: str, linearizable: bool) -> None:
        c = Consistency.LINEARIZABLE if linearizable else Consistency.SERIALIZABLE
        await self.client.get(device_id, c)

    async def close(self) -> None:
        await self.client.close()


class _EtcdTarget:
    def __init__(self, client: object) -> None:
        self.client = client

    @classmethod
    async def connect(cls, endpoints: tuple[str, ...]) -> _EtcdTarget:
        from raftstate.bench.etcd_client import EtcdClient

        return cls(await EtcdClient.connect(list(endpoints)))

    async def write(self, device_id: str, seq: int) -> None:
        value = json.dumps({"seq": seq, **PAYLOAD}).encode()
        await self.client.put(f"/devices/{device_id}", value, timeout_s=10.0)  # type: ignore[attr-defined]

    async def read(self, device_id: str, linearizable: bool) -> None:
        await self.client.get(  # type: ignore[attr-defined]
            f"/devices/{device_id}", serializable=not linearizable, timeout_s=10.0
        )

    async def close(self) -> None:
        await self.client.close()  # type: ignore[attr-defined]


def gateway_endpoint(endpoints: tuple[str, ...], index: int) -> str:
    """The endpoint gateway number ``index`` (global, over all processes) attaches to."""
    return endpoints[index % len(endpoints)]


class _RaftstateGateways:
    """``streams`` HeartbeatStreams; device ``i`` uses stream ``i % streams``."""

    def __init__(self, spec: LoadSpec) -> None:
        from raftstate.sdk import AsyncDeviceClient

        self.client = AsyncDeviceClient(list(spec.endpoints), deadline_s=10.0)
        self.streams = [
            self.client.stream(endpoint=gateway_endpoint(spec.endpoints, spec.first_stream + k))
            for k in range(spec.streams)
        ]

    async def open(self) -> None:
        for s in self.streams:
            await s.__aenter__()

    async def write(self, device_id: str, seq: int, index: int) -> None:
        await self.streams[index % len(self.streams)].send(device_id, PAYLOAD, seq=seq)

    async def close(self) -> int:
        for s in self.streams:
            await s.__aexit__(None, None, None)
        await self.client.close()
        return sum(s.reconnects for s in self.streams)


class _EtcdGateways:
    """``streams`` etcd clients, each with its own channel to its endpoint."""

    def __init__(self, spec: LoadSpec) -> None:
        import grpc

        from raftstate.bench.etcd_client import _CHANNEL_OPTIONS, EtcdClient

        self.clients = []
        for k in range(spec.streams):
            ep = gateway_endpoint(spec.endpoints, spec.first_stream + k)
            self.clients.append(
                EtcdClient(ep, grpc.aio.insecure_channel(ep, options=_CHANNEL_OPTIONS))
            )

    async def open(self) -> None:
        return None

    async def write(self, device_id: str, seq: int, index: int) -> None:
        value = json.dumps({"seq": seq, **PAYLOAD}).encode()
        client = self.clients[index % len(self.clients)]
        await client.put(f"/devices/{device_id}", value, timeout_s=10.0)

    async def close(self) -> int:
        for c in self.clients:
            await c.close()
        return 0


class _Gateways(Protocol):
    async def open(self) -> None: ...
    async def write(self, device_id: str, seq: int, index: int) -> None: ...
    async def close(self) -> int: ...


async def _make_target(spec: LoadSpec) -> Target:
    if spec.system == "raftstate":
        return _RaftstateTarget(spec.endpoints)
    if spec.system == "etcd":
        return await _EtcdTarget.connect(spec.endpoints)
    raise ValueError(f"unknown system {spec.system!r}")


def _make_gateways(spec: LoadSpec) -> _Gateways:
    if spec.system == "raftstate":
        return _RaftstateGateways(spec)
    if spec.system == "etcd":
        return _EtcdGateways(spec)
    raise ValueError(f"unknown system {spec.system!r}")


async def _drive(spec: LoadSpec) -> LoadResult:
    result = LoadResult()
    begin = spec.start_at + spec.warmup_s
    end = begin + spec.duration_s
    seq0 = time.time_ns() // 1000
    op: Callable[[str, int, int], Awaitable[None]]
    target: Target | None = None
    gateways: _Gateways | None = None
    if spec.mode == "stream":
        if spec.op != "write":
            raise ValueError("mode='stream' only writes")
        gateways = _make_gateways(spec)
        await gateways.open()
        op = gateways.write
    else:
        target = await _make_target(spec)
        unary = target
        if spec.op == "write":

            async def op(device_id: str, seq: int, _index: int) -> None:
                await unary.write(device_id, seq)

        else:
            linearizable = spec.op == "read-linearizable"

            async def op(device_id: str, _seq: int, _index: int) -> None:
                await unary.read(device_id, linearizable)

            # Make sure every read target exists before the window opens.
            for i in range(spec.devices):
                await unary.write(f"bench-{spec.first_device + i:07d}", seq0)

    async def device(i: int) -> None:
        device_id = f"bench-{spec.first_device + i:07d}"
        seq = seq0 + 1
        while True:
            now = time.time()
            if now >= end or (spec.max_ops and len(result.latencies_ms) >= spec.max_ops):
                return
            t0 = time.perf_counter()
            try:
                await op(device_id, seq, i)
                ok = True
            except Exception as exc:  # every failure counts; keep a few samples
                ok = False
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(exc).__name__}: {exc}")
            elapsed_ms = (time.perf_counter() - t0) * 1000
            seq += 1
            if now >= begin:
                if ok:
                    result.latencies_ms.append(elapsed_ms)
                else:
                    result.errors += 1

    window: list[float] = []

    async def sample_cpu() -> None:
        for at in (begin, end):
            await asyncio.sleep(max(0.0, at - time.time()))
            window.append(_cpu_now())

    delay = spec.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    sampler = asyncio.create_task(sample_cpu())
    c0 = _cpu_now()
    await asyncio.gather(*(device(i) for i in range(spec.devices)))
    c1 = _cpu_now()
    sampler.cancel()
    if gateways is not None:
        result.reconnects = await gateways.close()
    if target is not None:
        await target.close()
    result.cpu_s = window[1] - window[0] if len(window) == 2 else c1 - c0
    result.window_s = spec.duration_s
    return result


def _cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_load(spec: LoadSpec) -> LoadResult:
    """Entry point of one load process (picklable for multiprocessing)."""
    return uvloop.run(_drive(spec))
