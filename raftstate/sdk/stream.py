"""HeartbeatStream: many devices' heartbeats pipelined on one gRPC stream.

A gateway that fronts many devices keeps one ``DeviceStateService.HeartbeatStream``
open and writes each heartbeat to it as soon as the device produces one. A
message on a long-lived stream costs the server a fraction of a unary call,
which is what lets one Python node commit several thousand heartbeats per
second.

Theory of operation
-------------------
1. **Sending.** :meth:`HeartbeatStream.send` fixes the heartbeat's seq (the
   client's ``next_seq``, as for unary heartbeats), waits for one of
   ``max_in_flight`` slots, appends the message to the *ready* queue and
   awaits its future. One writer task per gRPC stream moves messages from the
   ready queue to the stream, recording each in the *in-flight* FIFO before
   it is written. The FIFO never holds more than the node's window: the
   ``stream_window`` the node sends in its initial metadata as the stream
   opens (the writer waits for it, at most ``WINDOW_WAIT_S``, then assumes
   ``DEFAULT_STREAM_WINDOW``), so the node never has to stop reading the
   stream to hold us back.
2. **Matching acks.** The server answers every request exactly once, in
   request order (``device.proto``). So the next ack always belongs to the
   head of the in-flight FIFO; :class:`InFlight` checks that its device_id
   and seq match. A mismatch, or an ack with nothing in flight, is a
   protocol error: no further ack on that stream can be attributed, so the
   stream is torn down and handled as in step 4. This is what guarantees
   that a heartbeat is reported acknowledged only when *its own* ack with
   code OK arrived.
3. **Per-message errors** do not end the stream. ``UNAVAILABLE``,
   ``RESOURCE_EXHAUSTED``, ``CANCELLED`` and ``DEADLINE_EXCEEDED`` put the message back on
   the ready queue after exponential backoff with full jitter, with the same
   seq, until the message's own deadline. Any other code (``INVALID_ARGUMENT``
   above all) fails that message at once. After
   :data:`SWITCH_AFTER_FAILURES` ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` acks in a
   row without an OK ack the node is presumed cut off, and the stream moves
   on as in step 4.
4. **Stream failure.** When the stream breaks (an ``AioRpcError``, the node
   killed, a protocol error) or stalls (messages in flight and no ack for
   ``attempt_timeout_s``), every message still in flight goes back to the
   *front* of the ready queue, in order, and the stream is re-opened after
   backoff on the next endpoint, found with the client's leader finding.
   Re-sending is safe because the cluster applies a ``(device_id, seq)`` at
   most once and answers a repeat as a duplicate whose ``stored_seq`` equals
   our seq (Raft thesis §6.3, duplicate detection for client retries).
5. **Deadlines.** Every message has its own deadline (``deadline_s``, default
   the client's). When it passes before an OK ack, ``send`` raises
   ``DeadlineExceeded`` (no answer: outcome unknown) or ``Unavailable`` (the
   last answer was a retriable error). An ack arriving later is still matched
   in FIFO order and then ignored.
6. **Closing.** Leaving the ``async with`` block waits until every ``send``
   in progress has finished (each bounded by its deadline), then half-closes
   the stream and waits briefly for the server's end of stream. Leaving it
   with an exception does not wait: outstanding sends fail with
   ``Unavailable`` (outcome unknown) and the stream is cancelled.

Use a stream from the event loop of its client only. ``send`` may be awaited
concurrently from any number of tasks of that loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from raftstate.admission import DEFAULT_STREAM_WINDOW, STREAM_WINDOW_KEY
from raftstate.errors import (
    DeadlineExceeded,
    InvalidArgument,
    RaftStateError,
    ResourceExhausted,
    Unavailable,
)
from raftstate.model import validate_device_id, validate_seq_ttl
from raftstate.richstatus import decode, decode_trailer
from raftstate.sdk.core import ClientCore, check_size
from raftstate.sdk.inflight import InFlight, Outgoing
from raftstate.sdk.types import HeartbeatAck
from raftstate.v1 import device_pb2, device_pb2_grpc

log = logging.getLogger("raftstate.sdk.stream")

#: Per-message UNAVAILABLE/DEADLINE_EXCEEDED acks in a row (no OK between)
#: after which the stream is moved to another endpoint.
SWITCH_AFTER_FAILURES = 3

#: Stream-level status codes after which re-opening the stream cannot help.
_FATAL_STREAM_CODES = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

#: How long a new stream waits for the node's window before writing.
WINDOW_WAIT_S = 1.0

_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(slots=True, eq=False)
class _Connection:
    endpoint: str
    call: Any  # grpc.aio.StreamStreamCall
    inflight: InFlight
    last_ack_at: float
    window: int  # at most this many in the in-flight FIFO
    window_open: asyncio.Event
    acked: int = 0
    failures_in_row: int = 0
    half_closed: bool = False
    break_reason: RaftStateError | None = None


class HeartbeatStream:
    """Pipelined heartbeats over one gRPC stream; an async context manager.

    Create it with :meth:`AsyncDeviceClient.stream`. ``endpoint`` pins the
    first connection to one node (a gateway's nearest node; followers forward
    writes over Raft); once that stream fails, or without ``endpoint``, the
    stream follows the client's leader finding.

    Counters: ``reconnects`` (streams re-opened after a failure),
    ``retries`` (messages re-sent after a per-message error or on a new
    stream) and ``protocol_errors``. ``endpoint`` is the node currently used.
    """

    def __init__(
        self, client: ClientCore, *, max_in_flight: int = 256, endpoint: str | None = None
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight: must be at least 1")
        self._client = client
        self._max_in_flight = max_in_flight
        self._active = 0  # slots taken
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._pinned = endpoint
        self._ready: deque[Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._pending: set[Outgoing] = set()
        self._started = False
        self._closing = False
        self._fatal: RaftStateError | None = None
        self._driver: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self.endpoint: str | None = None
        self.reconnects = 0
        self.retries = 0
        self.protocol_errors = 0

    async def __aenter__(self) -> HeartbeatStream:
        if self._started:
            raise RuntimeError("a HeartbeatStream can be entered only once")
        self._started = True
        self._driver = asyncio.get_running_loop().create_task(self._drive())
        self._driver.add_done_callback(self._driver_done)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._closing = True
        self._wakeup.set()
        driver = self._driver
        if driver is None:
            return
        if exc_type is None:
            while self._pending and not driver.done():
                self._wakeup.clear()
                await self._wakeup.wait()
            try:
                await asyncio.wait_for(asyncio.shield(driver), self._client.attempt_timeout_s)
            except TimeoutError:
                pass
        if not driver.done():
            driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        self._fail_everything(Unavailable("stream closed before the ack arrived (outcome unknown)"))

    @property
    def in_flight(self) -> int:
        """Sends in progress (queued, written or waiting to be retried)."""
        return len(self._pending)

    async def send(
        self,
        device_id: str,
        reported: Mapping[str, str],
        *,
        seq: int | None = None,
        ttl_s: int | None = None,
        deadline_s: float | None = None,
    ) -> HeartbeatAck:
        """Commit one heartbeat over the stream; return once a majority has it.

        Waits first while ``max_in_flight`` sends are in progress. Raises
        ``InvalidArgument`` (never retried), ``DeadlineExceeded`` /
        ``Unavailable`` when the deadline passes without an OK ack (the
        outcome is then unknown; sending again with the same seq is safe),
        and ``RuntimeError`` if the stream is not open. Event-loop only.
        """
        if not self._started or self._closing:
            raise RuntimeError("HeartbeatStream.send: use it inside 'async with client.stream()'")
        if self._fatal is not None:
            raise self._fatal.with_traceback(None)
        client = self._client
        validate_seq_ttl(seq, ttl_s)
        if seq is None:
            validate_device_id(device_id)
            seq = client.next_seq(device_id)
        else:
            client._note_seq(device_id, seq)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (deadline_s if deadline_s is not None else client.deadline_s)
        fut: asyncio.Future[HeartbeatAck] = loop.create_future()
        request = device_pb2.HeartbeatStreamRequest(
            device_id=device_id, seq=seq, reported=dict(reported), ttl_s=ttl_s or 0
        )
        check_size(request)
        msg = Outgoing(
            request,
            device_id,
            seq,
            deadline,
            fut,
        )
        self._pending.add(msg)
        try:
            await self._acquire_slot(deadline)
            try:
                msg.timer = loop.call_at(deadline, self._expire, msg)
                self._ready.append(msg)
                self._wakeup.set()
                return await fut
            finally:
                self._release_slot()
        finally:
            if msg.timer is not None:
                msg.timer.cancel()
            if not fut.done():
                fut.cancel()
            self._pending.discard(msg)
            if self._closing and not self._pending:
                self._wakeup.set()

    # ---- backpressure -----------------------------------------------------

    async def _acquire_slot(self, deadline: float) -> None:
        """Take one of ``max_in_flight`` slots, first come first served.
        Raises ``DeadlineExceeded`` if none frees up before ``deadline``."""
        if self._active < self._max_in_flight and not self._slot_waiters:
            self._active += 1
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        timer = loop.call_at(deadline, _expire_waiter, waiter)
        try:
            await waiter  # resolved by _release_slot, which hands its slot to us
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot()  # we were given a slot but are leaving
            raise
        finally:
            timer.cancel()

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1

    # ---- resolution -------------------------------------------------------

    def _expire(self, msg: Outgoing) -> None:
        if msg.future.done():
            return
        err = msg.last_error
        if err is None or isinstance(err, DeadlineExceeded):
            msg.future.set_exception(
                DeadlineExceeded(
                    f"no ack within the deadline after {msg.attempts} sends (outcome unknown; "
                    "sending again with the same seq is safe)"
                )
            )
        else:
            gave_up = Unavailable(f"gave up after {msg.attempts} sends: {err.message}")
            gave_up.reason = err.reason
            msg.future.set_exception(gave_up)

    def _requeue(self, msg: Outgoing) -> None:
        if not msg.future.done():
            self._ready.append(msg)
            self._wakeup.set()

    def _fail_everything(self, err: RaftStateError) -> None:
        for msg in self._pending:
            if not msg.future.done():
                msg.future.set_exception(err)

    def _driver_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("heartbeat stream driver crashed", exc_info=task.exception())
        self._fatal = Unavailable(f"heartbeat stream failed: {task.exception()!r}")
        self._fail_everything(self._fatal)

    def _on_ack(
        self, conn: _Connection, ack: device_pb2.HeartbeatStreamResponse, now: float
    ) -> None:
        """Resolve or retry the message ``ack`` answers. Raises ``Unavailable``
        when the stream must be abandoned (protocol error, node cut off)."""
        msg = conn.inflight.match(ack.device_id, ack.seq)
        conn.last_ack_at = now
        conn.window_open.set()
        if msg.future.done():  # expired or caller gone; the ack only keeps us in step
            return
        if ack.code == 0:
            conn.acked += 1
            conn.failures_in_row = 0
            r = ack.result
            msg.future.set_result(
                HeartbeatAck(
                    msg.device_id, msg.seq, r.revision, r.duplicate, r.stored_seq, msg.attempts
                )
            )
            return
        code = _CODE_BY_VALUE.get(ack.code, grpc.StatusCode.UNKNOWN)
        err = decode(code, ack.message, ack.details)
        if not err.retriable:
            msg.future.set_exception(err)
            return
        msg.last_error = err
        delay = self._client.backoff.after(msg.failures, err)
        msg.failures += 1
        if now + delay >= msg.deadline:
            self._expire(msg)
        else:
            self.retries += 1
            asyncio.get_running_loop().call_at(now + delay, self._requeue, msg)
        if not isinstance(err, ResourceExhausted):
            conn.failures_in_row += 1
            if conn.failures_in_row >= SWITCH_AFTER_FAILURES:
                raise Unavailable(
                    f"{conn.failures_in_row} heartbeats in a row failed on {conn.endpoint}: "
                    f"{err.message}"
                )

    # ---- the driver -------------------------------------------------------

    async def _drive(self) -> None:
        """Open streams while there is work; re-open after failures."""
        client = self._client
        endpoint = self._pinned
        broken: str | None = None  # the endpoint whose stream failed last
        breaks = 0
        while True:
            while not self._ready:
                if self._closing and not self._pending:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if endpoint is None:
                if client._leader is None:
                    await client.find_leader(timeout_s=min(0.5, client.attempt_timeout_s))
                endpoint = client._pick()
                if endpoint == broken and len(client.endpoints) > 1:
                    # Right after a crash the survivors still name the dead
                    # leader until they elect a new one; any live node will
                    # forward our writes meanwhile.
                    client._leader = None
                    client._next += 1
                    endpoint = client._pick()
            self.endpoint = endpoint
            conn, err = await self._serve(endpoint)
            if err is None:
                return
            if conn is not None and conn.acked:
                breaks = 0
            broken = endpoint
            if isinstance(err, InvalidArgument) or err.grpc_code in _FATAL_STREAM_CODES:
                log.error("heartbeat stream to %s failed for good: %s", endpoint, err.message)
                self._fatal = err
                self._fail_everything(err)
                return
            log.info("heartbeat stream to %s broke (%s); re-opening", endpoint, err.message)
            self.reconnects += 1
            client._on_retriable(endpoint, err)
            endpoint = None
            delay = client.backoff.after(breaks, err)
            breaks += 1
            await asyncio.sleep(delay)

    async def _serve(self, endpoint: str) -> tuple[_Connection | None, RaftStateError | None]:
        """Run one gRPC stream to ``endpoint`` until it ends. Returns the
        error that ended it, or ``None`` after a clean half-close."""
        loop = asyncio.get_running_loop()
        stub = device_pb2_grpc.DeviceStateServiceStub(self._client._channel(endpoint))
        call = stub.HeartbeatStream(metadata=self._client._metadata)
        window = min(self._max_in_flight, DEFAULT_STREAM_WINDOW)
        conn = _Connection(endpoint, call, InFlight(), loop.time(), window, asyncio.Event())
        self._conn = conn
        writer = loop.create_task(self._write(conn))
        watchdog = loop.create_task(self._watch(conn))
        try:
            return conn, await self._read(conn)
        finally:
            for task in (writer, watchdog):
                task.cancel()
            await asyncio.gather(writer, watchdog, return_exceptions=True)
            if not call.done():
                call.cancel()
            self._conn = None
            resend = [m for m in conn.inflight.take_all() if not m.future.done()]
            self.retries += len(resend)
            self._ready.extendleft(reversed(resend))

    async def _read(self, conn: _Connection) -> RaftStateError | None:
        loop = asyncio.get_running_loop()
        call = conn.call
        while True:
            try:
                ack = await call.read()
            except grpc.aio.AioRpcError as e:
                return decode_trailer(e.code(), e.details() or "", e.trailing_metadata())
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # grpc raises CancelledError when the call was cancelled locally.
                return conn.break_reason or Unavailable("stream cancelled")
            if ack is grpc.aio.EOF:
                if conn.half_closed:
                    return None
                return Unavailable(
                    f"server ended the stream with {len(conn.inflight)} heartbeats unacknowledged"
                )
            try:
                self._on_ack(conn, ack, loop.time())
            except Unavailable as err:
                if err.message.startswith("protocol error"):
                    self.protocol_errors += 1
                    log.warning("heartbeat stream to %s: %s", conn.endpoint, err.message)
                conn.break_reason = err
                return err

    async def _write(self, conn: _Connection) -> None:
        """Move ready messages onto the stream; half-close once closing and idle."""
        loop = asyncio.get_running_loop()
        ready = self._ready
        call = conn.call
        try:
            await self._learn_window(conn)
            while True:
                if not ready:
                    if self._closing and not self._pending:
                        conn.half_closed = True
                        await call.done_writing()
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if len(conn.inflight) >= conn.window:
                    conn.window_open.clear()
                    await conn.window_open.wait()
                    continue
                msg = ready.popleft()
                if msg.future.done():
                    continue
                msg.attempts += 1
                msg.sent_at = loop.time()
                conn.inflight.sent(msg)
                await call.write(msg.request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            # The call is over; the reader sees why and re-queues what is in flight.
            log.debug("heartbeat stream write to %s failed: %s", conn.endpoint, e)

    async def _learn_window(self, conn: _Connection) -> None:
        """Adopt the node's ``stream_window`` from its initial metadata, which
        it sends as the stream opens; a node that does not say within
        :data:`WINDOW_WAIT_S` gets the default."""
        try:
            metadata = await asyncio.wait_for(conn.call.initial_metadata(), WINDOW_WAIT_S)
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # a call that ended: the reader sees why
        for key, value in metadata or ():
            if key == STREAM_WINDOW_KEY and str(value).isdigit() and int(value) > 0:
                conn.window = min(self._max_in_flight, int(value))
                conn.window_open.set()

    async def _watch(self, conn: _Connection) -> None:
        """Abandon the stream when messages are in flight and no ack came
        for ``attempt_timeout_s`` (a hung node or connection)."""
        loop = asyncio.get_running_loop()
        limit = self._client.attempt_timeout_s
        while True:
            await asyncio.sleep(limit / 4)
            head = conn.inflight.head()
            if head is None:
                continue
            quiet = loop.time() - max(head.sent_at, conn.last_ack_at)
            if quiet > limit:
                conn.break_reason = DeadlineExceeded(
                    f"no ack from {conn.endpoint} for {quiet:.1f}s with "
                    f"{len(conn.inflight)} heartbeats in flight"
                )
                conn.call.cancel()
                return


def _expire_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            DeadlineExceeded("all max_in_flight stream slots stayed busy until the deadline")
        )
