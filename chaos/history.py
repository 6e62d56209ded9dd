"""Recording what clients saw: operations, their real-time bounds and results.

Theory of operation
-------------------
A linearizability check needs, for every client operation, the instant just
before the request left the client (``call_ns``), the instant just after the
response arrived (``return_ns``) and the response itself (Herlihy & Wing 1990,
§2: a *history* of invocation and response events). The recorder reads its
clock inside :meth:`History.invoke` and :meth:`History.ok`, so the interval it
stores always contains the moment the server acted.

An operation can end three ways:

1. :meth:`History.ok` with a definite result (a ``WriteResult`` for a
   heartbeat, a ``ReadResult`` for a get; ``NOT_FOUND`` is a definite result).
2. :meth:`History.fail` when the outcome is unknown (deadline exceeded,
   unavailable). Its ``return_ns`` and ``result`` stay ``None``; the checker
   treats a failed write as Jepsen/Porcupine "info": it may take effect at any
   time after ``call_ns``, or never. A failed read tells nothing and is dropped.
3. Never ended (the client crashed): same as a failure.

Only record operations whose outcome is linearizable by contract: heartbeats,
deletes and ``LINEARIZABLE`` gets, never ``SERIALIZABLE`` reads.

Expiries are writes the *server* makes (the leader commits "device went
offline" when its TTL lapses). No client invokes them, so they are recorded,
if at all, as ``EXPIRE`` operations with an unknown outcome whose ``args`` is
the value after the expiry (``online=False``); the checker also adds one for
every offline value a read observed (see :mod:`chaos.linearizability`).

The recorder is the only part of :mod:`chaos` that reads a clock, and the clock
is injectable. Everything here is safe to call from many threads and asyncio
tasks at once: one lock guards the table, and no call blocks on I/O.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Reported = tuple[tuple[str, str], ...]
"""A ``reported`` map frozen into sorted ``(key, value)`` pairs."""

ClientId = str | int

HISTORY_FORMAT = "raftstate.chaos.history/1"


class HistoryError(ValueError):
    """A history is malformed: an unknown or already completed op id, a result
    of the wrong kind, a return before its call, or JSON that is not a history.
    Never retriable: fix the harness that recorded it."""


class OpKind(enum.Enum):
    """What an operation did to one device."""

    #: ``heartbeat(device_id, seq, reported)``.
    WRITE = "write"
    #: Linearizable ``get(device_id)``.
    READ = "read"
    #: ``delete_device(device_id)`` (one attempt, never retried: a retried
    #: delete could remove a device re-created in between).
    DELETE = "delete"
    #: The server's expiry of the device: ``args`` is the value after it
    #: (``online=False``); legal only in the same value with ``online=True``.
    #: Always an unknown outcome (no client saw it return).
    EXPIRE = "expire"


def freeze_reported(reported: Mapping[str, str]) -> Reported:
    """Return ``reported`` as sorted ``(key, value)`` pairs (hashable, comparable)."""
    return tuple(sorted(reported.items()))


@dataclass(frozen=True, slots=True)
class DeviceValue:
    """One stored state of a device: what a heartbeat writes and a get returns.

    ``online`` is the committed presence: a heartbeat writes ``True``, an
    expiry turns it ``False`` without changing ``seq`` or ``reported``."""

    seq: int
    reported: Reported = ()
    online: bool = True

    def __post_init__(self) -> None:
        if self.seq < 1:
            raise HistoryError(f"seq must be at least 1, got {self.seq}")

    @classmethod
    def of(
        cls, seq: int, reported: Mapping[str, str] | None = None, *, online: bool = True
    ) -> DeviceValue:
        """Build a value from a plain ``reported`` dict. Raises ``HistoryError``
        if ``seq < 1``."""
        return cls(seq, freeze_reported(reported or {}), online)

    def with_online(self, online: bool) -> DeviceValue:
        """The same seq and reported map with presence ``online``."""
        return DeviceValue(self.seq, self.reported, online)

    def render(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in self.reported)
        return f"seq={self.seq} {{{items}}}" + ("" if self.online else " offline")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The response to a heartbeat. ``revision`` spans devices and is recorded
    for the log reader only; the per-device check ignores it."""

    duplicate: bool
    stored_seq: int
    revision: int | None = None

    def render(self) -> str:
        word = "duplicate" if self.duplicate else "applied"
        return f"{word} stored_seq={self.stored_seq}"


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The response to a get: the stored value, or ``None`` for not found."""

    value: DeviceValue | None

    @classmethod
    def found(cls, seq: int, reported: Mapping[str, str] | None = None) -> ReadResult:
        return cls(DeviceValue.of(seq, reported))

    @classmethod
    def not_found(cls) -> ReadResult:
        return cls(None)

    def render(self) -> str:
        return "not found" if self.value is None else self.value.render()


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The response to a delete: whether a record was removed, and the seq it
    had (0 when nothing was deleted). ``revision`` is for the log reader only."""

    deleted: bool
    deleted_seq: int = 0
    revision: int | None = None

    def render(self) -> str:
        return f"deleted seq={self.deleted_seq}" if self.deleted else "nothing to delete"


