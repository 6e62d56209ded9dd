"""AsyncDeviceClient: the asyncio device SDK.

Theory of operation
-------------------
* **Finding the leader.** The client knows a list of endpoints. It asks them
  for ``ClusterService.Status`` and sends requests to the leader's gRPC address,
  which saves the follower-to-leader hop. Any node would do: followers
  forward writes to the leader over the Raft transport.
* **Retrying safely.** ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, a
  ``CANCELLED`` from the server (a node restarting mid-call) and a
  per-attempt ``DEADLINE_EXCEEDED`` are retried with exponential backoff and
  full jitter, on the next endpoint, until one overall deadline. Everything
  else (``INVALID_ARGUMENT``, ``NOT_FOUND``) is raised at once, and a
  cancellation the caller requested (its task cancelled) is never retried.
* **Never applying a heartbeat twice.** A heartbeat's seq is fixed before
  the first attempt and every retry re-sends the same seq. The cluster
  applies a given ``(device_id, seq)`` at most once and answers a repeat as a
  duplicate; a duplicate whose ``stored_seq`` equals our seq is our own
  earlier attempt, so the heartbeat is acknowledged.
* **Choosing seqs.** Unless the caller passes one, seq is
  ``max(previous + 1, unix time in microseconds)``: strictly increasing per
  device within a process, and still increasing across restarts of the
  device as long as its clock does not step back by more than the gap.

All methods raise subclasses of :class:`raftstate.errors.RaftStateError`.
Use one client per event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from raftstate.admission import (
    DEFAULT_BATCH_RPC_MAX_HEARTBEATS,
    MAX_BATCH_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
)
from raftstate.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotLeader,
    PermissionDenied,
    RaftStateError,
    RevisionCompacted,
    Unavailable,
)
from raftstate.model import (
    Consistency,
    OnlineFilter,
    validate_device_id,
    validate_seq_ttl,
)
from raftstate.richstatus import decode_trailer
from raftstate.sdk.batch import heartbeat_batch
from raftstate.sdk.core import check_size
from raftstate.sdk.credentials import Credentials, resolve
from raftstate.sdk.retry import Backoff, retry_allowed
from raftstate.sdk.stream import HeartbeatStream
from raftstate.sdk.types import (
    BatchItem,
    BatchResult,
    ClusterStatus,
    DeleteResult,
    Device,
    DevicePage,
    EventKind,
    HeartbeatAck,
    Listing,
)
from raftstate.sdk.watch import Watch
from raftstate.v1 import cluster_pb2, cluster_pb2_grpc, device_pb2, device_pb2_grpc

T = TypeVar("T")

DEFAULT_DEADLINE_S = 10.0
DEFAULT_ATTEMPT_TIMEOUT_S = 2.0


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """Accept ``"h:p,h:p"`` or a list; raise ``ValueError`` when empty."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip() for e in items if e.strip()]
    if not out:
        raise ValueError("endpoints: at least one host:port is required")
    return out


