"""Load processes of the watch benchmark: watchers and a timed heartbeat writer.

Both systems are driven by the same code over Python grpc.aio, one gRPC
stream per watcher (raftstate ``Watch``; etcd ``Watch.Watch`` with one
``WatchCreateRequest`` per stream, although etcd could multiplex them), so
differences come from the servers.

* :func:`run_watchers` (one process): ``count`` watchers from global index
  ``first``, watcher ``k`` on ``endpoints[k % len(endpoints)]``. In mode
  ``"own"`` watcher ``k`` watches the prefix that is exactly device ``k``'s id
  (ids are fixed width, so no prefix holds another device) and records
  ``(device, seq, receive time)`` of every event; in mode ``"all"`` every
  watcher watches every bench device and only counts events per 100 ms of
  wall clock (decoding every event would measure the client, not the server);
  they watch ``prefix``, the ids the fan-out phase's load writes.
  Once every watcher is registered (its ``created`` response seen) the
  process says so on the shared ``board`` and waits for the parent's common
  ``start_at``; it stops ``listen_s`` seconds after it.
* :func:`run_writer` (one process): an open-loop heartbeat load at
  ``rate_per_s`` (evenly spaced arrivals), arrival ``k`` to device
  ``k % devices`` with a new, increasing seq, unary calls to the leader
  (raftstate ``Heartbeat``, etcd ``Put``), and the send and acknowledgement
  wall-clock times of every heartbeat sent inside the measured window.

Start-up on a busy two-core box can take many seconds, so no process starts
on a guessed clock: each reports ready on the ``board`` (a manager dict),
and the parent then posts ``start_at`` for all of them (:func:`wait_start`).

The parent joins the two on ``(device, seq)``: an event's delivery latency
is its receive time minus the writer's acknowledgement time (the moment the
client knew it committed), or minus the send time.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop

from bench.etcd_client import _CHANNEL_OPTIONS
from bench.etcdpb import etcd_kv_pb2, etcd_kv_pb2_grpc

#: Device ids of the watch benchmark: fixed width, so an id is no other's prefix.
ID_PREFIX = "wbench-"
ETCD_KEY_PREFIX = "/devices/"
PAYLOAD = {"temp_c": "21.5", "fw": "1.4.2", "rssi": "-67", "battery_pct": "87"}
#: Counting buckets of the fan-out watchers, in seconds of wall clock.
BUCKET_S = 0.1
#: Seconds a process may take to set up before the run counts it as failed.
READY_TIMEOUT_S = 120.0


def device_id(k: int) -> str:
    return f"{ID_PREFIX}{k:07d}"


@dataclass(frozen=True, slots=True)
class WatchSpec:
    system: str  # "raftstate" | "etcd"
    endpoints: tuple[str, ...]
    mode: str  # "own" | "all"
    first: int
    count: int
    listen_s: float  # from the common start to the end of listening
    board: Any  # manager dict: "ready-<key>" from here, "start_at" from the parent
    key: str
    prefix: str = "bench-"  # mode "all": the prefix every watcher watches


@dataclass(slots=True)
class WatchResult:
    #: mode "own": (device_id, seq, receive time) of every event.
    events: list[tuple[str, int, float]] = field(default_factory=list)
    #: mode "all": events received per BUCKET_S bucket (key: int(time / BUCKET_S)).
    buckets: dict[int, int] = field(default_factory=dict)
    registered: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    ready_at: float = 0.0  # when the last watcher was registered


def _prefix_range(prefix: bytes) -> bytes:
    """etcd's range_end for a prefix watch: the prefix with its last byte + 1."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class _Sink:
    def __init__(self, spec: WatchSpec, result: WatchResult) -> None:
        self.own = spec.mode == "own"
        self.result = result

    def count(self, n: int) -> None:
        b = int(time.time() / BUCKET_S)
        self.result.buckets[b] = self.result.buckets.get(b, 0) + n


