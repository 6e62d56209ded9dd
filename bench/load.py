"""Load-generator processes for ``raftstate bench``.

Each load process runs its own uvloop and clients. All processes start
together at ``start_at`` (wall clock) and only requests *started* inside the
measurement window ``[start_at + warmup_s, start_at + warmup_s + duration_s)``
are counted, so connection set-up and the tail of the run do not distort
throughput. The process's CPU time is sampled at both ends of the same window.

Three shapes of load (``LoadSpec.mode``):

* ``"unary"`` (closed loop): every simulated device sends its next request as
  soon as the previous one is answered, each as its own unary call on the
  process's one client (raftstate ``Heartbeat``/``GetDevice``, etcd
  ``Put``/``Range``). ``op`` picks writes, linearizable or serializable reads,
  or ``"mixed"``: each device alternates heartbeat and linearizable read, half
  the devices starting with each, so half the calls are of each kind.
* ``"stream"``: the "gateway" shape. The process is ``streams`` gateways,
  each attached to one endpoint (gateways are spread over all endpoints, as a
  fleet's gateways attach to their nearest node), and the devices are dealt
  out to the gateways. raftstate: each gateway keeps one ``HeartbeatStream``
  open and pipelines its devices' heartbeats on it. etcd has no streaming
  put, so an etcd gateway pipelines its devices' concurrent unary ``Put``
  calls over one channel of its own.
* ``"open"`` (open loop, reads or heartbeats): requests are sent at
  ``rate_per_s`` whatever the answers do, at Poisson or evenly spaced
  arrival times (:func:`arrival_offsets`), arrival ``k`` to device
  ``k % devices`` (a heartbeat with a new seq each time). At most
  ``devices`` are in flight; an arrival that finds the bound reached is not
  sent and counts as an error (``dropped``). Latency runs from the actual
  send; how late each send was against its schedule is kept as ``lags_ms``
  so a generator that fell behind shows.

Reads target devices written once before ``start_at`` (the device ids are the
same in every phase). ``pinned`` sends everything to ``endpoints[0]``
instead of the leader: the raftstate SDK with ``prefer_leader=False`` and
only that endpoint, or an etcd channel to that member.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import uvloop

from bench.etcd_client import EtcdClient
from raftstate.model import Consistency

PAYLOAD = {"temp_c": "21.5", "fw": "1.4.2", "rssi": "-67", "battery_pct": "87"}
#: Writes in flight per process while pre-writing the devices that reads target.
PREWRITE_CONCURRENCY = 32


class Target(Protocol):
    async def write(self, device_id: str, seq: int) -> None: ...
    async def read(self, device_id: str, linearizable: bool) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadSpec:
    system: str  # "raftstate" | "etcd"
    endpoints: tuple[str, ...]
    op: str  # "write" | "read-linearizable" | "read-serializable" | "mixed"
    first_device: int
    devices: int  # closed loop: concurrent devices; open loop: also the in-flight bound
    start_at: float
    warmup_s: float
    duration_s: float
    max_ops: int = 0  # per process; 0 = unbounded (sequential runs set it)
    mode: str = "unary"  # "unary" | "stream" | "open" (see the module docstring)
    streams: int = 1  # gateways in this process (mode="stream")
    first_stream: int = 0  # global index of this process's first gateway
    pinned: bool = False  # send everything to endpoints[0], not to the leader
    rate_per_s: float = 0.0  # this process's arrival rate (mode="open")
    poisson: bool = True  # open loop: Poisson arrivals, else evenly spaced
    seed: int = 0  # open loop: seeds the arrival times


@dataclass(slots=True)
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's CPU inside the window (whole run if it never closed)
    window_s: float = 0.0
    reconnects: int = 0  # raftstate streams re-opened after a failure
    #: op="mixed": latencies per kind of call ("heartbeat", "read").
    split_ms: dict[str, list[float]] = field(default_factory=dict)
    dropped: int = 0  # open loop: arrivals not sent because ``devices`` were in flight
    lags_ms: list[float] = field(default_factory=list)  # open loop: send time - scheduled time


def arrival_offsets(
    rate_per_s: float, span_s: float, rng: random.Random, *, poisson: bool = True
) -> Iterator[float]:
    """Scheduled send times, in seconds from the start, of an open-loop load
    of ``rate_per_s`` over ``[0, span_s)``, in increasing order.

    Poisson arrivals have exponential gaps drawn from ``rng`` (mean
    ``1 / rate_per_s``); otherwise the gaps are exactly ``1 / rate_per_s``,
    starting at 0. Pure: the same ``rng`` state gives the same times. Raises
    ``ValueError`` if ``rate_per_s`` is not a positive finite number.
    """
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
    if not poisson:
        k = 0
        while (at := k / rate_per_s) < span_s:
            yield at
            k += 1
        return
    at = rng.expovariate(rate_per_s)
    while at < span_s:
        yield at
        at += rng.expovariate(rate_per_s)


class _RaftstateTarget:
    def __init__(self, endpoints: tuple[str, ...], *, pinned: bool = False) -> None:
        from raftstate.sdk import AsyncDeviceClient

        self.client = AsyncDeviceClient(
            list(endpoints[:1] if pinned else endpoints), deadline_s=10.0, prefer_leader=not pinned
        )

    async def write(self, device_id: str, seq: int) -> None:
        await self.client.heartbeat(device_id, PAYLOAD, seq=seq)

    async def read(self, device_id: str, linearizable: bool) -> None:
        c = Consistency.LINEARIZABLE if linearizable else Consistency.SERIALIZABLE
        await self.client.get(device_id, c)

    async def close(self) -> None:
        await self.client.close()


def pinned_etcd_client(endpoint: str) -> EtcdClient:
    """An :class:`EtcdClient` whose one channel goes to ``endpoint``, leader or
    not. Create it inside the event loop that will use it."""
    import grpc

    from bench.etcd_client import _CHANNEL_OPTIONS

    return EtcdClient(endpoint, grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS))


class _EtcdTarget:
    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, endpoints: tuple[str, ...], *, pinned: bool = False) -> _EtcdTarget:
        if pinned:
            return cls(pinned_etcd_client(endpoints[0]))
        return cls(await EtcdClient.connect(list(endpoints)))

    async def write(self, device_id: str, seq: int) -> None:
        value = json.dumps({"seq": seq, **PAYLOAD}).encode()
        await self.client.put(f"/devices/{device_id}", value, timeout_s=10.0)

    async def read(self, device_id: str, linearizable: bool) -> None:
        value = await self.client.get(
            f"/devices/{device_id}", serializable=not linearizable, timeout_s=10.0
        )
        if value is None:  # raftstate answers NotFound; count a missing key the same way
            raise LookupError(f"etcd has no /devices/{device_id}")

    async def close(self) -> None:
        await self.client.close()


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
        self.clients = [
            pinned_etcd_client(gateway_endpoint(spec.endpoints, spec.first_stream + k))
            for k in range(spec.streams)
        ]

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
        return _RaftstateTarget(spec.endpoints, pinned=spec.pinned)
    if spec.system == "etcd":
        return await _EtcdTarget.connect(spec.endpoints, pinned=spec.pinned)
    raise ValueError(f"unknown system {spec.system!r}")


def _make_gateways(spec: LoadSpec) -> _Gateways:
    if spec.system == "raftstate":
        return _RaftstateGateways(spec)
    if spec.system == "etcd":
        return _EtcdGateways(spec)
    raise ValueError(f"unknown system {spec.system!r}")


#: One call of a phase: ``(device_id, seq, device index) -> kind``, where the
#: kind ("heartbeat"/"read") is returned only when a phase mixes kinds.
_Op = Callable[[str, int, int], Awaitable[str | None]]


def _unary_op(spec: LoadSpec, target: Target) -> _Op:
    if spec.op == "write":

        async def write(device_id: str, seq: int, _index: int) -> None:
            await target.write(device_id, seq)

        return write
    if spec.op == "mixed":
        # Device i starts with a read if i is odd, then every device alternates.
        reads_next = [i % 2 == 1 for i in range(spec.devices)]

        async def mixed(device_id: str, seq: int, index: int) -> str:
            read, reads_next[index] = reads_next[index], not reads_next[index]
            if read:
                await target.read(device_id, True)
                return "read"
            await target.write(device_id, seq)
            return "heartbeat"

        return mixed
    if spec.op in ("read-linearizable", "read-serializable"):
        linearizable = spec.op == "read-linearizable"

        async def read(device_id: str, _seq: int, _index: int) -> None:
            await target.read(device_id, linearizable)

        return read
    raise ValueError(f"unknown op {spec.op!r}")


def _device_id(spec: LoadSpec, i: int) -> str:
    return f"bench-{spec.first_device + i:07d}"


async def _prewrite(spec: LoadSpec, target: Target, seq: int) -> None:
    """Write every device of this process once, so reads find it."""
    gate = asyncio.Semaphore(PREWRITE_CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            await target.write(_device_id(spec, i), seq)

    await asyncio.gather(*(one(i) for i in range(spec.devices)))


def _note_error(result: LoadResult, exc: BaseException) -> None:
    if len(result.error_samples) < 5:
        result.error_samples.append(f"{type(exc).__name__}: {exc}")


async def _closed_loop(spec: LoadSpec, op: _Op, result: LoadResult, seq0: int) -> None:
    begin = spec.start_at + spec.warmup_s
    end = begin + spec.duration_s

    async def device(i: int) -> None:
        device_id = _device_id(spec, i)
        seq = seq0 + 1
        while True:
            now = time.time()
            if now >= end or (spec.max_ops and len(result.latencies_ms) >= spec.max_ops):
                return
            t0 = time.perf_counter()
            kind: str | None = None
            try:
                kind = await op(device_id, seq, i)
                ok = True
            except Exception as exc:  # every failure counts; keep a few samples
                ok = False
                _note_error(result, exc)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            seq += 1
            if now >= begin:
                if ok:
                    result.latencies_ms.append(elapsed_ms)
                    if kind is not None:
                        result.split_ms.setdefault(kind, []).append(elapsed_ms)
                else:
                    result.errors += 1

    await asyncio.gather(*(device(i) for i in range(spec.devices)))


async def _open_loop(spec: LoadSpec, op: _Op, result: LoadResult, seq0: int) -> None:
    limit = max(1, spec.devices)
    # The schedule runs on the monotonic clock from the wall-clock start.
    origin = time.perf_counter() + (spec.start_at - time.time())
    in_flight: set[asyncio.Task[None]] = set()

    async def one(device_id: str, seq: int, counted: bool) -> None:
        t0 = time.perf_counter()
        try:
            await op(device_id, seq, 0)
        except Exception as exc:
            _note_error(result, exc)
            if counted:
                result.errors += 1
            return
        if counted:
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)

    span = spec.warmup_s + spec.duration_s
    arrivals = arrival_offsets(
        spec.rate_per_s, span, random.Random(spec.seed), poisson=spec.poisson
    )
    for k, at in enumerate(arrivals):
        delay = origin + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        counted = at >= spec.warmup_s
        if counted:
            result.lags_ms.append(max(0.0, (time.perf_counter() - origin - at) * 1000))
        if len(in_flight) >= limit:
            if counted:
                result.dropped += 1
                result.errors += 1
                if result.dropped == 1:
                    _note_error(
                        result, OverflowError(f"{limit} requests in flight; arrival not sent")
                    )
            continue
        # Writes: every arrival is a new seq, so none is a duplicate.
        task = asyncio.create_task(one(_device_id(spec, k % spec.devices), seq0 + 1 + k, counted))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)


async def _drive(spec: LoadSpec) -> LoadResult:
    result = LoadResult()
    begin = spec.start_at + spec.warmup_s
    end = begin + spec.duration_s
    seq0 = time.time_ns() // 1000
    target: Target | None = None
    gateways: _Gateways | None = None
    if spec.mode == "stream":
        if spec.op != "write":
            raise ValueError("mode='stream' only writes")
        gateways = _make_gateways(spec)
        await gateways.open()
        op: _Op = gateways.write
    else:
        if spec.mode == "open" and spec.op == "mixed":
            raise ValueError("mode='open' reads or writes, not both")
        target = await _make_target(spec)
        op = _unary_op(spec, target)
        if spec.op != "write":
            await _prewrite(spec, target, seq0)

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
    if spec.mode == "open":
        await _open_loop(spec, op, result, seq0)
    else:
        await _closed_loop(spec, op, result, seq0)
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
