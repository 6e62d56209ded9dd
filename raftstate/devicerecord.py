"""One device's stored state as one immutable ``bytes`` object.

Theory of operation. A million devices held as Python objects (a dataclass,
a dict for ``reported``, an int object per counter) cost ~820 bytes each. The
table keeps each device as a single ``bytes`` instead:

    HEAD (60 bytes, little-endian)                 BODY
    seq u64 | revision u64 | first_seen_ms i64 |   the device's HeartbeatRecord
    last_seen_ms i64 | heartbeats u64 |            (storage.proto) exactly as the
    ttl_s u32 | state_bytes u32 |                  log entry carried it: id, seq,
    presence_changed_ms i64 | flags u32            reported, ttl_s

``flags`` bit 0 (:data:`FLAG_OFFLINE`) is the committed presence: set by an
applied expiry, cleared by the device's next heartbeat; ``presence_changed_ms``
is the log time of the last change. Records of snapshot format 2 had the
first 48 bytes only (:func:`upgrade_v2`: online, changed at ``last_seen_ms``).

* Applying a heartbeat reads the old HEAD with one ``struct.unpack_from``
  and builds the new record from a ``struct.pack`` and the record's own
  protobuf serialization (no per-field Python work on ``reported``).
* A reader decodes it into a :class:`~raftstate.model.DeviceView` only when it
  is read (``view``).
* A record is never mutated, only replaced, so a reference to one is a
  consistent copy: snapshots capture references, not copies.
* The BODY starts with the device id (field 1, ``0x0a`` and a one- or
  two-byte length); :func:`device_id_of` reads it without parsing the
  record (snapshot loading).

Pure functions; any thread.
"""

from __future__ import annotations

import struct

from raftstate.batchentry import id_at
from raftstate.internal.v1 import storage_pb2
from raftstate.model import DeviceView

HEAD = struct.Struct("<QQqqQIIqI")
HEAD_SIZE = HEAD.size
#: The head of a snapshot-format-2 record (no presence fields).
HEAD_V2_SIZE = struct.calcsize("<QQqqQII")
#: ``flags`` bit: the device is offline (an expiry committed since its last heartbeat).
FLAG_OFFLINE = 1
#: Offsets of single fields in HEAD.
REVISION_AT = 8
LAST_SEEN_AT = 24
FLAGS_AT = 56
_I64 = struct.Struct("<q")
_PRESENCE = struct.Struct("<qI")
_SEQ = struct.Struct("<Q")


def pack(
    seq: int,
    revision: int,
    first_seen_ms: int,
    last_seen_ms: int,
    heartbeats: int,
    ttl_s: int,
    state_bytes: int,
    body: bytes,
    presence_changed_ms: int = 0,
    flags: int = 0,
) -> bytes:
    """The stored record for these values; ``body`` is the device's encoded
    ``HeartbeatRecord`` (its id first)."""
    return (
        HEAD.pack(
            seq,
            revision,
            first_seen_ms,
            last_seen_ms,
            heartbeats,
            ttl_s,
            state_bytes,
            presence_changed_ms,
            flags,
        )
        + body
    )


Head = tuple[int, int, int, int, int, int, int, int, int]


def head(record: bytes) -> Head:
    """``(seq, revision, first_seen_ms, last_seen_ms, heartbeats, ttl_s,
    state_bytes, presence_changed_ms, flags)`` of a stored record."""
    values: Head = HEAD.unpack_from(record)
    return values


def revision_of(record: bytes) -> int:
    """The record's revision, without unpacking the rest."""
    value: int = _SEQ.unpack_from(record, REVISION_AT)[0]
    return value


def upgrade_v2(record: bytes) -> bytes:
    """A snapshot-format-2 record (48-byte head) as a current one: online,
    its presence changed at its ``last_seen_ms``."""
    last_seen = _I64.unpack_from(record, LAST_SEEN_AT)[0]
    return record[:HEAD_V2_SIZE] + _PRESENCE.pack(last_seen, 0) + record[HEAD_V2_SIZE:]


def seq_of(record: bytes) -> int:
    """The stored seq, without unpacking the rest."""
    value: int = _SEQ.unpack_from(record)[0]
    return value


def view(record: bytes) -> DeviceView:
    """Decode a stored record for a reader."""
    seq, revision, first, last, heartbeats, ttl_s, size, changed, flags = HEAD.unpack_from(record)
    body = storage_pb2.HeartbeatRecord()
    body.ParseFromString(record[HEAD_SIZE:])
    return DeviceView(
        body.device_id,
        seq,
        dict(body.reported),
        revision,
        first,
        last,
        heartbeats,
        ttl_s,
        size,
        not flags & FLAG_OFFLINE,
        changed,
    )


def device_id_of(record: bytes) -> str:
    """The device id stored in a record, read from the BODY's first field.
    Raises ``DecodeError`` if the record does not start with it."""
    return id_at(record, HEAD_SIZE)


def from_view(d: DeviceView) -> bytes:
    """The stored record for a view (snapshot format 1 upgrade, tests)."""
    body = storage_pb2.HeartbeatRecord(
        device_id=d.device_id, seq=d.seq, reported=d.reported, ttl_s=d.ttl_s
    ).SerializeToString()
    return pack(
        d.seq,
        d.revision,
        d.first_seen_ms,
        d.last_seen_ms,
        d.heartbeats,
        d.ttl_s,
        d.state_bytes,
        body,
        d.presence_changed_ms,
        0 if d.online else FLAG_OFFLINE,
    )