async def _raftstate_watcher(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], prefix: str,
    sink: _Sink, ready: Callable[[], None],
) -> None:
    from raftstate.v1 import device_pb2, device_pb2_grpc

    stub = device_pb2_grpc.DeviceStateServiceStub(channel)
    call = stub.Watch(device_pb2.WatchRequest(prefix=prefix), metadata=metadata)
    async for res in call:
        if res.created:
            ready()
        if not res.events:
            continue
        if sink.own:
            now = time.time()
            sink.result.events.extend((e.device_id, e.device.seq, now) for e in res.events)
        else:
            sink.count(len(res.events))


async def _etcd_watcher(
    channel: grpc.aio.Channel, prefix: str, sink: _Sink, ready: Callable[[], None]
) -> None:
    stub = etcd_kv_pb2_grpc.WatchStub(channel)
    key = (ETCD_KEY_PREFIX + prefix).encode()
    create = etcd_kv_pb2.WatchRequest(
        create_request=etcd_kv_pb2.WatchCreateRequest(key=key, range_end=_prefix_range(key))
    )

    async def requests() -> AsyncIterator[etcd_kv_pb2.WatchRequest]:
        yield create
        # Keep the request side open: etcd ends the whole stream when the
        # client half-closes it.
        await asyncio.Event().wait()

    call = stub.Watch(requests())
    async for res in call:
        if res.created:
            ready()
        if not res.events:
            continue
        if sink.own:
            now = time.time()
            for e in res.events:
                seq = int(json.loads(e.kv.value)["seq"])
                sink.result.events.append((e.kv.key.decode()[len(ETCD_KEY_PREFIX) :], seq, now))
        else:
            sink.count(len(res.events))


