"""What the stream and batch helpers need of a client, and the request-size
check they share with it.

Theory of operation. :class:`~raftstate.sdk.client.AsyncDeviceClient` owns the
channels, the leader guess, the seqs and the retry loop;
:mod:`raftstate.sdk.stream` and :mod:`raftstate.sdk.batch` drive requests
through those. They type the client as :class:`ClientCore`, a structural
protocol defined here, so the import graph is a tree: ``client`` imports
``stream`` and ``batch``, and neither imports ``client`` (not even lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import grpc

from raftstate.admission import MAX_REQUEST_BYTES
from raftstate.errors import InvalidArgument, RaftStateError
from raftstate.model import validate_heartbeat
from raftstate.sdk.retry import Backoff
from raftstate.v1 import device_pb2


class ClientCore(Protocol):
    """The part of ``AsyncDeviceClient`` that streams and batches use."""

    endpoints: list[str]
    deadline_s: float
    attempt_timeout_s: float
    backoff: Backoff
    retries: int
    max_batch: int
    _metadata: tuple[tuple[str, str], ...]
    _leader: str | None
    _next: int
    _last_seq: dict[str, int]

    def next_seq(self, device_id: str) -> int: ...

    def _note_seq(self, device_id: str, seq: int) -> None: ...

    async def find_leader(self, *, timeout_s: float = 2.0) -> str | None: ...

    async def _with_retries(
        self, attempt: Callable[[grpc.aio.Channel, float], Any], deadline_s: float | None
    ) -> Any: ...

    def _on_retriable(self, endpoint: str, err: RaftStateError) -> None: ...

    def _pick(self) -> str: ...

    def _channel(self, endpoint: str) -> grpc.aio.Channel: ...


def check_size(
    request: device_pb2.HeartbeatRequest | device_pb2.HeartbeatStreamRequest,
) -> None:
    """Raise ``InvalidArgument`` for a request too big for any node to read
    (which gRPC would refuse as RESOURCE_EXHAUSTED, a status we retry); such
    a heartbeat is always invalid, and validation names the field."""
    if request.ByteSize() > MAX_REQUEST_BYTES:
        r = request
        validate_heartbeat(r.device_id, r.seq, r.reported, r.ttl_s)
        raise InvalidArgument("request", f"larger than {MAX_REQUEST_BYTES} bytes")