Result = WriteResult | ReadResult | DeleteResult


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation on one device.

    ``args`` is the written value for a ``WRITE`` and ``None`` for a ``READ``.
    ``return_ns`` and ``result`` are ``None`` when the outcome is unknown.
    """

    op_id: int
    client_id: ClientId
    kind: OpKind
    device_id: str
    args: DeviceValue | None
    call_ns: int
    return_ns: int | None = None
    result: Result | None = None

    @property
    def completed(self) -> bool:
        """True when the op has a definite result."""
        return self.result is not None

    def describe(self) -> str:
        """``heartbeat(seq=.. {..})``, ``expire(seq=.. {..} offline)``,
        ``delete()`` or ``get()``."""
        if self.kind is OpKind.WRITE and self.args is not None:
            return f"heartbeat({self.args.render()})"
        if self.kind is OpKind.EXPIRE and self.args is not None:
            return f"expire({self.args.render()})"
        return "delete()" if self.kind is OpKind.DELETE else "get()"


_RESULT_OF = {
    OpKind.WRITE: WriteResult,
    OpKind.READ: ReadResult,
    OpKind.DELETE: DeleteResult,
    OpKind.EXPIRE: type(None),
}


def validate_operation(op: Operation) -> Operation:
    """Return ``op`` if its fields agree with its kind, else raise ``HistoryError``."""
    if op.kind is OpKind.WRITE and (op.args is None or not op.args.online):
        raise HistoryError(f"op {op.op_id}: a write needs an online DeviceValue as args")
    if op.kind is OpKind.EXPIRE and (op.args is None or op.args.online):
        raise HistoryError(f"op {op.op_id}: an expiry needs an offline DeviceValue as args")
    if op.kind is OpKind.EXPIRE and op.return_ns is not None:
        raise HistoryError(f"op {op.op_id}: an expiry has no client-seen result")
    if op.kind in (OpKind.READ, OpKind.DELETE) and op.args is not None:
        raise HistoryError(f"op {op.op_id}: a {op.kind.value} takes no args")
    if (op.result is None) != (op.return_ns is None):
        raise HistoryError(f"op {op.op_id}: return_ns and result must be both set or both None")
    if op.return_ns is not None and op.return_ns < op.call_ns:
        raise HistoryError(f"op {op.op_id}: returned at {op.return_ns} before its call")
    expected = _RESULT_OF[op.kind]
    if op.result is not None and not isinstance(op.result, expected):
        raise HistoryError(f"op {op.op_id}: a {op.kind.value} needs a {expected.__name__}")
    return op


class History:
    """A thread-safe, append-only recorder of client operations.

    ``clock`` returns nanoseconds from a monotonic source shared by every
    recording client (default ``time.monotonic_ns``); inject a fake for tests.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: list[Operation] = []
        self._failed: set[int] = set()

    def invoke(
        self, client_id: ClientId, kind: OpKind, device_id: str, args: DeviceValue | None = None
    ) -> int:
        """Record the invocation of an op and return its id. Call it just
        before sending the request. Raises ``HistoryError`` if ``args`` does not
        fit ``kind``. Thread-safe."""
        with self._lock:
            op = Operation(len(self._ops), client_id, kind, device_id, args, self._clock())
            self._ops.append(validate_operation(op))
            return op.op_id

    def invoke_write(
        self, client_id: ClientId, device_id: str, seq: int, reported: Mapping[str, str]
    ) -> int:
        """Shorthand for ``invoke(client_id, WRITE, device_id, DeviceValue.of(...))``."""
        return self.invoke(client_id, OpKind.WRITE, device_id, DeviceValue.of(seq, reported))

    def invoke_read(self, client_id: ClientId, device_id: str) -> int:
        """Shorthand for ``invoke(client_id, READ, device_id)``."""
        return self.invoke(client_id, OpKind.READ, device_id)

    def invoke_delete(self, client_id: ClientId, device_id: str) -> int:
        """Shorthand for ``invoke(client_id, DELETE, device_id)``."""
        return self.invoke(client_id, OpKind.DELETE, device_id)

    def record_expiry(self, device_id: str, after: DeviceValue) -> int:
        """Record the server's expiry of ``device_id`` whose value became
        ``after`` (``online=False``), as an op of client ``"server"`` with an
        unknown outcome, invoked now: call it no later than the moment the
        expiry could have been committed. Raises ``HistoryError`` if
        ``after`` is online. Thread-safe."""
        op_id = self.invoke("server", OpKind.EXPIRE, device_id, after)
        self.fail(op_id)
        return op_id

    def ok(self, op_id: int, result: Result) -> None:
        """Record the definite result of op ``op_id``. Call it just after the
        response arrives. Raises ``HistoryError`` if the op is unknown, already
        ended, or ``result`` is of the wrong kind. Thread-safe."""
        with self._lock:
            op = self._pending(op_id)
            done = Operation(
                op.op_id,
                op.client_id,
                op.kind,
                op.device_id,
                op.args,
                op.call_ns,
                self._clock(),
                result,
            )
            self._ops[op_id] = validate_operation(done)

    def fail(self, op_id: int) -> None:
        """Record that op ``op_id`` ended with an unknown outcome (timeout,
        unavailable). Raises ``HistoryError`` if the op is unknown or already
        ended. Thread-safe."""
        with self._lock:
            self._pending(op_id)
            self._failed.add(op_id)

    def _pending(self, op_id: int) -> Operation:
        if not 0 <= op_id < len(self._ops):
            raise HistoryError(f"no op with id {op_id}")
        op = self._ops[op_id]
        if op.result is not None or op_id in self._failed:
            raise HistoryError(f"op {op_id} has already ended")
        return op

    def ops(self) -> tuple[Operation, ...]:
        """A snapshot of every op in invocation order. Thread-safe."""
        with self._lock:
            return tuple(self._ops)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    @classmethod
    def from_ops(
        cls, ops: Iterable[Operation], clock: Callable[[], int] = time.monotonic_ns
    ) -> History:
        """A history holding ``ops`` (renumbered by call time) that can keep
        recording. Raises ``HistoryError`` on a malformed op."""
        history = cls(clock)
        ordered = sorted(ops, key=lambda o: (o.call_ns, o.op_id))
        for new_id, op in enumerate(ordered):
            history._ops.append(
                validate_operation(
                    Operation(
                        new_id,
                        op.client_id,
                        op.kind,
                        op.device_id,
                        op.args,
                        op.call_ns,
                        op.return_ns,
                        op.result,
                    )
                )
            )
        return history

    def to_json(self) -> str:
        """The whole history as a JSON document (see :meth:`from_json`). Thread-safe."""
        with self._lock:
            rows = [_op_to_json(op, op.op_id in self._failed) for op in self._ops]
        return json.dumps({"format": HISTORY_FORMAT, "ops": rows}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, clock: Callable[[], int] = time.monotonic_ns) -> History:
        """Rebuild a history saved by :meth:`to_json`, op ids included.
        Raises ``HistoryError`` if ``text`` is not such a document."""
        try:
            doc = json.loads(text)
            if doc["format"] != HISTORY_FORMAT:
                raise HistoryError(f"unsupported history format {doc['format']!r}")
            history = cls(clock)
            for op_id, row in enumerate(doc["ops"]):
                op, failed = _op_from_json(row)
                if op.op_id != op_id:
                    raise HistoryError(f"op ids must be 0..n-1 in order, got {op.op_id}")
                history._ops.append(validate_operation(op))
                if failed:
                    history._failed.add(op_id)
            return history
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, HistoryError):
                raise
            raise HistoryError(f"not a history document: {exc!r}") from exc


