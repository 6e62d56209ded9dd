"""Fleet load processes for ``raftstate bench --fleet``: devices behind gateways.

Each load process owns a contiguous range of devices and ``gateways``
gateways; gateway ``j`` of the process holds every ``gateways``-th device of
the range. A gateway sends its devices' heartbeats in batches, one request
per batch, over its own channel to one endpoint (gateways are dealt out over
all endpoints, as a fleet's gateways attach to their nearest node):

* ``path="batch"``: raftstate ``HeartbeatBatch``, one ack per heartbeat;
* ``path="stream"``: raftstate ``HeartbeatStream``, the batch's heartbeats
  written one by one on the gateway's stream, acks matched in order (for a
  server without the batch RPC, and for comparison);
* ``path="txn"``: etcd ``KV.Txn`` with one Put per heartbeat (etcd allows
  at most 128 operations per transaction by default: ``--max-txn-ops``).

Requests are pre-encoded bytes (:mod:`bench.fleetwire`). A batch
holds distinct devices, all with the same seq: ``seq0 + round``, where a
round is one pass over the gateway's devices, so every heartbeat of a
device has a larger seq than its last one (``seq0`` is the phase's start in
microseconds).

Modes (``FleetSpec.mode``):

* ``"load"``: every device once, as fast as ``in_flight`` requests per
  gateway allow; all of it is measured.
* ``"hold"``: an open loop of ``rate_per_s`` heartbeats per second for the
  process. Every ``flush_s`` a gateway sends what has come due since its last
  flush (several requests if more than ``batch_max``), but never more than
  ``in_flight`` requests at once: what cannot be sent waits (``backlog``), as
  it would in a real gateway, and how late it left is the send lag.
* ``"saturate"``: closed loop, ``in_flight`` full batches per gateway.

Latency runs from the send of the request (stream: of the message) to its
ack, and is counted per heartbeat for requests sent inside
``[start_at + warmup_s, start_at + warmup_s + duration_s)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import uvloop

from bench.fleetstats import LatencyHistogram
from bench.fleetwire import FleetDevices
from raftstate.v1 import device_pb2

BATCH_METHOD = "/raftstate.v1.DeviceStateService/HeartbeatBatch"
STREAM_METHOD = "/raftstate.v1.DeviceStateService/HeartbeatStream"
TXN_METHOD = "/etcdserverpb.KV/Txn"
#: etcd's default --max-txn-ops.
ETCD_MAX_TXN_OPS = 128
_CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What one load process does (picklable)."""

    system: str  # "raftstate" | "etcd"
    path: str  # "batch" | "stream" | "txn"
    endpoints: tuple[str, ...]
    first_device: int
    devices: int
    first_gateway: int  # global index of this process's first gateway
    gateways: int
    mode: str  # "load" | "hold" | "saturate"
    seq0: int
    start_at: float  # wall clock
    warmup_s: float = 0.0
    duration_s: float = 0.0
    rate_per_s: float = 0.0
    batch_max: int = 1000
    flush_s: float = 0.05
    in_flight: int = 2
    deadline_s: float = 10.0
    collect_acked: bool = False


@dataclass(slots=True)
class FleetLoadResult:
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    sent: int = 0  # heartbeats sent inside the window
    acked: int = 0  # of those, acknowledged OK
    errors: int = 0  # of those, failed (whole request or per item)
    duplicates: int = 0
    acked_total: int = 0  # OK acks of the whole run, warm-up included
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    window_s: float = 0.0
    backlog_max: int = 0
    #: collect_acked: device id -> highest seq acknowledged OK.
    acked_seq: dict[str, int] = field(default_factory=dict)
    first_send: float = 0.0  # wall clock (load mode)
    last_ack: float = 0.0


@dataclass(slots=True)
class _Outcome:
    ok: list[int] = field(default_factory=list)  # local device indexes acked OK
    duplicates: int = 0
    errors: int = 0
    latencies: list[tuple[float, int]] = field(default_factory=list)  # (ms, count)
    samples: list[str] = field(default_factory=list)
    seq: int = 0


class _Gateway(Protocol):
    async def open(self) -> None: ...
    async def send(self, indexes: Sequence[int], seq: int) -> _Outcome: ...
    async def close(self) -> None: ...


def _channel(system: str, endpoint: str) -> grpc.aio.Channel:
    if system == "etcd":
        return grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
    from raftstate.sdk.credentials import Credentials

    return Credentials.from_env().aio_channel(endpoint, _CHANNEL_OPTIONS)


