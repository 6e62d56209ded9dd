"""gRPC services: DeviceStateService, ClusterService and the standard health service.

Every handler validates its request before touching Raft and lets
:class:`~raftstate.errors.RaftStateError` propagate; :func:`_abort` is the one
place that turns those into gRPC statuses. Handlers run on the node's event
loop; they never block it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from raftstate import richstatus, stallprobe
from raftstate.admission import (
    BATCH_METHOD,
    LIST_PAGE_BUDGET_BYTES,
    STREAM_WINDOW_KEY,
    fit_page,
    quota_error,
)
from raftstate.authn import CURRENT_IDENTITY
from raftstate.authz import DEVICE_SERVICE, Identity, authorize
from raftstate.authz import Role as AuthRole
from raftstate.config import NodeConfig
from raftstate.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    Unavailable,
)
from raftstate.linktiming import Timing
from raftstate.model import (
    DEVICE_ID_MAX,
    DEVICE_ID_RE,
    Consistency,
    DeviceView,
    Heartbeat,
    HeartbeatResult,
    validate_consistency,
    validate_device_id,
    validate_filter,
    validate_heartbeat,
    validate_page_size,
)
from raftstate.proposer import Outcome, Proposer
from raftstate.raftnode import SUCCESS, RaftNode, Role
from raftstate.reads import ReadFailed, ReadIndexDriver
from raftstate.statemachine import ControlResult, DeviceTable, encode_delete
from raftstate.v1 import cluster_pb2, cluster_pb2_grpc, device_pb2, device_pb2_grpc
from raftstate.watchhub import WatchHub
from raftstate.watchserve import serve_watch, validate_watch

log = logging.getLogger("raftstate.server")

#: The server gives up 10% of the caller's remaining time (at least 50 ms, at
#: most 500 ms) before its deadline, so the caller receives our UNAVAILABLE
#: ("no leader", "not committed") rather than a bare DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.05
DEADLINE_MARGIN_MAX_S = 0.5

READ_RETRY_S = 0.02

STREAM_METHOD = DEVICE_SERVICE + "HeartbeatStream"

R = TypeVar("R")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _abort(context: grpc.aio.ServicerContext, err: RaftStateError) -> None:
    """The single mapping from our errors to gRPC statuses: code, message
    and the ``google.rpc.Status`` details (``raftstate.richstatus``)."""
    await context.abort(err.grpc_code, err.message, richstatus.trailing_metadata(err))


def _unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except RaftStateError as err:
            await _abort(context, err)
            raise AssertionError("unreachable: abort raises") from err

    return wrapper


class NodeServices:
    """State shared by the servicers of one node."""

    def __init__(
        self,
        cfg: NodeConfig,
        table: DeviceTable,
        raft: RaftNode,
        proposer: Proposer,
        reads: ReadIndexDriver,
    ):
        self.cfg = cfg
        self.table = table
        self.raft = raft
        self.proposer = proposer
        self.reads = reads
        self.members_by_raft = {m.raft: m for m in cfg.members}
        #: Called for each PERMISSION_DENIED a handler decides itself (stream
        #: messages); the node points it at RpcGuard.log_denied.
        self.on_denied: Callable[[str, Identity, PermissionDenied], None] = lambda *a: None
        #: The node's watch hub (raftstate/watchhub.py); None: Watch is UNAVAILABLE.
        self.hub: WatchHub | None = None

    async def propose_control(self, command: bytes, budget: float, what: str) -> ControlResult:
        """Commit one ``ControlCommand`` (built by ``statemachine.encode_*``)
        and return its result as applied on this node. Failed proposals (no
        leader, leadership changed) are retried until ``budget`` seconds have
        passed, then ``Unavailable``: control commands are idempotent."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        while True:
            fut: asyncio.Future[tuple[ControlResult | None, int]] = loop.create_future()

            def done(result: ControlResult | None, err: int, fut: Any = fut) -> None:
                def settle() -> None:
                    if not fut.done():
                        fut.set_result((result, err))

                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:  # loop closed during shutdown
                    pass

            self.raft.propose_control(command, done)
            remaining = end - loop.time()
            try:
                result, err = await asyncio.wait_for(fut, max(0.0, remaining))
            except TimeoutError:
                result, err = None, -1
            if err == SUCCESS and result is not None:
                return result
            if loop.time() + READ_RETRY_S >= end:
                if self.raft.leader_raft_address() is None:
                    raise Unavailable(
                        f"no leader elected; {what} not committed in time", "NO_LEADER"
                    )
                raise Unavailable(f"{what} not committed in time (retrying is safe)", "NO_QUORUM")
            await asyncio.sleep(READ_RETRY_S)

    def budget(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds this request may take, from its deadline or the default."""
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return self.cfg.default_request_timeout_ms / 1000
        margin = min(DEADLINE_MARGIN_MAX_S, max(DEADLINE_MARGIN_S, 0.1 * remaining))
        return max(0.0, remaining - margin)

    def validate(
        self, request: device_pb2.HeartbeatRequest | device_pb2.HeartbeatStreamRequest
    ) -> Heartbeat:
        """The request as a checked heartbeat, its seq checked against this
        node's clock (``max_seq_ahead_s``). Raises ``InvalidArgument``."""
        return validate_heartbeat(
            request.device_id,
            request.seq,
            request.reported,
            request.ttl_s,
            now_us=time.time_ns() // 1000,
            max_seq_ahead_s=self.cfg.max_seq_ahead_s,
        )

    def check_quota(self, hb: Heartbeat) -> None:
        """Refuse early, with ``QuotaExceeded``, a heartbeat that the local
        table already shows over a quota. The log entry's check at apply time
        is the one that counts; this one saves proposing what will fail."""
        quota = self.proposer.quota
        if quota.max_devices or quota.max_state_bytes:
            size = len(hb.device_id) + hb.reported_bytes  # ids are ASCII
            refused = self.table.quota_refusal(quota, hb.device_id, size)
            if refused is not None:
                raise quota_error(quota, refused, hb.device_id)

    def leader_hint(self) -> str:
        addr = self.raft.leader_raft_address()
        member = self.members_by_raft.get(addr) if addr else None
        return member.grpc if member else ""

    async def wait_committed(
        self, fut: asyncio.Future[HeartbeatResult], budget: float, what: str
    ) -> HeartbeatResult:
        """Await a proposer future for at most ``budget`` seconds.

        Raises ``Unavailable`` on timeout; the message says whether a leader
        is known, because that is what the operator needs to look at."""
        try:
            return await asyncio.wait_for(fut, budget)
        except TimeoutError:
            raise self.not_committed(what) from None

    def not_committed(self, what: str) -> Unavailable:
        """The error for a write not committed within its budget."""
        if self.raft.leader_raft_address() is None:
            return Unavailable(f"no leader elected; {what} not committed in time", "NO_LEADER")
        return Unavailable(
            f"{what} not committed in time (outcome unknown; retrying with the same seq is safe)",
            "NO_QUORUM",
        )

    async def read_fence(self, consistency: Consistency, budget: float) -> None:
        """Make the local table fit for a read of the given consistency.

        LINEARIZABLE: ReadIndex (``raftstate.reads``): the leader confirms
        with a quorum round that started after the read arrived, and this
        node waits until it has applied the leader's commit index from that
        moment; everything acknowledged before the read is then visible
        locally. Failed attempts (no leader yet, leadership moving) are
        retried until the deadline, then ``Unavailable``. SERIALIZABLE:
        nothing, unless this node's Raft ticks are failing or it is catching
        up after lost data: then ``Unavailable`` (its table may be far behind)."""
        if consistency is Consistency.SERIALIZABLE:
            problem = self.raft.health_problem()
            if problem:
                raise Unavailable(
                    f"this node cannot serve local reads now: {problem}", "NODE_NOT_READY"
                )
            return
        if self.cfg.unsafe_serve_local_reads:
            return
        end = time.monotonic() + budget
        while True:
            remaining = end - time.monotonic()
            if remaining > 0:
                try:
                    await asyncio.wait_for(self.reads.read(end), remaining)
                    return
                except ReadFailed:
                    await asyncio.sleep(min(READ_RETRY_S, max(0.0, end - time.monotonic())))
                    continue
                except TimeoutError:
                    pass
            if self.raft.leader_raft_address() is None:
                raise Unavailable(
                    "no leader elected; linearizable read not served in time", "NO_LEADER"
                )
            raise Unavailable(
                "leadership could not be confirmed by a quorum in time; "
                "linearizable read not served (a SERIALIZABLE read may be stale)",
                "NO_QUORUM",
            )


def _device_pb(view: DeviceView) -> device_pb2.Device:
    return device_pb2.Device(
        device_id=view.device_id,
        seq=view.seq,
        reported=view.reported,
        revision=view.revision,
        first_seen_ms=view.first_seen_ms,
        last_seen_ms=view.last_seen_ms,
        heartbeats=view.heartbeats,
        ttl_s=view.ttl_s,
        online=view.online,
        presence_changed_ms=view.presence_changed_ms,
    )


def _result_pb(res: HeartbeatResult) -> device_pb2.HeartbeatResponse:
    return device_pb2.HeartbeatResponse(
        revision=res.revision, duplicate=res.duplicate, stored_seq=res.stored_seq
    )


def encode_page_token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "is not a token from a previous response") from None
    try:
        return validate_device_id(raw, "page_token")
    except InvalidArgument:
        raise InvalidArgument("page_token", "is not a token from a previous response") from None