def _op_to_json(op: Operation, failed: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "op_id": op.op_id,
        "client_id": op.client_id,
        "kind": op.kind.value,
        "device_id": op.device_id,
        "call_ns": op.call_ns,
        "return_ns": op.return_ns,
        "failed": failed,
    }
    if op.args is not None:
        row["args"] = _value_to_json(op.args)
    if isinstance(op.result, DeleteResult):
        row["result"] = {
            "deleted": op.result.deleted,
            "deleted_seq": op.result.deleted_seq,
            "revision": op.result.revision,
        }
    elif isinstance(op.result, WriteResult):
        row["result"] = {
            "duplicate": op.result.duplicate,
            "stored_seq": op.result.stored_seq,
            "revision": op.result.revision,
        }
    elif isinstance(op.result, ReadResult):
        row["result"] = {
            "value": None if op.result.value is None else _value_to_json(op.result.value)
        }
    return row


def _op_from_json(row: dict[str, Any]) -> tuple[Operation, bool]:
    kind = OpKind(row["kind"])
    args = _value_from_json(row["args"]) if row.get("args") is not None else None
    raw = row.get("result")
    result: Result | None = None
    if raw is not None and kind is OpKind.WRITE:
        result = WriteResult(bool(raw["duplicate"]), int(raw["stored_seq"]), raw.get("revision"))
    elif raw is not None and kind is OpKind.DELETE:
        result = DeleteResult(bool(raw["deleted"]), int(raw["deleted_seq"]), raw.get("revision"))
    elif raw is not None:
        value = raw["value"]
        result = ReadResult(None if value is None else _value_from_json(value))
    client = row["client_id"]
    if not isinstance(client, str | int):
        raise HistoryError(f"client_id must be a string or an integer, got {client!r}")
    return_ns = row["return_ns"]
    op = Operation(
        int(row["op_id"]),
        client,
        kind,
        str(row["device_id"]),
        args,
        int(row["call_ns"]),
        None if return_ns is None else int(return_ns),
        result,
    )
    return op, bool(row.get("failed", False))


def _value_to_json(value: DeviceValue) -> dict[str, Any]:
    row: dict[str, Any] = {"seq": value.seq, "reported": dict(value.reported)}
    if not value.online:
        row["online"] = False
    return row


def _value_from_json(raw: dict[str, Any]) -> DeviceValue:
    return DeviceValue.of(
        int(raw["seq"]),
        {str(k): str(v) for k, v in raw["reported"].items()},
        online=bool(raw.get("online", True)),
    )
