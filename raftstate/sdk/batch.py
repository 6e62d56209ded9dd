"""``heartbeat_batch``: many devices' heartbeats per call (gateways).

Theory of operation
-------------------
1. **Seqs first.** Every item's seq is fixed before anything is sent: the
   caller's, or the client's ``next_seq`` (as for unary heartbeats; two
   items of one device get increasing seqs, in list order). Items that fail
   local validation get their ``InvalidArgument`` result (field
   ``heartbeats[i].<field>``, ``i`` the index in the caller's list) and are
   never sent.
2. **Chunks.** The rest go out in ``HeartbeatBatch`` requests of at most
   ``max_batch`` heartbeats and :data:`~raftstate.admission.MAX_BATCH_REQUEST_BYTES`
   bytes (:func:`plan_chunks`), one request at a time, in list order. A node
   configured with a smaller ``batch_rpc_max_heartbeats`` answers
   INVALID_ARGUMENT naming ``heartbeats``; the chunk is then halved and sent
   again, and ``max_batch`` remembers the smaller size.
3. **Retrying only what failed, with the same seq.** A call that fails as a
   whole with a retriable status is retried by the client's usual machinery
   (leader finding, backoff, next endpoint). Within a response, an item
   acked OK is final (a duplicate whose ``stored_seq`` is at least its seq is
   acknowledged: it was stored by an earlier attempt, or overtaken by a newer
   heartbeat). An item with a retriable code (UNAVAILABLE, DEADLINE_EXCEEDED,
   RESOURCE_EXHAUSTED that is not a quota) is sent again in the next round,
   after backoff, with the same seq and state; every other code is final.
   So an acknowledged heartbeat is never re-sent, and no item is ever sent
   with a different seq. A round that settles nothing also moves the client
   to another endpoint.
4. **Deadline.** One deadline covers the whole call. Items still unsettled
   when it passes get ``Unavailable`` (last answer retriable) or
   ``DeadlineExceeded`` (no answer); their outcome is unknown and calling
   again with the same seqs is safe.

Results are typed (:class:`~raftstate.sdk.types.BatchResult`), one per item,
in the caller's order; ``heartbeat_batch`` itself raises nothing but
``ValueError`` for a malformed item and ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from raftstate.admission import MAX_BATCH_REQUEST_BYTES
from raftstate.errors import (
    DeadlineExceeded,
    InvalidArgument,
    RaftStateError,
    Unavailable,
)
from raftstate.model import validate_heartbeat
from raftstate.richstatus import decode
from raftstate.sdk.core import ClientCore
from raftstate.sdk.retry import retry_allowed
from raftstate.sdk.types import BatchItem, BatchResult, HeartbeatAck
from raftstate.v1 import device_pb2, device_pb2_grpc

#: Bytes a request keeps free of the byte limit (tags, lengths, slack).
_REQUEST_SLACK = 1024
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

ItemLike = BatchItem | tuple[str, Mapping[str, str]]


def plan_chunks(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[range]:
    """Split items of encoded ``sizes`` into consecutive ranges of at most
    ``max_items`` items whose sizes (plus 4 bytes of framing each) sum to at
    most ``max_bytes``; an item bigger than that alone is a range of one."""
    if max_items < 1:
        raise ValueError("max_items: must be at least 1")
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        cost = size + 4
        if i > start and (i - start >= max_items or total + cost > max_bytes):
            out.append(range(start, i))
            start, total = i, 0
        total += cost
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _item(x: ItemLike) -> BatchItem:
    if isinstance(x, BatchItem):
        return x
    if isinstance(x, tuple) and len(x) == 2:
        return BatchItem(x[0], x[1])
    raise ValueError(f"heartbeat_batch: {x!r} is not a BatchItem or (device_id, reported)")


class _Call:
    """One ``heartbeat_batch`` call in progress."""

    def __init__(self, client: ClientCore, items: Sequence[ItemLike]) -> None:
        self.client = client
        self.items = [_item(x) for x in items]
        n = len(self.items)
        self.results: list[BatchResult | None] = [None] * n
        self.requests: list[device_pb2.HeartbeatRequest | None] = [None] * n
        self.attempts = [0] * n
        self.last_error: list[RaftStateError | None] = [None] * n
        # The client's seq memory before this call, to undo for devices whose
        # every item was refused as invalid (as a unary heartbeat does).
        self.previous: dict[str, int | None] = {}

    def prepare(self) -> list[int]:
        """Fix seqs, validate; return the indexes to send."""
        client = self.client
        todo = []
        for i, it in enumerate(self.items):
            self.previous.setdefault(it.device_id, client._last_seq.get(it.device_id))
            try:
                validate_heartbeat(
                    it.device_id, 1 if it.seq is None else it.seq, it.reported, it.ttl_s or 0
                )
            except InvalidArgument as err:
                self.results[i] = BatchResult(
                    it.device_id,
                    it.seq or 0,
                    None,
                    InvalidArgument(f"heartbeats[{i}].{err.field}", err.problem),
                )
                continue
            if it.seq is None:
                seq = client.next_seq(it.device_id)
            else:
                seq = it.seq
                client._note_seq(it.device_id, seq)
            self.requests[i] = device_pb2.HeartbeatRequest(
                device_id=it.device_id, seq=seq, reported=dict(it.reported), ttl_s=it.ttl_s or 0
            )
            todo.append(i)
        return todo

    def settle(self, i: int, ack: HeartbeatAck | None, err: RaftStateError | None) -> None:
        req = self.requests[i]
        assert req is not None
        self.results[i] = BatchResult(req.device_id, req.seq, ack, err)

    def undo_refused_seqs(self) -> None:
        refused: dict[str, bool] = {}
        for r in self.results:
            if r is not None:
                invalid = isinstance(r.error, InvalidArgument)
                refused[r.device_id] = refused.get(r.device_id, True) and invalid
        for device_id, all_invalid in refused.items():
            if all_invalid:
                before = self.previous.get(device_id)
                if before is None:
                    self.client._last_seq.pop(device_id, None)
                else:
                    self.client._last_seq[device_id] = before


async def heartbeat_batch(
    client: ClientCore,
    items: Sequence[ItemLike],
    *,
    deadline_s: float | None = None,
) -> list[BatchResult]:
    """See :meth:`AsyncDeviceClient.heartbeat_batch` and the module docstring."""
    call = _Call(client, items)
    todo = call.prepare()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (deadline_s if deadline_s is not None else client.deadline_s)
    sizes = [call.requests[i].ByteSize() for i in todo]  # type: ignore[union-attr]
    limit = MAX_BATCH_REQUEST_BYTES - _REQUEST_SLACK
    for chunk in plan_chunks(sizes, client.max_batch, limit):
        await _send_chunk(call, [todo[k] for k in chunk], deadline)
    call.undo_refused_seqs()
    return [r for r in call.results if r is not None]


async def _send_chunk(call: _Call, pending: list[int], deadline: float) -> None:
    client = call.client
    loop = asyncio.get_running_loop()
    rounds = 0
    while pending:
        if len(pending) > client.max_batch:  # a node told us of a smaller limit
            half = client.max_batch
            await _send_chunk(call, pending[:half], deadline)
            pending = pending[half:]
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            _give_up(call, pending)
            return
        request = device_pb2.HeartbeatBatchRequest(
            heartbeats=[call.requests[i] for i in pending]  # type: ignore[misc]
        )
        for i in pending:
            call.attempts[i] += 1
        try:
            response = await client._with_retries(_attempt(client, request), remaining)
        except InvalidArgument as err:
            if err.field == "heartbeats" and len(pending) > 1:
                client.max_batch = max(1, len(pending) // 2)
                continue
            for i in pending:
                call.settle(i, None, err)
            return
        except RaftStateError as err:  # not retriable, or retried until the deadline
            for i in pending:
                call.settle(i, None, err)
            return
        pending, progressed = _absorb(call, pending, response)
        if not pending:
            return
        if not progressed:
            client._leader = None  # nothing settled: look for the leader again
            client._next += 1
        # Never sooner than the longest RetryInfo delay among those to resend.
        errs = [call.last_error[i] for i in pending]
        slowest = max(errs, key=lambda e: -1.0 if e is None else e.retry_delay_s or 0.0)
        delay = client.backoff.after(rounds, slowest)
        rounds += 1
        if loop.time() + delay >= deadline:
            _give_up(call, pending)
            return
        client.retries += 1
        await asyncio.sleep(delay)


def _attempt(client: ClientCore, request: device_pb2.HeartbeatBatchRequest) -> Any:
    async def attempt(channel: grpc.aio.Channel, timeout: float) -> Any:
        return await device_pb2_grpc.DeviceStateServiceStub(channel).HeartbeatBatch(
            request, timeout=timeout, metadata=client._metadata
        )

    return attempt


def _absorb(
    call: _Call, pending: list[int], response: device_pb2.HeartbeatBatchResponse
) -> tuple[list[int], bool]:
    """Settle what ``response`` answers; return (indexes to send again,
    whether anything settled). A response that does not answer the request
    one for one, in order, settles nothing: every item is sent again."""
    acks = response.acks
    if len(acks) != len(pending) or any(
        a.device_id != call.requests[i].device_id or a.seq != call.requests[i].seq  # type: ignore[union-attr]
        for a, i in zip(acks, pending, strict=False)
    ):
        broken = Unavailable(
            f"the node answered {len(acks)} acks for {len(pending)} heartbeats out of order "
            "(outcome unknown)"
        )
        for i in pending:
            call.last_error[i] = broken
        return pending, False
    again = []
    for ack, i in zip(acks, pending, strict=True):
        if ack.code == 0:
            r = ack.result
            call.settle(
                i,
                HeartbeatAck(
                    ack.device_id, ack.seq, r.revision, r.duplicate, r.stored_seq, call.attempts[i]
                ),
                None,
            )
            continue
        err: RaftStateError = decode(
            _CODES.get(ack.code, grpc.StatusCode.UNKNOWN), ack.message, ack.details
        )
        if isinstance(err, InvalidArgument) and err.field.startswith("heartbeats["):
            # The node numbers the request's heartbeats; name the caller's item.
            rest = err.field.partition("]")[2]
            err = InvalidArgument(f"heartbeats[{i}]{rest}", err.problem)
        if retry_allowed(err, caller_cancelling=False):
            call.last_error[i] = err
            again.append(i)
        else:
            call.settle(i, None, err)
    return again, len(again) < len(pending)


def _give_up(call: _Call, pending: list[int]) -> None:
    for i in pending:
        last = call.last_error[i]
        n = call.attempts[i]
        if last is None or isinstance(last, DeadlineExceeded):
            err: RaftStateError = DeadlineExceeded(
                f"no ack within the deadline after {n} sends (outcome unknown; "
                "sending again with the same seq is safe)"
            )
        else:
            err = Unavailable(f"gave up after {n} sends: {last.message}")
            err.reason = last.reason
        call.settle(i, None, err)
