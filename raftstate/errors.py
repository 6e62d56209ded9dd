"""The raftstate error hierarchy.

Every error a caller can see is a :class:`RaftStateError`. Each class knows the
gRPC status code it travels as and whether retrying the same request can
succeed. The server converts them to a status in exactly one place
(``raftstate.server``), with ``google.rpc`` details built by
``raftstate.richstatus``; the SDK converts statuses back with
``richstatus.decode`` (details) on top of :func:`from_status` (code and
message alone).
"""

from __future__ import annotations

import grpc


class RaftStateError(Exception):
    """Root of all raftstate errors."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retriable: bool = False
    #: The stable ``ErrorInfo.reason`` (e.g. ``NO_LEADER``); empty: derived
    #: from the class by ``richstatus.reason_of``. Set by the SDK from a
    #: status's details.
    reason: str = ""
    #: The server's ``RetryInfo`` delay in seconds (SDK side), else ``None``.
    retry_delay_s: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RaftStateError):
    """A request field is malformed. ``field`` names it. Never retriable."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(RaftStateError):
    """The device does not exist (as of the read's revision)."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class Unavailable(RaftStateError):
    """The cluster cannot serve the request right now (no leader, lost quorum,
    node shutting down, or the outcome of a write is unknown). Safe to retry:
    heartbeats are idempotent by (device_id, seq)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    retriable = True

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class NotLeader(Unavailable):
    """This node is not the leader. ``leader_hint`` is the leader's gRPC
    address when known, else the empty string."""

    def __init__(self, message: str, leader_hint: str = "") -> None:
        super().__init__(message, "NOT_LEADER")
        self.leader_hint = leader_hint


class DeadlineExceeded(RaftStateError):
    """The caller's deadline passed before the request completed. For a
    heartbeat the outcome is unknown; retrying with the same seq is safe."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    retriable = True


class Cancelled(RaftStateError):
    """The server cancelled the call (its node shut down or restarted while
    the call was in flight). For a heartbeat the outcome is unknown; retrying
    with the same seq is safe, and so is retrying a read. A cancellation the
    caller asked for never becomes this error: the SDK lets the caller's
    ``asyncio.CancelledError`` through and never retries it."""

    grpc_code = grpc.StatusCode.CANCELLED
    retriable = True


class ResourceExhausted(RaftStateError):
    """A node limit was reached (proposal queue, concurrent RPCs, open
    streams); the message starts with the config field that sets it.
    Retriable after backoff."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retriable = True


class QuotaExceeded(ResourceExhausted):
    """The cluster's ``quota`` (``max_devices`` or ``max_state_bytes``) would
    be exceeded; nothing was stored. Not retriable: the table does not shrink
    by itself."""

    retriable = False

    def __init__(self, quota: str, problem: str) -> None:
        super().__init__(f"{quota}: {problem}")
        self.quota = quota


class FailedPrecondition(RaftStateError):
    """The node is not set up for this request (e.g. tokens asked of a node
    without a token key). Not retriable on that node."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RaftStateError):
    """The call carried no credential, or one this cluster does not accept
    (wrong CA, bad signature, expired, revoked). Not retriable with the same
    credential."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RaftStateError):
    """The credential is valid but its role or scope does not cover this
    method or device id (raftstate/authz.py). Nothing was read or written."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRange(RaftStateError):
    """A revision outside what this node can serve. Not retriable as is."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class RevisionCompacted(OutOfRange):
    """The requested revision is older than this node's retained history
    (the event window): list at a retained revision (``oldest_revision`` or
    later) and watch from there. ErrorInfo metadata: ``oldest_revision``,
    ``current_revision``."""

    reason = "REVISION_COMPACTED"

    def __init__(self, oldest_revision: int, current_revision: int, message: str = "") -> None:
        super().__init__(
            message
            or f"revision compacted: this node retains revisions {oldest_revision} to "
            f"{current_revision}; list at a retained revision and watch from there"
        )
        self.oldest_revision = oldest_revision
        self.current_revision = current_revision


class FutureRevision(OutOfRange):
    """The requested revision is newer than this node's store revision.
    ErrorInfo metadata: ``current_revision``."""

    reason = "FUTURE_REVISION"

    def __init__(self, current_revision: int, message: str = "") -> None:
        super().__init__(
            message or f"revision is in the future: this node's revision is {current_revision}"
        )
        self.current_revision = current_revision


class DecodeError(RaftStateError):
    """Bytes from the log or a snapshot could not be decoded."""

    grpc_code = grpc.StatusCode.DATA_LOSS


class EncodeError(RaftStateError):
    """A value does not fit the wire schema it is sent under (a bug in the
    sender, never input from the network)."""


class ConfigError(RaftStateError):
    """A configuration value is missing or breaks a rule; the message names
    the field and the rule."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class WatcherTooSlow(ResourceExhausted):
    """A watch fell more than ``watch_max_pending`` events behind (its reader
    did not keep up) and was ended. Resume from ``resume_revision``: every
    matching event before it was delivered. The SDK resumes by itself."""

    reason = "WATCHER_TOO_SLOW"

    def __init__(self, resume_revision: int, max_pending: int = 0, message: str = "") -> None:
        super().__init__(
            message
            or f"watch_max_pending: the watcher fell more than {max_pending} events behind; "
            f"resume from revision {resume_revision}"
        )
        self.resume_revision = resume_revision


class ResyncRequired(RaftStateError):
    """SDK only: a watch cannot resume because no reachable node retains the
    revision it needs (every one answered ``RevisionCompacted``). List the
    devices again (``list_then_watch``) and watch from that listing's
    revision; events between were not seen."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE
    reason = "REVISION_COMPACTED"

    def __init__(self, oldest_revision: int, current_revision: int, wanted_revision: int) -> None:
        super().__init__(
            f"resync required: revision {wanted_revision} is no longer retained (oldest "
            f"{oldest_revision}, current {current_revision}); list again and watch from there"
        )
        self.oldest_revision = oldest_revision
        self.current_revision = current_revision
        self.wanted_revision = wanted_revision


LEADER_HINT_KEY = "raftstate-leader"
QUOTAS = ("max_devices", "max_state_bytes")

_BY_CODE: dict[grpc.StatusCode, type[RaftStateError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DATA_LOSS: DecodeError,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}


def from_status(code: grpc.StatusCode, details: str, leader_hint: str = "") -> RaftStateError:
    """Rebuild the error a server raised from its gRPC status.

    ``INVALID_ARGUMENT`` details have the form ``"field: problem"``; so do
    quota refusals (``RESOURCE_EXHAUSTED`` naming ``max_devices`` or
    ``max_state_bytes``), which become :class:`QuotaExceeded`. A status
    this module does not know becomes a plain :class:`RaftStateError` carrying
    that code, and is not retriable.
    """
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidArgument(field, problem or details)
    if code == grpc.StatusCode.UNAVAILABLE and leader_hint:
        return NotLeader(details, leader_hint)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        quota, _, problem = details.partition(": ")
        if quota in QUOTAS:
            return QuotaExceeded(quota, problem)
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(details)
    err = RaftStateError(f"{code.name}: {details}")
    err.grpc_code = code
    return err
