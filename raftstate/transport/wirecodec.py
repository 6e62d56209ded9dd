"""Schema codec for every message sent through a Raft transport (pure functions).

pysyncobj hands its transport plain dicts (``{'type': 'append_entries', ...}``)
and pickles them on the wire; unpickling runs code chosen by whoever wrote the
bytes. This codec replaces the pickle on both transports (UDP and TCP). It
knows a fixed list of message *shapes* (:data:`SCHEMAS`): the type string,
the exact set of keys and each key's primitive type. Encoding anything else
raises :class:`~raftstate.errors.EncodeError`; decoding can only ever build
``dict``/``list``/``tuple`` containers holding ``None``, ``bool``, ``int``,
``float`` and ``bytes`` values (plus the constant type strings of the table),
and anything malformed raises :class:`~raftstate.errors.DecodeError` and
nothing else. No object is ever instantiated from the wire.

Why a hand-written binary format and not protobuf: pysyncobj's code depends on
exact Python shapes (entries are ``(bytes, int, int)`` *tuples* in a *list*,
``prevLogIdx`` may be ``None``, the snapshot chunk is a 3-tuple or ``None``,
two forms of ``apply_command_response`` differ by which keys are *present*).
Protobuf would still need a hand-written conversion layer for each of those,
accepts unknown and repeated fields silently, and adds a generated module; a
per-shape ``struct`` layout is smaller, stricter and faster in CPython (one
C-level ``unpack_from`` per fixed part).

Layout: ``u8 version (=1) | u8 kind | fixed fields | variable part``, all
little-endian. Field codes:

====  ==========================  ===========================================
code  Python value                wire
====  ==========================  ===========================================
q     int (not bool)              i64
b     bool                        u8, exactly 0 or 1
d     float, finite               f64
n     int or None                 u8 present flag + i64 (0 when absent)
y     bytes                       u32 length + data (after the fixed part)
E     list of (bytes, int, int)   u32 count, then per entry u32 len, i64,
                                  i64, data
S     (bytes, bool, bool) | None  u8 present flag, u8, u8, u32 len, data
====  ==========================  ===========================================

Bounds: a message is at most :data:`MAX_MESSAGE_BYTES` (the UDP link's
largest message), an entry list at most :data:`MAX_ENTRIES` long; every
length is checked against what is left of the input before it is used, and
the input must end exactly where the schema does.

pysyncobj's chunked ``append_entries`` (keys ``transmission``/``data``) is
deliberately not a schema: it carries a pickled entry that followers unpickle,
and it is the source of the replication wedge. Encoding it raises.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raftstate.errors import DecodeError, EncodeError

VERSION = 1
#: Largest encoded message (equals the UDP link's ``max_message_bytes``).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Most entries in one ``append_entries``.
MAX_ENTRIES = 1 << 17

_HEAD = struct.Struct("<BB")
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<Iqq")
_SNAP = struct.Struct("<BBBI")
_FIXED_CODES = {"q": "q", "b": "B", "d": "d", "n": "Bq"}
_VARIABLE = frozenset("yES")


@dataclass(frozen=True, slots=True)
class Schema:
    """One message shape: ``kind`` is its wire id, ``fields`` its keys other
    than ``type``, each with a field code (see the module docstring)."""

    kind: int
    type: str
    fields: tuple[tuple[str, str], ...]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.fields) | {"type"}


def _s(kind: int, type_: str, *fields: str) -> Schema:
    return Schema(kind, type_, tuple((f.split(":")[0], f.split(":")[1]) for f in fields))


#: Every message pysyncobj 0.3.17 and raftstate send through a transport.
SCHEMAS: tuple[Schema, ...] = (
    # pysyncobj (syncobj.py)
    _s(1, "request_vote", "term:q", "last_log_index:q", "last_log_term:q"),
    _s(2, "response_vote", "term:q"),
    _s(3, "append_entries", "term:q", "commit_index:q", "prevLogIdx:n", "prevLogTerm:n",
       "entries:E"),
    _s(4, "append_entries", "term:q", "commit_index:q", "serialized:S"),
    _s(5, "next_node_idx", "next_node_idx:q", "reset:b", "success:b"),
    _s(6, "apply_command", "command:y"),
    _s(7, "apply_command", "request_id:q", "command:y"),
    _s(8, "apply_command_response", "request_id:q", "error:q"),
    _s(9, "apply_command_response", "request_id:q", "log_idx:q", "log_term:q"),
    _s(10, "timeout_now", "term:q"),
    # raftstate (reads.py: ReadIndex)
    _s(32, "rs_ri_probe", "term:q", "round:q"),
    _s(33, "rs_ri_ack", "term:q", "round:q"),
    _s(34, "rs_ri_req", "id:q", "timeout:d"),
    _s(35, "rs_ri_grant", "id:q", "read_index:q"),
    _s(36, "rs_ri_fail", "id:q"),
    # raftstate (PreVote)
    _s(37, "rs_prevote", "term:q", "last_log_index:q", "last_log_term:q"),
    _s(38, "rs_prevote_resp", "term:q", "granted:b"),
)  # fmt: skip

#: Wire kinds a link may deliver out of order (``ReliableLink.send(...,
#: ordered=False)``): an unordered message may overtake earlier *unordered*
#: ones, never an ordered one (so nothing sent after an AppendEntries
#: overtakes it). Each is independent of the others of its kind:
#:
#: * ``next_node_idx`` (5): pysyncobj's leader raises matchIndex only on a
#:   success that raises it and sends resets through the ResetGuard
#:   (raftstate/nextindex.py); commit indexes only rise.
#: * ``apply_command`` (6, 7): batches a follower forwards; two in flight
#:   together are concurrent, so either log order is linearizable.
#: * ``apply_command_response`` (8, 9): each names its own request and log
#:   index; it may arrive before earlier AppendEntries, never after a later
#:   one (that one is ordered), so the follower registers the index before
#:   the entry can be applied (else: UNKNOWN_OUTCOME for the caller).
#:
#: AppendEntries stay ordered although a *stale* one is harmless
#: (raftstate/appendguard.py; tests/test_link_unordered.py): pysyncobj
#: pipelines them, each starting where the previous ended, so one that
#: arrives *early* finds no entry at prevLogIdx, is refused and costs a
#: reset round trip (measured in the lab on ``weak``: p99 1.3 s). Snapshots,
#: votes and the rest stay ordered too.
#:
#: EMPTY FOR NOW: with {5, 6, 7, 8, 9} unordered, 2 of 2 lab runs (a box at
#: load 6-10) showed heartbeats at the *leader's* site stalling (p99 1.5-4.8
#: s, DeadlineExceeded) while follower sites, which commit without the
#: leader's replies, did not; the same tree with the set empty did not show
#: that signature. The cause is not found (suspect: the leader's commit path
#: on reordered next_node_idx). The link mechanism stays, tested.
#: Whatever the set, a next_node_idx *reset* travels ordered
#: (:func:`travels_ordered`). A later lab run with the set on (branch t-cpu)
#: showed the stall again (the leader's site: every heartbeat failed for
#: ~15 s, followers' sites fine) with no reset reply and no "lost log
#: entries" warning at the leader, so that rule alone is not the cause.
#: And the same signature showed with the set EMPTY (t-cpu lab run
#: "cpu-w2", leader n1: its site lost 602 heartbeats in two 5-10 s windows,
#: the other sites none; box at load 15): it is not specific to unordered
#: delivery, so turning the set on waits for that cause, not for this one.
UNORDERED_KINDS: frozenset[int] = frozenset()

#: ``next_node_idx``'s wire kind, and the offset of its ``reset`` byte
#: (version, kind, next_node_idx:q, then reset:b).
_NEXT_NODE_IDX = 5
_RESET_AT = 10


def travels_ordered(data: bytes) -> bool:
    """Whether the encoded message ``data`` must keep its place in the
    link's order: every kind outside :data:`UNORDERED_KINDS`, and a
    ``next_node_idx`` *reset* whatever the set. A reset tells the leader
    "my log ends here"; overtaken by the success reply to a later
    AppendEntries, it would claim the follower lost entries it had just
    acknowledged, and the leader (``RaftNode._filter_next_index``) lowers its
    matchIndex and resends from there: the commits of the leader's own
    devices, which wait for that matchIndex, stall. Ordered, a reset is
    delivered after every reply sent before it and before every reply sent
    after it; only successes (which only ever raise matchIndex) overtake."""
    kind = data[1]
    if kind not in UNORDERED_KINDS:
        return True
    return kind == _NEXT_NODE_IDX and data[_RESET_AT] != 0


_BY_SHAPE: dict[tuple[str, frozenset[str]], Schema] = {(s.type, s.keys): s for s in SCHEMAS}
_BY_KIND: dict[int, Schema] = {s.kind: s for s in SCHEMAS}
_FIXED: dict[int, struct.Struct] = {
    s.kind: struct.Struct(
        "<BB" + "".join(_FIXED_CODES[c] for _, c in s.fields if c not in _VARIABLE)
    )
    for s in SCHEMAS
}


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode one message dict. Raises ``EncodeError`` when it matches no
    schema exactly (unknown type, missing or extra keys, a value of the wrong
    type or out of range, pysyncobj's chunked ``transmission`` form) or
    encodes to more than :data:`MAX_MESSAGE_BYTES`. Pure; any thread."""
    if not isinstance(message, Mapping):
        raise EncodeError(f"wire message must be a dict, not {type(message).__name__}")
    kind = message.get("type")
    if kind == "append_entries" and "transmission" in message:
        raise EncodeError(
            "append_entries in pysyncobj's chunked 'transmission' form is not encodable "
            "(it carries a pickle); keep log entries below appendEntriesBatchSizeBytes"
        )
    schema = _BY_SHAPE.get((kind, frozenset(message))) if isinstance(kind, str) else None
    if schema is None:
        raise EncodeError(
            f"no wire schema for a {kind!r} message with keys {sorted(map(str, message))}"
        )
    fixed: list[Any] = [VERSION, schema.kind]
    tail: list[bytes] = []
    for name, code in schema.fields:
        value = message[name]
        if code == "q":
            fixed.append(_int(name, value))
        elif code == "b":
            if not isinstance(value, bool):
                raise EncodeError(f"{kind}.{name}: expected bool, got {type(value).__name__}")
            fixed.append(int(value))
        elif code == "d":
            fixed.append(_float(f"{kind}.{name}", value))
        elif code == "n":
            fixed.extend((0, 0) if value is None else (1, _int(name, value)))
        elif code == "y":
            tail.append(_U32.pack(len(_bytes(name, value))))
            tail.append(value)
        elif code == "E":
            _encode_entries(value, tail)
        else:  # "S"
            _encode_snapshot_chunk(value, tail)
    try:
        out = _FIXED[schema.kind].pack(*fixed) + b"".join(tail)
    except struct.error as exc:  # pragma: no cover - values were checked above
        raise EncodeError(f"{kind}: {exc}") from exc
    if len(out) > MAX_MESSAGE_BYTES:
        raise EncodeError(f"{kind}: {len(out)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return out


def decode(data: bytes) -> dict[str, Any]:
    """Decode one message. Returns a fresh dict with exactly the schema's
    keys. Raises ``DecodeError`` (and nothing else) for anything that is not
    one complete, canonical message. Pure; any thread."""
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise DecodeError(f"wire message must be bytes, not {type(data).__name__}")
        data = bytes(data)
    size = len(data)
    if size > MAX_MESSAGE_BYTES:
        raise DecodeError(f"wire message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    if size < 2:
        raise DecodeError("wire message shorter than its header")
    version, kind = _HEAD.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"unknown wire format version {version}")
    schema = _BY_KIND.get(kind)
    if schema is None:
        raise DecodeError(f"unknown wire message kind {kind}")
    fixed = _FIXED[kind]
    if size < fixed.size:
        raise DecodeError(f"{schema.type}: truncated ({size} bytes)")
    values = fixed.unpack_from(data)
    pos = fixed.size
    i = 2
    out: dict[str, Any] = {"type": schema.type}
    for name, code in schema.fields:
        if code == "q":
            out[name] = values[i]
            i += 1
        elif code == "b":
            flag = values[i]
            if flag > 1:
                raise DecodeError(f"{schema.type}.{name}: bool byte {flag}")
            out[name] = flag == 1
            i += 1
        elif code == "d":
            if not math.isfinite(values[i]):
                raise DecodeError(f"{schema.type}.{name}: not a finite float")
            out[name] = values[i]
            i += 1
        elif code == "n":
            present, value = values[i], values[i + 1]
            if present > 1 or (present == 0 and value != 0):
                raise DecodeError(f"{schema.type}.{name}: bad optional int")
            out[name] = value if present else None
            i += 2
        elif code == "y":
            out[name], pos = _take_bytes(data, pos, schema.type, name)
        elif code == "E":
            out[name], pos = _decode_entries(data, pos)
        else:  # "S"
            out[name], pos = _decode_snapshot_chunk(data, pos)
    if pos != size:
        raise DecodeError(f"{schema.type}: {size - pos} trailing bytes")
    return out


# ---------------------------------------------------------------- helpers


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncodeError(f"{name}: expected int, got {type(value).__name__}")
    if not -(1 << 63) <= value < 1 << 63:
        raise EncodeError(f"{name}: {value} does not fit a signed 64-bit integer")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EncodeError(f"{name}: expected float, got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:
        raise EncodeError(f"{name}: {value} does not fit a float") from None
    if not math.isfinite(out):
        raise EncodeError(f"{name}: must be finite, got {value!r}")
    return out


def _bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise EncodeError(f"{name}: expected bytes, got {type(value).__name__}")
    if len(value) > MAX_MESSAGE_BYTES:
        raise EncodeError(f"{name}: {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return value


def _encode_entries(entries: Any, tail: list[bytes]) -> None:
    if not isinstance(entries, list):
        raise EncodeError(f"entries: expected list, got {type(entries).__name__}")
    if len(entries) > MAX_ENTRIES:
        raise EncodeError(f"entries: {len(entries)} exceeds {MAX_ENTRIES}")
    tail.append(_U32.pack(len(entries)))
    pack = _ENTRY.pack
    for entry in entries:
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise EncodeError("entries: each entry must be a (command, index, term) tuple")
        command, index, term = entry
        tail.append(pack(len(_bytes("entry command", command)), _int("entry index", index),
                         _int("entry term", term)))  # fmt: skip
        tail.append(command)


def _decode_entries(data: bytes, pos: int) -> tuple[list[tuple[bytes, int, int]], int]:
    size = len(data)
    if pos + 4 > size:
        raise DecodeError("append_entries: truncated entry count")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_ENTRIES or count * _ENTRY.size > size - pos:
        raise DecodeError(f"append_entries: entry count {count} does not fit")
    entries = []
    unpack = _ENTRY.unpack_from
    for _ in range(count):
        if pos + _ENTRY.size > size:
            raise DecodeError("append_entries: truncated entry")
        length, index, term = unpack(data, pos)
        pos += _ENTRY.size
        end = pos + length
        if end > size:
            raise DecodeError("append_entries: entry command overruns the message")
        entries.append((data[pos:end], index, term))
        pos = end
    return entries, pos


def _encode_snapshot_chunk(chunk: Any, tail: list[bytes]) -> None:
    if chunk is None:
        tail.append(_SNAP.pack(0, 0, 0, 0))
        return
    if not isinstance(chunk, tuple) or len(chunk) != 3:
        raise EncodeError("serialized: expected None or a (data, isFirst, isLast) tuple")
    data, first, last = chunk
    if not isinstance(first, bool) or not isinstance(last, bool):
        raise EncodeError("serialized: isFirst and isLast must be bool")
    tail.append(_SNAP.pack(1, first, last, len(_bytes("serialized data", data))))
    tail.append(data)


def _decode_snapshot_chunk(data: bytes, pos: int) -> tuple[tuple[bytes, bool, bool] | None, int]:
    if pos + _SNAP.size > len(data):
        raise DecodeError("append_entries: truncated snapshot chunk")
    present, first, last, length = _SNAP.unpack_from(data, pos)
    pos += _SNAP.size
    if present == 0:
        if first or last or length:
            raise DecodeError("append_entries: bad empty snapshot chunk")
        return None, pos
    if present > 1 or first > 1 or last > 1:
        raise DecodeError("append_entries: bad snapshot chunk flags")
    end = pos + length
    if end > len(data):
        raise DecodeError("append_entries: snapshot chunk overruns the message")
    return (data[pos:end], first == 1, last == 1), end


def _take_bytes(data: bytes, pos: int, type_: str, name: str) -> tuple[bytes, int]:
    if pos + 4 > len(data):
        raise DecodeError(f"{type_}.{name}: truncated length")
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    end = pos + length
    if end > len(data):
        raise DecodeError(f"{type_}.{name}: overruns the message")
    return data[pos:end], end


__all__ = ["MAX_ENTRIES", "MAX_MESSAGE_BYTES", "SCHEMAS", "VERSION", "Schema", "decode", "encode"]