class DeviceStateService(device_pb2_grpc.DeviceStateServiceServicer):
    def __init__(self, node: NodeServices) -> None:
        self.node = node

    @_unary
    async def Heartbeat(  # noqa: N802 - gRPC method name
        self, request: device_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HeartbeatResponse:
        if stallprobe.ENABLED:
            stallprobe.ARRIVALS.note(context.time_remaining())
        hb = self.node.validate(request)
        self.node.check_quota(hb)
        fut = self.node.proposer.submit(hb)
        res = await self.node.wait_committed(fut, self.node.budget(context), "heartbeat")
        return _result_pb(res)

    async def HeartbeatStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[device_pb2.HeartbeatStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[device_pb2.HeartbeatStreamResponse]:
        """Pipelined: requests are proposed as they arrive; acks go back in
        request order, one per request, each with its own status code.

        At most ``stream_window`` requests are read and not yet answered;
        beyond that the stream is not read (back-pressure through HTTP/2 flow
        control, nothing buffered here). The window goes to the client in
        the initial metadata (``STREAM_WINDOW_KEY``). A request that cannot
        be read (undecodable bytes) ends the stream with its error once the
        requests before it are answered."""
        window = self.node.cfg.stream_window
        slots = asyncio.Semaphore(window)
        queue: asyncio.Queue[
            tuple[device_pb2.HeartbeatStreamRequest, asyncio.Future[Any] | RaftStateError]
            | RaftStateError
            | None
        ] = asyncio.Queue()
        await context.send_initial_metadata(((STREAM_WINDOW_KEY, str(window)),))
        identity = CURRENT_IDENTITY.get()

        async def reader() -> None:
            requests = aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()
                    try:
                        req = await anext(requests)
                    except StopAsyncIteration:
                        break
                    outcome: asyncio.Future[Any] | RaftStateError
                    try:
                        hb = self.node.validate(req)
                        if identity is not None:
                            self._authorize_message(identity, hb.device_id)
                        self.node.check_quota(hb)
                        outcome = self.node.proposer.submit(hb)
                    except RaftStateError as err:
                        outcome = err
                    queue.put_nowait((req, outcome))
            except RaftStateError as err:
                queue.put_nowait(err)
                return
            except Exception as exc:  # the call broke under us; end the stream
                broken = Unavailable(f"reading the stream failed: {exc!r}", "STREAM_BROKEN")
                queue.put_nowait(broken)
                return
            queue.put_nowait(None)

        task = asyncio.create_task(reader())
        per_message = self.node.cfg.default_request_timeout_ms / 1000
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, RaftStateError):
                    raise item
                req, outcome = item
                ack = device_pb2.HeartbeatStreamResponse(device_id=req.device_id, seq=req.seq)
                try:
                    if isinstance(outcome, RaftStateError):
                        raise outcome
                    # Acks go out in order and entries commit many at once, so
                    # most futures are already resolved when their turn comes:
                    # take the result directly, without a wait_for (a task and
                    # a timer per message).
                    if outcome.done():
                        res = outcome.result()
                    else:
                        res = await self.node.wait_committed(outcome, per_message, "heartbeat")
                    result = ack.result
                    result.revision = res.revision
                    result.duplicate = res.duplicate
                    result.stored_seq = res.stored_seq
                except RaftStateError as err:
                    ack.code = err.grpc_code.value[0]
                    ack.message = err.message
                    ack.details.extend(richstatus.encode_details(err))
                yield ack
                slots.release()
            await task  # surfaces a reader failure, if any
        finally:
            task.cancel()
            # Heartbeats read but not yet answered when the stream ends (the
            # client went away): stop proposing them. Nobody will read their
            # acks, and the proposer would otherwise retry them until they
            # commit, however long the cluster is down.
            while not queue.empty():
                queued = queue.get_nowait()
                if isinstance(queued, tuple) and isinstance(queued[1], asyncio.Future):
                    queued[1].cancel()

    @_unary
    async def HeartbeatBatch(  # noqa: N802
        self, request: device_pb2.HeartbeatBatchRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HeartbeatBatchResponse:
        """Many devices' heartbeats; one ack per heartbeat, in request order.

        Request-level failures (the whole call): more than
        ``batch_rpc_max_heartbeats`` heartbeats (INVALID_ARGUMENT naming
        ``heartbeats``), and what the admission layer refuses (credentials,
        a role that may not write, size, ``max_concurrent_batch_rpcs``). An
        empty request is answered with an empty response. Everything else is
        per heartbeat, exactly as Heartbeat would answer it: INVALID_ARGUMENT
        naming ``heartbeats[i].<field>``; PERMISSION_DENIED for an id outside
        the credential's scope; RESOURCE_EXHAUSTED for a quota
        (``max_devices``/``max_state_bytes``) or when the node's
        ``max_pending_heartbeats`` has no room for it (the later heartbeats
        of the request are the ones refused); OK with the result (a
        duplicate for a seq already stored). All admitted heartbeats go to
        the proposer at once (one future for the call). Those not committed
        when the call's budget (its deadline less a margin) runs out are
        answered UNAVAILABLE (outcome unknown; the same seq may be retried)
        and are no longer proposed, so the gateway always gets the acks of
        those that did commit."""
        node = self.node
        items = request.heartbeats
        n = len(items)
        limit = node.cfg.batch_rpc_max_heartbeats
        if n > limit:
            raise InvalidArgument(
                "heartbeats",
                f"{n} heartbeats, at most {limit} per request (batch_rpc_max_heartbeats)",
            )
        response = device_pb2.HeartbeatBatchResponse()
        if n == 0:
            return response
        identity = CURRENT_IDENTITY.get()
        scoped = identity is not None and identity.role is not AuthRole.ADMIN
        outcomes: list[Outcome | None] = [None] * n
        admitted: list[Heartbeat] = []
        where: list[int] = []
        now_us = time.time_ns() // 1000
        ahead = node.cfg.max_seq_ahead_s
        denied: PermissionDenied | None = None
        for i, req in enumerate(items):
            try:
                hb = validate_heartbeat(
                    req.device_id,
                    req.seq,
                    req.reported,
                    req.ttl_s,
                    now_us=now_us,
                    max_seq_ahead_s=ahead,
                )
            except InvalidArgument as err:
                outcomes[i] = InvalidArgument(f"heartbeats[{i}].{err.field}", err.problem)
                continue
            try:
                if scoped and identity is not None:
                    authorize(identity, BATCH_METHOD, (hb.device_id,))
                node.check_quota(hb)
            except PermissionDenied as err:
                outcomes[i] = denied = err
                continue
            except QuotaExceeded as err:
                outcomes[i] = err
                continue
            admitted.append(hb)
            where.append(i)
        if denied is not None and identity is not None:
            node.on_denied(BATCH_METHOD, identity, denied)
        room = node.proposer.room
        if len(admitted) > room:
            full = ResourceExhausted(
                f"max_pending_heartbeats: this node has room for {room} more waiting "
                f"heartbeats, and this request brought {len(admitted)}; retry later"
            )
            for i in where[room:]:
                outcomes[i] = full
            del admitted[room:], where[room:]
        if admitted:
            try:
                group = node.proposer.submit_many(admitted)
            except RaftStateError as err:
                for i in where:
                    outcomes[i] = err
            else:
                try:
                    await asyncio.wait((group.future,), timeout=node.budget(context))
                finally:
                    group.cancel()  # stop proposing what did not commit in time
                late: Unavailable | None = None
                for i, res in zip(where, group.results, strict=True):
                    if res is None:
                        res = late = late or node.not_committed("heartbeat")
                    outcomes[i] = res
        acks = response.acks
        # Errors shared by many heartbeats (a full queue, a late commit) are
        # encoded once.
        details: dict[int, list[Any]] = {}
        for req, out in zip(items, outcomes, strict=True):
            ack = acks.add(device_id=req.device_id, seq=req.seq)
            if isinstance(out, HeartbeatResult):
                result = ack.result
                result.revision = out.revision
                result.duplicate = out.duplicate
                result.stored_seq = out.stored_seq
            elif out is not None:
                ack.code = out.grpc_code.value[0]
                ack.message = out.message
                known = details.get(id(out))
                if known is None:
                    known = details[id(out)] = richstatus.encode_details(out)
                ack.details.extend(known)
            else:  # unreachable: every heartbeat got an outcome above
                raise AssertionError("heartbeat without an outcome")
        return response

    def _authorize_message(self, identity: Identity, device_id: str) -> None:
        """Per-message authorization on HeartbeatStream: a denied message
        gets its own PERMISSION_DENIED ack and the stream goes on."""
        try:
            authorize(identity, STREAM_METHOD, [device_id])
        except PermissionDenied as err:
            self.node.on_denied(STREAM_METHOD, identity, err)
            raise

    @_unary
    async def DeleteDevice(  # noqa: N802
        self, request: device_pb2.DeleteDeviceRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.DeleteDeviceResponse:
        """Committed through the log; idempotent (``deleted = false`` for a
        device that does not exist). Operator or admin (raftstate/authz.py)."""
        validate_device_id(request.device_id)
        command = encode_delete(request.device_id, now_ms())
        res = await self.node.propose_control(command, self.node.budget(context), "delete")
        return device_pb2.DeleteDeviceResponse(
            deleted=res.changed,
            revision=res.revision,
            deleted_seq=res.deleted.seq if res.deleted is not None else 0,
        )

    @_unary
    async def GetDevice(  # noqa: N802
        self, request: device_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.GetDeviceResponse:
        validate_device_id(request.device_id)
        consistency = validate_consistency(request.consistency)
        await self.node.read_fence(consistency, self.node.budget(context))
        table = self.node.table
        at = request.at_revision
        if at:
            # RevisionCompacted / FutureRevision (OUT_OF_RANGE) from the table.
            view, revision = table.get_at(request.device_id, at), at
            if view is None:
                raise NotFound(f"device_id: {request.device_id!r} did not exist at revision {at}")
        else:
            revision = table.revision
            view = table.get(request.device_id)
            if view is None:
                raise NotFound(f"device_id: {request.device_id!r} does not exist")
            # Applied between the two reads: the device had this state at
            # its own revision (at the earlier one only if unchanged since).
            revision = max(revision, view.revision)
        return device_pb2.GetDeviceResponse(device=_device_pb(view), revision=revision)

    @_unary
    async def ListDevices(  # noqa: N802
        self, request: device_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.ListDevicesResponse:
        if request.prefix and (
            len(request.prefix) > DEVICE_ID_MAX or DEVICE_ID_RE.fullmatch(request.prefix) is None
        ):
            raise InvalidArgument("prefix", "may only contain A-Z a-z 0-9 . _ : - (at most 128)")
        limit = validate_page_size(request.page_size)
        online = validate_filter(request.filter)
        consistency = validate_consistency(request.consistency)
        after = decode_page_token(request.page_token) if request.page_token else None
        await self.node.read_fence(consistency, self.node.budget(context))
        at = request.at_revision
        revision = at or self.node.table.revision
        page = self.node.table.list(
            prefix=request.prefix, after=after, limit=limit, online=online, at_revision=at
        )
        devices = [_device_pb(v) for v in page.devices]
        # Page by bytes too, so a response always fits the message limit: a
        # repeated field costs each device its size plus a tag and a length.
        n = fit_page((d.ByteSize() + 4 for d in devices), LIST_PAGE_BUDGET_BYTES)
        next_after = page.next_after if n == len(devices) else devices[n - 1].device_id
        return device_pb2.ListDevicesResponse(
            devices=devices[:n],
            next_page_token=encode_page_token(next_after) if next_after else "",
            revision=revision,
        )

    async def Watch(  # noqa: N802
        self, request: device_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Committed changes in revision order, from this node's applied
        state (raftstate/watchserve.py). Operator or admin. Responses are
        pre-serialized ``WatchResponse`` bytes (raftstate/watchwire.py)."""
        flt, progress_s = validate_watch(request, self.node.cfg.watch_progress_ms)
        hub = self.node.hub
        if hub is None:
            raise Unavailable("this node does not serve Watch yet", "NODE_NOT_READY")
        async for response in serve_watch(hub, flt, progress_s):
            yield response


class ClusterService(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, node: NodeServices) -> None:
        self.node = node

    @_unary
    async def Status(  # noqa: N802
        self, request: cluster_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> cluster_pb2.StatusResponse:
        return status_pb(self.node)


def status_pb(node: NodeServices) -> cluster_pb2.StatusResponse:
    """This node's view of the cluster, as ``ClusterService.Status`` returns it."""
    st = node.raft.status()
    cfg = node.cfg
    leader = node.members_by_raft.get(st.leader_raft_address or "")
    links = node.raft.peer_link_stats()
    sent = node.raft.send_ledger.counts(st.term)
    members = []
    for m in cfg.members:
        link = links.get(m.id)
        me = m.id == cfg.node_id
        match = 0
        if st.role is Role.LEADER:
            match = st.match_index.get(m.raft, st.commit_index if me else 0)
        pb = cluster_pb2.Member(
            node_id=m.id,
            raft_address=m.raft,
            grpc_address=m.grpc,
            connected=me or m.raft in st.connected,
            match_index=match,
        )
        if st.role is Role.LEADER and not me:
            pb.entries_sent, pb.entries_resent = sent.get(m.raft, (0, 0))
        if link is not None:
            pb.path = link.path
            if link.srtt is not None:  # unset: no sample (an idle link)
                pb.rtt_ms = link.srtt * 1000
            if link.loss_rate is not None:
                pb.loss_rate = link.loss_rate
            pb.retransmissions = link.retransmissions
            pb.sessions = link.sessions
            pb.paths = link.paths
        members.append(pb)
    return cluster_pb2.StatusResponse(
        node_id=cfg.node_id,
        role=cluster_pb2.Role.Name(int(st.role)),
        term=st.term,
        commit_index=st.commit_index,
        last_applied=st.last_applied,
        last_log_index=st.last_log_index,
        leader_id=leader.id if leader else "",
        leader_grpc_address=leader.grpc if leader else "",
        members=members,
        revision=node.table.revision,
        devices=len(node.table),
        transport=cfg.transport,
        durability=cfg.durability,
        transport_drops=node.raft.transport_drops(),
        tick_failures=st.tick_failures,
        last_tick_error=st.last_tick_error,
        catching_up=st.catching_up,
        journal_bytes=st.journal_bytes,
        max_tick_ms=st.max_tick_s * 1000,
        max_tick_cpu_ms=st.max_tick_cpu_s * 1000,
        tick_stalls=st.tick_stalls,
        elections=st.elections,
        leader_changes=st.leader_changes,
        **_timing_fields(st.timing),
    )


def _timing_fields(timing: Timing | None) -> dict[str, Any]:
    """``StatusResponse``'s timer fields (raftstate/linktiming.py)."""
    if timing is None:
        return {}
    source = timing.source if timing.source == "configured" else f"links:{timing.basis}"
    return {
        "heartbeat_ms": timing.heartbeat * 1000,
        "election_timeout_min_ms": timing.election_min * 1000,
        "election_timeout_max_ms": timing.election_max * 1000,
        "leader_step_down_ms": timing.step_down * 1000,
        "timing_source": source,
    }


async def track_health(node: NodeServices, health: Any, period_s: float = 0.2) -> None:
    """Keep the health service current: the overall service is SERVING while
    the process runs; ``raftstate.v1.DeviceStateService`` is SERVING only while this
    node knows a leader (it can commit and serve linearizable reads), its
    Raft ticks succeed and it is not catching up after lost data."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    await health.set("", serving)
    last = None
    while True:
        healthy = node.raft.leader_raft_address() is not None and not node.raft.health_problem()
        state = serving if healthy else not_serving
        if state != last:
            await health.set("raftstate.v1.DeviceStateService", state)
            last = state
        await asyncio.sleep(period_s)


__all__ = [
    "ClusterService",
    "DeadlineExceeded",
    "DeviceStateService",
    "NodeServices",
    "status_pb",
    "track_health",
]
