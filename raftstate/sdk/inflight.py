"""Bookkeeping for one heartbeat stream: what was written and not yet acked.

Pure data: no I/O and no clock. The server acknowledges stream messages in
request order, so acks are matched first-in-first-out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from raftstate.errors import RaftStateError, Unavailable
from raftstate.sdk.types import HeartbeatAck
from raftstate.v1 import device_pb2


@dataclass(slots=True, eq=False)
class Outgoing:
    """One heartbeat from ``send`` until its future is resolved."""

    request: device_pb2.HeartbeatStreamRequest
    device_id: str
    seq: int
    deadline: float
    future: asyncio.Future[HeartbeatAck]
    attempts: int = 0  # times written to a stream
    failures: int = 0  # retriable per-message errors, for backoff
    sent_at: float = 0.0
    last_error: RaftStateError | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class InFlight:
    """The FIFO of messages written to one stream and not yet acknowledged.

    Pure bookkeeping: no I/O, no clock. The server acknowledges in request
    order, so :meth:`match` pops the head and checks it is the one acked.
    """

    def __init__(self) -> None:
        self._queue: deque[Outgoing] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def sent(self, msg: Outgoing) -> None:
        """Record ``msg`` as written (call before writing it)."""
        self._queue.append(msg)

    def head(self) -> Outgoing | None:
        return self._queue[0] if self._queue else None

    def match(self, device_id: str, seq: int) -> Outgoing:
        """The message this ack answers; raises ``Unavailable`` naming the
        protocol error (the head is left in place) when it does not match."""
        if not self._queue:
            raise Unavailable(f"protocol error: ack for {device_id}/{seq} with nothing in flight")
        msg = self._queue[0]
        if msg.device_id != device_id or msg.seq != seq:
            raise Unavailable(
                f"protocol error: ack for {device_id}/{seq}, expected {msg.device_id}/{msg.seq}"
            )
        return self._queue.popleft()

    def take_all(self) -> list[Outgoing]:
        """Empty the FIFO, returning its messages oldest first."""
        out = list(self._queue)
        self._queue.clear()
        return out
