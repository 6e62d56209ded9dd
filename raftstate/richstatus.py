"""Rich gRPC errors: ``google.rpc.Status`` details for every raftstate error.

Theory of operation. A :class:`~raftstate.errors.RaftStateError` already knows
its gRPC code, its message and whether a retry can succeed. This module adds
the machine-readable part that standard gRPC clients (Go, Node, Java, grpcurl)
understand, in the ``grpc-status-details-bin`` trailer of a failed call and in
the ``details`` of a stream or batch ack:

* an ``ErrorInfo`` on every error, domain :data:`DOMAIN`, with a stable
  ``reason`` (:func:`reason_of`: ``NO_LEADER``, ``NO_QUORUM``,
  ``SHUTTING_DOWN``, ``NODE_NOT_READY``, ``QUOTA_MAX_DEVICES``,
  ``LIMIT_MAX_PENDING_HEARTBEATS``, ``INVALID_ARGUMENT``, ...) and metadata
  (``leader`` for NOT_LEADER, ``field``, ``quota`` or
  ``limit`` where they apply; ``oldest_revision`` / ``current_revision`` for
  REVISION_COMPACTED and FUTURE_REVISION);
* a ``BadRequest`` with one field violation for ``INVALID_ARGUMENT``, naming
  the field exactly as the message does (``seq``, ``heartbeats[3].ttl_s``);
* a ``RetryInfo`` for retriable ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED``
  (:func:`retry_delay_s`): when to try again. A quota refusal is
  ``RESOURCE_EXHAUSTED`` too but not retriable, so it carries none.

:func:`encode_details` / :func:`status_trailer` build them (the server's
single mapping point, ``server._abort``, and ``rpcguard`` call it);
:func:`decode` is the inverse the SDK uses: it rebuilds the error class and
sets ``reason``, ``retry_delay_s`` and, for BadRequest, ``field``. A status
without details (an older server, a proxy) decodes as before, from code and
message alone. Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from raftstate.errors import (
    LEADER_HINT_KEY,
    FutureRevision,
    InvalidArgument,
    NotLeader,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    RevisionCompacted,
    Unavailable,
    WatcherTooSlow,
    from_status,
)

#: ``ErrorInfo.domain`` of every raftstate error.
DOMAIN = "raftstate.dev"
#: The standard trailer that carries a serialized ``google.rpc.Status``.
DETAILS_KEY = "grpc-status-details-bin"

#: RetryInfo delays, seconds, by reason. NOT_LEADER: go to the named leader
#: at once; NO_LEADER: about one election; NO_QUORUM / SHUTTING_DOWN /
#: NODE_NOT_READY: another node or a little later; node limits: let the
#: queue drain.
RETRY_DELAYS_S: dict[str, float] = {
    "NOT_LEADER": 0.0,
    "NO_LEADER": 0.5,
    "NO_QUORUM": 0.1,
    "SHUTTING_DOWN": 0.1,
    "NODE_NOT_READY": 0.1,
}
DEFAULT_UNAVAILABLE_DELAY_S = 0.1
DEFAULT_EXHAUSTED_DELAY_S = 0.2

_GENERIC = {
    grpc.StatusCode.NOT_FOUND: "DEVICE_NOT_FOUND",
    grpc.StatusCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    grpc.StatusCode.PERMISSION_DENIED: "PERMISSION_DENIED",
    grpc.StatusCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.CANCELLED: "CANCELLED",
    grpc.StatusCode.DATA_LOSS: "DATA_LOSS",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    grpc.StatusCode.OUT_OF_RANGE: "OUT_OF_RANGE",
}


def _limit_name(message: str) -> str:
    """The config field a ResourceExhausted message starts with, or ''."""
    head, sep, _ = message.partition(":")
    if sep and head and all(c.isalnum() or c == "_" for c in head):
        return head
    return ""


def reason_of(err: RaftStateError) -> str:
    """The stable ``ErrorInfo.reason`` of ``err`` (UPPER_SNAKE_CASE).

    An explicit ``err.reason`` wins; otherwise it follows from the class:
    INVALID_ARGUMENT, NOT_LEADER, QUOTA_<quota>, LIMIT_<config field> for
    node limits, else a name of the code (DEVICE_NOT_FOUND, UNAVAILABLE...).
    """
    if err.reason:
        return err.reason
    if isinstance(err, InvalidArgument):
        return "INVALID_ARGUMENT"
    if isinstance(err, NotLeader):
        return "NOT_LEADER"
    if isinstance(err, QuotaExceeded):
        return "QUOTA_" + err.quota.upper()
    if isinstance(err, ResourceExhausted):
        limit = _limit_name(err.message)
        return "LIMIT_" + limit.upper() if limit else "RESOURCE_EXHAUSTED"
    return _GENERIC.get(err.grpc_code, "INTERNAL")


def retry_delay_s(err: RaftStateError) -> float | None:
    """How long to wait before retrying ``err``; ``None`` if it gets no
    RetryInfo (not UNAVAILABLE / RESOURCE_EXHAUSTED, or not retriable)."""
    if not err.retriable:
        return None
    if err.retry_delay_s is not None:
        return err.retry_delay_s
    if isinstance(err, Unavailable):
        return RETRY_DELAYS_S.get(reason_of(err), DEFAULT_UNAVAILABLE_DELAY_S)
    if isinstance(err, ResourceExhausted):
        return DEFAULT_EXHAUSTED_DELAY_S
    return None


def _pack(msg: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest
          | error_details_pb2.RetryInfo) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def encode_details(err: RaftStateError) -> list[any_pb2.Any]:
    """ErrorInfo, then BadRequest (INVALID_ARGUMENT) or RetryInfo (retriable
    UNAVAILABLE / RESOURCE_EXHAUSTED), packed as ``google.protobuf.Any``."""
    info = error_details_pb2.ErrorInfo(reason=reason_of(err), domain=DOMAIN)
    out: list[any_pb2.Any] = []
    if isinstance(err, InvalidArgument):
        info.metadata["field"] = err.field
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=err.field, description=err.problem)
        out.append(_pack(bad))
    elif isinstance(err, NotLeader) and err.leader_hint:
        info.metadata["leader"] = err.leader_hint
    elif isinstance(err, QuotaExceeded):
        info.metadata["quota"] = err.quota
    elif isinstance(err, WatcherTooSlow):
        info.metadata["resume_revision"] = str(err.resume_revision)
        info.metadata["limit"] = "watch_max_pending"
    elif isinstance(err, ResourceExhausted) and _limit_name(err.message):
        info.metadata["limit"] = _limit_name(err.message)
    elif isinstance(err, RevisionCompacted):
        info.metadata["oldest_revision"] = str(err.oldest_revision)
        info.metadata["current_revision"] = str(err.current_revision)
    elif isinstance(err, FutureRevision):
        info.metadata["current_revision"] = str(err.current_revision)
    delay = retry_delay_s(err)
    if delay is not None:
        seconds = int(delay)
        wait = duration_pb2.Duration(seconds=seconds, nanos=round((delay - seconds) * 1e9))
        out.append(_pack(error_details_pb2.RetryInfo(retry_delay=wait)))
    return [_pack(info), *out]


def encode_status(err: RaftStateError) -> status_pb2.Status:
    """``err`` as a whole ``google.rpc.Status``."""
    return status_pb2.Status(
        code=err.grpc_code.value[0], message=err.message, details=encode_details(err)
    )


def status_trailer(err: RaftStateError) -> tuple[str, bytes]:
    """The ``grpc-status-details-bin`` trailing-metadata entry for ``err``."""
    return (DETAILS_KEY, encode_status(err).SerializeToString())


def trailing_metadata(err: RaftStateError) -> tuple[tuple[str, str | bytes], ...]:
    """What a failed call carries besides code and message: the leader hint
    (``NotLeader`` with a hint) and the ``grpc-status-details-bin`` trailer."""
    details = status_trailer(err)
    if isinstance(err, NotLeader) and err.leader_hint:
        return ((LEADER_HINT_KEY, err.leader_hint), details)
    return (details,)


def decode(
    code: grpc.StatusCode,
    message: str,
    details: Sequence[any_pb2.Any] = (),
    leader_hint: str = "",
) -> RaftStateError:
    """Rebuild the error from a status and its details (the inverse of
    :func:`encode_details`). Details of unknown types are ignored; without
    any, this is :func:`raftstate.errors.from_status`."""
    reason, field, problem, delay = "", "", "", None
    meta: dict[str, str] = {}
    for item in details:
        if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            if info.domain == DOMAIN:
                reason, meta = info.reason, dict(info.metadata)
        elif item.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            item.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
                problem = bad.field_violations[0].description
        elif item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            item.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    hint = leader_hint or (meta.get("leader", "") if reason == "NOT_LEADER" else "")
    if code == grpc.StatusCode.INVALID_ARGUMENT and field:
        err: RaftStateError = InvalidArgument(field, problem)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason.startswith("QUOTA_"):
        quota = meta.get("quota") or reason.removeprefix("QUOTA_").lower()
        err = QuotaExceeded(quota, message.partition(": ")[2] or message)
    elif code == grpc.StatusCode.OUT_OF_RANGE and reason == RevisionCompacted.reason:
        err = RevisionCompacted(
            _int(meta.get("oldest_revision")), _int(meta.get("current_revision")), message
        )
    elif code == grpc.StatusCode.OUT_OF_RANGE and reason == FutureRevision.reason:
        err = FutureRevision(_int(meta.get("current_revision")), message)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == WatcherTooSlow.reason:
        err = WatcherTooSlow(_int(meta.get("resume_revision")), message=message)
    else:
        err = from_status(code, message, hint)
    err.reason = reason
    err.retry_delay_s = delay
    return err


def _int(text: str | None) -> int:
    """A metadata number (0 when absent or not a number: a foreign server)."""
    try:
        return int(text or 0)
    except ValueError:
        return 0


def decode_trailer(
    code: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, str | bytes]] | None
) -> RaftStateError:
    """The error of a failed call from its code, message and trailing
    metadata (leader hint and ``grpc-status-details-bin``). A trailer that
    does not parse is ignored."""
    hint = ""
    details: Sequence[any_pb2.Any] = ()
    for key, value in trailing or ():
        if key == LEADER_HINT_KEY:
            hint = str(value)
        elif key == DETAILS_KEY and isinstance(value, bytes):
            try:
                details = status_pb2.Status.FromString(value).details
            except Exception:  # noqa: BLE001 - a foreign or broken trailer
                details = ()
    return decode(code, message, details, hint)