def _metadata(system: str) -> tuple[tuple[str, str], ...]:
    if system == "etcd":
        return ()
    from raftstate.sdk.credentials import Credentials

    return Credentials.from_env().metadata()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class _BatchGateway:
    def __init__(self, spec: FleetSpec, devs: FleetDevices, endpoint: str) -> None:
        self.devs, self.spec = devs, spec
        self.channel = _channel(spec.system, endpoint)
        self.md = _metadata(spec.system)
        self.call: Any = self.channel.unary_unary(
            BATCH_METHOD,
            request_serializer=None,
            response_deserializer=device_pb2.HeartbeatBatchResponse.FromString,
        )

    async def open(self) -> None:
        return None

    async def send(self, indexes: Sequence[int], seq: int) -> _Outcome:
        out = _Outcome()
        body = self.devs.heartbeat_batch(indexes, seq)
        t0 = time.perf_counter()
        try:
            res = await self.call(body, timeout=self.spec.deadline_s, metadata=self.md)
        except Exception as exc:
            out.errors = len(indexes)
            out.samples.append(_describe(exc))
            return out
        ms = (time.perf_counter() - t0) * 1000
        for i, ack in zip(indexes, res.acks, strict=False):
            if ack.code == 0:
                out.ok.append(i)
                if ack.result.duplicate:
                    out.duplicates += 1
            else:
                out.errors += 1
                if len(out.samples) < 2:
                    out.samples.append(f"ack code {ack.code}: {ack.message}")
        out.errors += max(0, len(indexes) - len(res.acks))
        out.latencies.append((ms, len(out.ok)))
        return out

    async def close(self) -> None:
        await self.channel.close()


class _TxnGateway:
    def __init__(self, spec: FleetSpec, devs: FleetDevices, endpoint: str) -> None:
        self.devs, self.spec = devs, spec
        self.channel = _channel("etcd", endpoint)
        self.call: Any = self.channel.unary_unary(
            TXN_METHOD, request_serializer=None, response_deserializer=None
        )

    async def open(self) -> None:
        return None

    async def send(self, indexes: Sequence[int], seq: int) -> _Outcome:
        out = _Outcome()
        body = self.devs.etcd_txn(indexes, seq)
        t0 = time.perf_counter()
        try:
            await self.call(body, timeout=self.spec.deadline_s)
        except Exception as exc:
            out.errors = len(indexes)
            out.samples.append(_describe(exc))
            return out
        out.ok = list(indexes)
        out.latencies.append(((time.perf_counter() - t0) * 1000, len(indexes)))
        return out

    async def close(self) -> None:
        await self.channel.close()


class _StreamGateway:
    """One HeartbeatStream; at most the node's window of messages unanswered."""

    def __init__(self, spec: FleetSpec, devs: FleetDevices, endpoint: str) -> None:
        self.devs, self.spec = devs, spec
        self.channel = _channel(spec.system, endpoint)
        self.md = _metadata(spec.system)
        self.fifo: deque[tuple[float, int, _Outcome, asyncio.Future[None], list[int]]] = deque()
        self.lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(256)
        self.call: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        from raftstate.admission import STREAM_WINDOW_KEY

        stub: Any = self.channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,
            response_deserializer=device_pb2.HeartbeatStreamResponse.FromString,
        )
        self.call = stub(metadata=self.md)
        md = await self.call.initial_metadata()
        window = dict(md or ()).get(STREAM_WINDOW_KEY)
        if window:
            self.slots = asyncio.Semaphore(int(window))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                ack = await self.call.read()
                if ack is grpc.aio.EOF:
                    break
                t0, i, out, done, left = self.fifo.popleft()
                self.slots.release()
                if ack.code == 0:
                    out.ok.append(i)
                    out.duplicates += bool(ack.result.duplicate)
                    out.latencies.append(((time.perf_counter() - t0) * 1000, 1))
                else:
                    out.errors += 1
                    if len(out.samples) < 2:
                        out.samples.append(f"ack code {ack.code}: {ack.message}")
                left[0] -= 1
                if left[0] == 0 and not done.done():
                    done.set_result(None)
        except Exception as exc:
            self._fail(_describe(exc))
        self._fail("stream ended with messages unanswered")

    def _fail(self, why: str) -> None:
        while self.fifo:
            _t, _i, out, done, left = self.fifo.popleft()
            out.errors += 1
            if not out.samples:
                out.samples.append(why)
            left[0] -= 1
            if left[0] == 0 and not done.done():
                done.set_result(None)

    async def send(self, indexes: Sequence[int], seq: int) -> _Outcome:
        out = _Outcome()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        left = [len(indexes)]
        try:
            for i in indexes:
                await self.slots.acquire()
                async with self.lock:
                    if self.reader is None or self.reader.done():
                        raise ConnectionError("stream is closed")
                    self.fifo.append((time.perf_counter(), i, out, done, left))
                    await self.call.write(self.devs.heartbeat(i, seq))
        except Exception as exc:
            unsent = left[0] - sum(1 for e in self.fifo if e[2] is out)
            out.errors += unsent
            out.samples.append(_describe(exc))
            left[0] -= unsent
            if left[0] <= 0:
                return out
        await done
        return out

    async def close(self) -> None:
        if self.call is not None:
            with contextlib.suppress(Exception):
                await self.call.done_writing()
            if self.reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.reader, 5.0)
                self.reader.cancel()
        await self.channel.close()