class AsyncDeviceClient:
    """Device SDK for asyncio. Create inside the loop that will use it."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S,
        backoff: Backoff | None = None,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        prefer_leader: bool = True,
        credentials: Credentials | None = None,
        ca: str | bytes | None = None,
        cert: str | bytes | None = None,
        key: str | bytes | None = None,
        token: str | None = None,
    ) -> None:
        """``prefer_leader=False`` keeps requests on the endpoints in the given
        order (the first is the "nearest"), moving on only when one fails:
        writes are then forwarded by that node, and linearizable reads are
        served there through ReadIndex, spreading read load.

        Credentials (:mod:`raftstate.sdk.credentials`): ``ca`` (the cluster
        CA), ``token`` or ``cert``+``key`` (paths or PEM bytes), or a
        ``credentials`` object; with none given, ``RAFTSTATE_CA`` /
        ``RAFTSTATE_TOKEN`` / ``RAFTSTATE_CERT`` / ``RAFTSTATE_KEY`` are read.
        Finding the leader needs ``ClusterService.Status`` (operator role); a device
        or gateway credential is refused it, and the client then sends to its
        endpoints in order (followers forward writes)."""
        self.endpoints = parse_endpoints(endpoints)
        self.credentials = resolve(credentials, ca=ca, cert=cert, key=key, token=token)
        self._metadata = self.credentials.metadata()
        # A client-certificate endpoint is the node's mTLS port; the leader's
        # address in Status is its token port, so keep to our endpoints.
        self.prefer_leader = prefer_leader and not self.credentials.uses_client_cert
        self.deadline_s = deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.backoff = backoff or Backoff()
        self._clock_us = clock_us
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._leader: str | None = None
        self._next = 0
        self._last_seq: dict[str, int] = {}
        self.retries = 0
        #: Heartbeats per HeartbeatBatch request; lowered when a node says
        #: its ``batch_rpc_max_heartbeats`` is smaller.
        self.max_batch = DEFAULT_BATCH_RPC_MAX_HEARTBEATS

    async def __aenter__(self) -> AsyncDeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel. Idempotent."""
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    # ---- public calls -----------------------------------------------------

    def next_seq(self, device_id: str) -> int:
        """The seq the next automatic heartbeat of ``device_id`` will use."""
        seq = max(self._last_seq.get(device_id, 0) + 1, self._clock_us())
        self._last_seq[device_id] = seq
        return seq

    async def heartbeat(
        self,
        device_id: str,
        reported: Mapping[str, str],
        *,
        seq: int | None = None,
        ttl_s: int | None = None,
        deadline_s: float | None = None,
    ) -> HeartbeatAck:
        """Commit one heartbeat; return once a majority has it.

        Raises ``InvalidArgument`` (never retried), or ``Unavailable`` /
        ``DeadlineExceeded`` when the deadline passes without an answer (the
        outcome is then unknown; calling again with the same seq is safe).
        """
        validate_seq_ttl(seq, ttl_s)
        previous = self._last_seq.get(device_id)
        if seq is None:
            validate_device_id(device_id)
            seq = self.next_seq(device_id)
        else:
            self._last_seq[device_id] = max(self._last_seq.get(device_id, 0), seq)
        request = device_pb2.HeartbeatRequest(
            device_id=device_id, seq=seq, reported=dict(reported), ttl_s=ttl_s or 0
        )
        check_size(request)
        attempts = 0

        async def attempt(channel: grpc.aio.Channel, timeout: float) -> Any:
            nonlocal attempts
            attempts += 1
            return await device_pb2_grpc.DeviceStateServiceStub(channel).Heartbeat(
                request, timeout=timeout, metadata=self._metadata
            )

        try:
            res = await self._with_retries(attempt, deadline_s)
        except InvalidArgument:
            # Refused (e.g. a seq too far ahead): nothing was written, so it
            # must not push this client's automatic seqs past it.
            if previous is None:
                self._last_seq.pop(device_id, None)
            else:
                self._last_seq[device_id] = previous
            raise
        return HeartbeatAck(device_id, seq, res.revision, res.duplicate, res.stored_seq, attempts)

    async def heartbeat_batch(
        self,
        items: Sequence[BatchItem | tuple[str, Mapping[str, str]]],
        *,
        deadline_s: float | None = None,
    ) -> list[BatchResult]:
        """Commit many devices' heartbeats with ``HeartbeatBatch`` calls; one
        :class:`~raftstate.sdk.types.BatchResult` per item, in order.

        Any number of items: they are sent in requests of at most
        ``max_batch`` heartbeats and 4 MiB. Items are given as
        :class:`~raftstate.sdk.types.BatchItem` or ``(device_id, reported)``.
        Only items that failed with a retriable code are sent again, with
        the same seq, until ``deadline_s`` (default: the client's) covering
        the whole call; see :mod:`raftstate.sdk.batch`. Per-item problems
        are results, not exceptions; raises ``ValueError`` for an item that
        is neither form."""
        return await heartbeat_batch(self, items, deadline_s=deadline_s)

    def stream(self, *, max_in_flight: int = 256, endpoint: str | None = None) -> HeartbeatStream:
        """A :class:`~raftstate.sdk.stream.HeartbeatStream`: heartbeats of many
        devices pipelined on one gRPC stream, with the same retry, seq and
        deadline rules as :meth:`heartbeat`. Use as ``async with``.

        At most ``max_in_flight`` sends are in progress at once (more wait).
        ``endpoint`` pins the first connection to that node (a gateway's
        nearest node); otherwise the stream goes to the leader. Raises
        ``ValueError`` if ``max_in_flight`` is below 1.
        """
        return HeartbeatStream(self, max_in_flight=max_in_flight, endpoint=endpoint)

    def _note_seq(self, device_id: str, seq: int) -> None:
        """Remember a caller-chosen seq so later automatic seqs exceed it."""
        self._last_seq[device_id] = max(self._last_seq.get(device_id, 0), seq)

    async def get(
        self,
        device_id: str,
        consistency: Consistency = Consistency.LINEARIZABLE,
        *,
        at_revision: int = 0,
        deadline_s: float | None = None,
    ) -> Device:
        """Read one device (as of store revision ``at_revision``, if given).
        Raises ``NotFound`` if it does not exist (as of that revision),
        ``RevisionCompacted`` / ``FutureRevision`` for a revision the node
        does not retain / has not reached."""
        request = device_pb2.GetDeviceRequest(
            device_id=device_id,
            consistency=device_pb2.Consistency.ValueType(consistency),
            at_revision=at_revision,
        )

        async def attempt(channel: grpc.aio.Channel, timeout: float) -> Any:
            return await device_pb2_grpc.DeviceStateServiceStub(channel).GetDevice(
                request, timeout=timeout, metadata=self._metadata
            )

        res = await self._with_retries(attempt, deadline_s)
        return Device.from_proto(res.device)

    async def list(
        self,
        prefix: str = "",
        *,
        online: OnlineFilter = OnlineFilter.ALL,
        page_size: int = 100,
        page_token: str = "",
        consistency: Consistency = Consistency.LINEARIZABLE,
        at_revision: int = 0,
        deadline_s: float | None = None,
    ) -> DevicePage:
        """One page of devices in id order; pass ``next_page_token`` back for
        more (and the first page's ``revision`` as ``at_revision`` to see
        every page as of one revision). Raises ``RevisionCompacted`` /
        ``FutureRevision`` for a revision the node does not serve."""
        request = device_pb2.ListDevicesRequest(
            prefix=prefix,
            page_size=page_size,
            page_token=page_token,
            filter=device_pb2.OnlineFilter.ValueType(online),
            consistency=device_pb2.Consistency.ValueType(consistency),
            at_revision=at_revision,
        )

        async def attempt(channel: grpc.aio.Channel, timeout: float) -> Any:
            stub = device_pb2_grpc.DeviceStateServiceStub(channel)
            return await stub.ListDevices(request, timeout=timeout, metadata=self._metadata)

        res = await self._with_retries(attempt, deadline_s)
        return DevicePage(
            tuple(Device.from_proto(d) for d in res.devices), res.next_page_token, res.revision
        )

    async def iter_devices(self, prefix: str = "", **kwargs: Any) -> AsyncIterator[Device]:
        """Every matching device, fetching pages as needed."""
        token = ""
        while True:
            page = await self.list(prefix, page_token=token, **kwargs)
            for d in page.devices:
                yield d
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch(
        self,
        *,
        prefix: str = "",
        device_ids: Sequence[str] = (),
        kinds: Sequence[EventKind] = (),
        start_revision: int = 0,
        prev_device: bool = False,
        progress_interval_ms: int = 0,
        retry_s: float = 60.0,
    ) -> Watch:
        """Follow committed changes (operator or admin credential): an async
        iterator of ``WatchEvent`` in revision order, each once, resuming on
        another endpoint after a failure (raftstate/sdk/watch.py). Use
        ``async with client.watch(...) as w: async for ev in w``.
        ``start_revision`` 0: changes from now on. Raises ``ResyncRequired``
        when no endpoint retains the revision it needs, ``InvalidArgument``
        naming the field, ``PermissionDenied``; ``Unavailable`` after
        ``retry_s`` seconds without reaching a node."""
        return Watch(
            self,
            prefix=prefix,
            device_ids=device_ids,
            kinds=kinds,
            start_revision=start_revision,
            prev_device=prev_device,
            progress_interval_ms=progress_interval_ms,
            retry_s=retry_s,
        )

    async def list_all(
        self,
        prefix: str = "",
        *,
        page_size: int = 1000,
        deadline_s: float | None = None,
    ) -> Listing:
        """Every device whose id starts with ``prefix``, all pages read at one
        revision (the first page's; linearizable). A listing that outlives
        the nodes' retained history starts over."""
        while True:
            page = await self.list(prefix, page_size=page_size, deadline_s=deadline_s)
            devices = list(page.devices)
            revision = page.revision
            try:
                while page.next_page_token:
                    page = await self.list(
                        prefix,
                        page_size=page_size,
                        page_token=page.next_page_token,
                        at_revision=revision,
                        deadline_s=deadline_s,
                    )
                    devices.extend(page.devices)
            except RevisionCompacted:
                continue
            return Listing(tuple(devices), revision)

    async def list_then_watch(
        self,
        prefix: str = "",
        *,
        kinds: Sequence[EventKind] = (),
        prev_device: bool = False,
        page_size: int = 1000,
        progress_interval_ms: int = 0,
        retry_s: float = 60.0,
    ) -> tuple[Listing, Watch]:
        """The resync helper: every device with ``prefix`` as of one revision
        R (:meth:`list_all`), and a watch from R + 1. Applying the watch's
        events to the listing gives exactly the store's state at each event's
        revision. After ``ResyncRequired``, call it again."""
        listing = await self.list_all(prefix, page_size=page_size)
        watch = self.watch(
            prefix=prefix,
            kinds=kinds,
            start_revision=listing.revision + 1,
            prev_device=prev_device,
            progress_interval_ms=progress_interval_ms,
            retry_s=retry_s,
        )
        return listing, watch

    async def status(self, endpoint: str | None = None, *, timeout_s: float = 2.0) -> ClusterStatus:
        """``ClusterService.Status`` of one node (default: the preferred endpoint).
        Raises the mapped error; not retried."""
        target = endpoint or self._pick()
        stub = cluster_pb2_grpc.ClusterServiceStub(self._channel(target))
        try:
            res = await stub.Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise _map(e) from None
        return ClusterStatus.from_proto(res)

    async def delete(self, device_id: str, *, deadline_s: float | None = None) -> DeleteResult:
        """Delete a device (operator or admin credential). Idempotent: a
        device that does not exist gives ``deleted=False``. Raises
        ``PermissionDenied`` for other roles."""
        validate_device_id(device_id)
        request = device_pb2.DeleteDeviceRequest(device_id=device_id)

        async def attempt(channel: grpc.aio.Channel, timeout: float) -> Any:
            stub = device_pb2_grpc.DeviceStateServiceStub(channel)
            return await stub.DeleteDevice(request, timeout=timeout, metadata=self._metadata)

        res = await self._with_retries(attempt, deadline_s)
        return DeleteResult(device_id, res.deleted, res.revision, res.deleted_seq)

    async def find_leader(self, *, timeout_s: float = 2.0) -> str | None:
        """Ask every endpoint for the leader; remember and return its address."""
        results = await asyncio.gather(
            *(self.status(e, timeout_s=timeout_s) for e in self.endpoints), return_exceptions=True
        )
        for st in results:
            if isinstance(st, ClusterStatus) and st.leader_grpc_address:
                self._leader = st.leader_grpc_address
                return self._leader
        if any(isinstance(st, PermissionDenied) for st in results):
            self.prefer_leader = False  # a device credential: do not ask again
        return None

    # ---- retry machinery --------------------------------------------------

    async def _with_retries(
        self,
        attempt: Callable[[grpc.aio.Channel, float], Any],
        deadline_s: float | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (deadline_s if deadline_s is not None else self.deadline_s)
        if self._leader is None and self.prefer_leader:
            await self.find_leader(timeout_s=min(0.5, self.attempt_timeout_s))
        n = 0
        #: The reason of the last answer a server gave (an attempt that timed
        #: out has none): what the caller is told when the deadline runs out.
        last_reason = ""
        while True:
            endpoint = self._pick()
            remaining = deadline - loop.time()
            try:
                return await attempt(
                    self._channel(endpoint), max(0.001, min(self.attempt_timeout_s, remaining))
                )
            except grpc.aio.AioRpcError as e:
                err = _map(e)
            if not retry_allowed(err, caller_cancelling=_cancelling()):
                raise err
            last_reason = err.reason or last_reason
            self._on_retriable(endpoint, err)
            delay = self.backoff.after(n, err)
            n += 1
            if loop.time() + delay >= deadline:
                final: RaftStateError
                if isinstance(err, DeadlineExceeded):
                    final = DeadlineExceeded(
                        f"no answer within the deadline after {n} attempts: {err.message}"
                    )
                else:
                    final = Unavailable(f"gave up after {n} attempts: {err.message}")
                # The last answer's reason (NO_LEADER, LIMIT_..., ...) says why,
                # also when the final attempt timed out without one.
                final.reason = last_reason
                raise final
            self.retries += 1
            await asyncio.sleep(delay)

    def _on_retriable(self, endpoint: str, err: RaftStateError) -> None:
        if self.prefer_leader and isinstance(err, NotLeader) and err.leader_hint:
            self._leader = err.leader_hint
            return
        # Something is wrong with this endpoint or its view; move on and
        # re-learn the leader on the next endpoint we reach.
        if endpoint == self._leader:
            self._leader = None
        self._next += 1

    def _pick(self) -> str:
        if self._leader is not None and self.prefer_leader:
            return self._leader
        return self.endpoints[self._next % len(self.endpoints)]

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self.credentials.aio_channel(
                endpoint,
                options=[
                    ("grpc.enable_retries", 0),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                    # The node's limits (raftstate/admission.py), set deliberately.
                    ("grpc.max_send_message_length", MAX_BATCH_REQUEST_BYTES),
                    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                ],
            )
            self._channels[endpoint] = ch
        return ch


def _cancelling() -> bool:
    """True if the running task is being cancelled by its caller."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _map(e: grpc.aio.AioRpcError) -> RaftStateError:
    """The error of a failed call, with the reason, field and retry delay of
    its ``google.rpc.Status`` details (``raftstate.richstatus``)."""
    return decode_trailer(e.code(), e.details() or "", e.trailing_metadata())