async def _watch_all(spec: WatchSpec) -> WatchResult:
    from raftstate.sdk.credentials import Credentials

    result = WatchResult()
    sink = _Sink(spec, result)
    creds = Credentials.from_env()
    channels: dict[str, grpc.aio.Channel] = {}
    for e in spec.endpoints:
        channels[e] = (
            creds.aio_channel(e, options=_CHANNEL_OPTIONS)
            if spec.system == "raftstate"
            else grpc.aio.insecure_channel(e, options=_CHANNEL_OPTIONS)
        )

    def ready() -> None:
        result.registered += 1
        result.ready_at = time.time()

    async def one(k: int) -> None:
        endpoint = spec.endpoints[k % len(spec.endpoints)]
        prefix = device_id(k) if spec.mode == "own" else spec.prefix
        try:
            if spec.system == "raftstate":
                await _raftstate_watcher(channels[endpoint], creds.metadata(), prefix, sink, ready)
            else:
                await _etcd_watcher(channels[endpoint], prefix, sink, ready)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # counted; a few kept
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")

    c0 = _cpu_now()
    tasks = [asyncio.create_task(one(spec.first + i)) for i in range(spec.count)]
    give_up = time.time() + READY_TIMEOUT_S
    while result.registered < spec.count and time.time() < give_up:
        await asyncio.sleep(0.05)
    if result.registered < spec.count:
        _late(result, f"{spec.count - result.registered} watchers not registered in time")
    start_at = await wait_start(spec.board, spec.key)
    await asyncio.sleep(max(0.0, start_at + spec.listen_s - time.time()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels.values():
        await ch.close()
    result.cpu_s = _cpu_now() - c0
    return result


def run_watchers(spec: WatchSpec) -> WatchResult:
    """Entry point of one watcher process (picklable for multiprocessing)."""
    return uvloop.run(_watch_all(spec))


@dataclass(frozen=True, slots=True)
class WriterSpec:
    system: str
    endpoints: tuple[str, ...]
    first: int  # first device (global index)
    devices: int
    rate_per_s: float
    warmup_s: float
    duration_s: float
    board: Any  # as WatchSpec.board
    key: str
    max_in_flight: int = 2000
    #: raftstate: pipeline on ``streams`` HeartbeatStreams (gateways) instead
    #: of unary calls; etcd has no streaming put and sends concurrent unary Puts.
    streams: int = 0


@dataclass(slots=True)
class WriterResult:
    #: (device_id, seq, send time, ack time) of the heartbeats sent in the window.
    acks: list[tuple[str, int, float, float]] = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    dropped: int = 0
    #: acknowledged as duplicates of a newer heartbeat of the same device
    #: (it overtook this one): no event of their own.
    superseded: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0


async def _write_all(spec: WriterSpec) -> WriterResult:
    from bench.load import _EtcdTarget, _RaftstateTarget

    result = WriterResult()
    target = (
        _RaftstateTarget(spec.endpoints)
        if spec.system == "raftstate"
        else await _EtcdTarget.connect(spec.endpoints)
    )
    seq0 = time.time_ns() // 1000
    # One write per device before the window, so every device exists.
    for i in range(spec.devices):
        await target.write(device_id(spec.first + i), seq0)
    start_at = await wait_start(spec.board, spec.key)
    begin = start_at + spec.warmup_s
    end = begin + spec.duration_s
    in_flight: set[asyncio.Task[None]] = set()

    gateways: list[Any] = []
    n_endpoints = len(spec.endpoints)
    if spec.streams and isinstance(target, _RaftstateTarget):
        gateways = [
            target.client.stream(max_in_flight=512, endpoint=spec.endpoints[k % n_endpoints])
            for k in range(spec.streams)
        ]
        for g in gateways:
            await g.__aenter__()

    async def write(dev: str, seq: int) -> bool:
        """Write; False when a newer heartbeat of the device overtook this
        one (raftstate answers duplicate: no event, nothing to wait for)."""
        if gateways:
            ack = await gateways[hash(dev) % len(gateways)].send(dev, PAYLOAD, seq=seq)
            return bool(ack.stored_seq == seq)
        if isinstance(target, _RaftstateTarget):
            ack = await target.client.heartbeat(dev, PAYLOAD, seq=seq)
            return bool(ack.stored_seq == seq)
        await target.write(dev, seq)
        return True

    async def one(dev: str, seq: int, counted: bool) -> None:
        sent = time.time()
        try:
            own = await write(dev, seq)
        except Exception as exc:
            if counted:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        if counted and own:
            result.acks.append((dev, seq, sent, time.time()))
        elif counted:
            result.superseded += 1

    await asyncio.sleep(max(0.0, start_at - time.time()))
    c0 = _cpu_now()
    origin = time.perf_counter()
    k = 0
    while (now := time.time()) < end:
        due = origin + k / spec.rate_per_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        counted = now >= begin
        if len(in_flight) >= spec.max_in_flight:
            result.dropped += counted
        else:
            result.sent += counted
            task = asyncio.create_task(
                one(device_id(spec.first + k % spec.devices), seq0 + 1 + k, counted)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        k += 1
    if in_flight:
        await asyncio.gather(*in_flight)
    result.cpu_s = _cpu_now() - c0
    for g in gateways:
        await g.__aexit__(None, None, None)
    await target.close()
    return result


def run_writer(spec: WriterSpec) -> WriterResult:
    """Entry point of one writer process (picklable for multiprocessing)."""
    return uvloop.run(_write_all(spec))


async def wait_start(board: Any, key: str) -> float:
    """Say ``key`` is ready on ``board`` and wait for the parent's
    ``start_at`` (raises ``TimeoutError`` after READY_TIMEOUT_S)."""
    board[f"ready-{key}"] = time.time()
    give_up = time.time() + READY_TIMEOUT_S
    while (start_at := board.get("start_at")) is None:
        if time.time() > give_up:
            raise TimeoutError("the benchmark never posted start_at")
        await asyncio.sleep(0.02)
    return float(start_at)


def _late(result: WatchResult | WriterResult, what: str) -> None:
    result.errors += 1
    result.error_samples.append(f"late: {what}")


def _cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