def _make_gateway(spec: FleetSpec, devs: FleetDevices, index: int) -> _Gateway:
    endpoint = spec.endpoints[index % len(spec.endpoints)]
    if spec.path == "batch":
        return _BatchGateway(spec, devs, endpoint)
    if spec.path == "stream":
        return _StreamGateway(spec, devs, endpoint)
    if spec.path == "txn":
        return _TxnGateway(spec, devs, endpoint)
    raise ValueError(f"unknown path {spec.path!r}")


class _Cursor:
    """A gateway's walk over its devices: the next ``n`` distinct devices and
    the seq they share (a batch never spans two rounds)."""

    def __init__(self, members: range, seq0: int) -> None:
        self.members, self.pos, self.round, self.seq0 = members, 0, 0, seq0

    def take(self, n: int) -> tuple[range, int]:
        if self.pos >= len(self.members):
            self.pos, self.round = 0, self.round + 1
        chunk = self.members[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk, self.seq0 + self.round


def _cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: Stream path: a "batch" is this many messages written back to back, and
#: a gateway keeps at least STREAM_IN_FLIGHT of them going, so the stream
#: stays full (up to the node's window) instead of waiting for whole batches.
STREAM_CHUNK = 32
STREAM_IN_FLIGHT = 8


def shape(spec: FleetSpec) -> tuple[int, int]:
    """``(heartbeats per request, requests in flight per gateway)`` for
    ``spec``'s path: etcd caps a Txn at 128 Puts (and gets as many Txns in
    flight as it takes to carry ``in_flight`` batches); a stream gateway
    sends small chunks, many at once. Pure."""
    if spec.path == "txn":
        # As many heartbeats in flight as a raftstate gateway has: a batch
        # that etcd needs several Txns for is that many Txns at once.
        txns = -(-spec.batch_max // ETCD_MAX_TXN_OPS)
        return min(spec.batch_max, ETCD_MAX_TXN_OPS), spec.in_flight * txns
    if spec.path == "stream":
        return min(spec.batch_max, STREAM_CHUNK), max(spec.in_flight, STREAM_IN_FLIGHT)
    return spec.batch_max, spec.in_flight


class _Run:
    def __init__(self, spec: FleetSpec, devs: FleetDevices) -> None:
        self.spec, self.devs = spec, devs
        self.result = FleetLoadResult()
        self.begin = spec.start_at + spec.warmup_s
        self.end = self.begin + spec.duration_s
        self.in_flight = shape(spec)[1]

    def record(self, out: _Outcome, sent_at: float, n: int) -> None:
        r = self.result
        r.acked_total += len(out.ok)
        r.last_ack = max(r.last_ack, time.time())
        for s in out.samples:
            if len(r.error_samples) < 5:
                r.error_samples.append(s)
        if self.spec.collect_acked and out.ok:
            ids, seq = self.devs.ids, out.seq
            for i in out.ok:
                r.acked_seq[ids[i]] = max(r.acked_seq.get(ids[i], 0), seq)
        if self.spec.mode != "load" and not (self.begin <= sent_at < self.end):
            return
        r.sent += n
        r.acked += len(out.ok)
        r.errors += out.errors
        r.duplicates += out.duplicates
        for ms, count in out.latencies:
            if count:
                r.hist.add(ms, count)

    async def one(self, gw: _Gateway, chunk: range, seq: int) -> None:
        sent_at = time.time()
        if not self.result.first_send:
            self.result.first_send = sent_at
        out = await gw.send(chunk, seq)
        out.samples, out.seq = out.samples[:2], seq
        self.record(out, sent_at, len(chunk))

    async def closed_loop(self, gw: _Gateway, cursor: _Cursor, cap: int, once: bool) -> None:
        async def worker() -> None:
            while True:
                if once and cursor.round > 0:
                    return
                if not once and time.time() >= self.end:
                    return
                chunk, seq = cursor.take(cap)
                if once and cursor.round > 0:
                    return
                await self.one(gw, chunk, seq)

        await asyncio.gather(*(worker() for _ in range(self.in_flight)))

    async def hold(self, gw: _Gateway, cursor: _Cursor, cap: int, rate: float, k: int) -> None:
        spec = self.spec
        origin = time.perf_counter() + (spec.start_at - time.time())
        span = spec.warmup_s + spec.duration_s
        # Stagger the gateways' flushes over the flush interval.
        offset = spec.flush_s * (k / max(1, spec.gateways))
        issued = 0
        tasks: set[asyncio.Task[None]] = set()
        next_flush = offset
        while True:
            await asyncio.sleep(max(0.0, origin + next_flush - time.perf_counter()))
            now = time.perf_counter() - origin
            if now >= span:
                break
            next_flush += spec.flush_s
            due = int(now * rate)
            while due > issued and len(tasks) < self.in_flight:
                chunk, seq = cursor.take(min(cap, due - issued))
                if now >= spec.warmup_s:
                    self.result.lag.add(max(0.0, now - (issued + 1) / rate) * 1000)
                task = asyncio.create_task(self.one(gw, chunk, seq))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                issued += len(chunk)
            if now >= spec.warmup_s:
                self.result.backlog_max = max(self.result.backlog_max, due - issued)
        if tasks:
            await asyncio.gather(*tasks)


async def _drive(spec: FleetSpec) -> FleetLoadResult:
    devs = FleetDevices.make(spec.first_device, spec.devices)
    run = _Run(spec, devs)
    g = max(1, min(spec.gateways, spec.devices))
    gateways = [_make_gateway(spec, devs, spec.first_gateway + k) for k in range(g)]
    cap_max = shape(spec)[0]
    try:
        for gw in gateways:
            await gw.open()
        cursors = [_Cursor(range(k, spec.devices, g), spec.seq0) for k in range(g)]
        caps = [max(1, min(cap_max, len(c.members))) for c in cursors]
        window: list[float] = []

        async def sample_cpu() -> None:
            for at in (run.begin, run.end):
                await asyncio.sleep(max(0.0, at - time.time()))
                window.append(_cpu_now())

        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        c0 = _cpu_now()
        sampler = asyncio.create_task(sample_cpu()) if spec.mode != "load" else None
        triples = list(zip(gateways, cursors, caps, strict=True))
        if spec.mode in ("load", "saturate"):
            once = spec.mode == "load"
            jobs = [run.closed_loop(gw, c, cap, once) for gw, c, cap in triples]
        elif spec.mode == "hold":
            rate = spec.rate_per_s / g
            jobs = [run.hold(gw, c, cap, rate, k) for k, (gw, c, cap) in enumerate(triples)]
        else:
            raise ValueError(f"unknown mode {spec.mode!r}")
        await asyncio.gather(*jobs)
        c1 = _cpu_now()
        if sampler is not None:
            sampler.cancel()
        r = run.result
        if spec.mode == "load":
            r.cpu_s = c1 - c0
            r.window_s = max(1e-9, r.last_ack - r.first_send)
        else:
            r.cpu_s = window[1] - window[0] if len(window) == 2 else c1 - c0
            r.window_s = spec.duration_s
        return r
    finally:
        for gw in gateways:
            with contextlib.suppress(Exception):
                await gw.close()


def run_fleet_load(spec: FleetSpec) -> FleetLoadResult:
    """Entry point of one load process (picklable for multiprocessing)."""
    return uvloop.run(_drive(spec))


def merge_results(results: Sequence[FleetLoadResult]) -> FleetLoadResult:
    """All processes' results as one (window: the longest; load: first send to last ack)."""
    out = FleetLoadResult()
    for r in results:
        out.hist.merge(r.hist)
        out.lag.merge(r.lag)
        out.sent += r.sent
        out.acked += r.acked
        out.errors += r.errors
        out.duplicates += r.duplicates
        out.acked_total += r.acked_total
        out.cpu_s += r.cpu_s
        out.backlog_max += r.backlog_max
        out.error_samples += r.error_samples[: max(0, 5 - len(out.error_samples))]
        for d, s in r.acked_seq.items():
            out.acked_seq[d] = max(out.acked_seq.get(d, 0), s)
    firsts = [r.first_send for r in results if r.first_send]
    lasts = [r.last_ack for r in results if r.last_ack]
    out.first_send = min(firsts, default=0.0)
    out.last_ack = max(lasts, default=0.0)
    out.window_s = max((r.window_s for r in results), default=0.0)
    return out


__all__ = [
    "ETCD_MAX_TXN_OPS",
    "FleetLoadResult",
    "FleetSpec",
    "merge_results",
    "run_fleet_load",
]
