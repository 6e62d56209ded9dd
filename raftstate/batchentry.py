"""The heartbeat batch log entry, format 2: fixed heads apply reads with ``struct``.

Theory of operation. Format 1 was one protobuf ``HeartbeatBatch``. Applying it
walked the repeated field through a Python wrapper per heartbeat, read each
field through another, re-serialized each record and summed the ``reported``
map's UTF-8 bytes through the map view: a third of a node's CPU under a
gateway load went there, on every node. Format 2 keeps each heartbeat's
record as the protobuf bytes every node stores (raftstate/devicerecord.py)
and puts what apply needs in a fixed head in front of it::

    0xFF | head: proposed_at_ms i64 | max_devices u64 | max_state_bytes u64 | count u32
    then per heartbeat:  body_len u32 | seq u64 | ttl_s u32 | state_bytes u32 | body

``body`` is the heartbeat's ``storage.HeartbeatRecord`` (its device id
first); ``state_bytes`` is the quota measure computed by the proposing node
when it validated the heartbeat (the id's and the map's UTF-8 bytes). Apply
reads one ``struct`` per heartbeat and slices; the table stores ``body``.

0xFF cannot begin a protobuf message (wire type 7 does not exist), so apply
tells the formats apart by the first byte and format-1 entries already in a
journal still apply. All nodes apply what the log holds, so the values in
the head are trusted like the rest of the entry.

Pure functions; any thread.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping

from raftstate.admission import Quota
from raftstate.errors import DecodeError
from raftstate.internal.v1 import storage_pb2
from raftstate.model import Heartbeat

MAGIC = b"\xff"
HEAD = struct.Struct("<qQQI")
RECORD = struct.Struct("<IQII")
#: Bytes before the first record: the magic and the head.
HEAD_SIZE = len(MAGIC) + HEAD.size


def encode(
    heartbeats: Iterable[Heartbeat], proposed_at_ms: int, quota: Quota | None = None
) -> bytes:
    """One format-2 entry of validated heartbeats. An empty iterable is a
    barrier entry that changes nothing."""
    parts: list[bytes] = [b""]
    record = storage_pb2.HeartbeatRecord
    pack = RECORD.pack
    count = 0
    for hb in heartbeats:
        # Deterministic: map entries sorted by key, so an unchanged map is
        # the same bytes whoever proposes it (apply's REPORTED_CHANGED test).
        body = record(
            device_id=hb.device_id, seq=hb.seq, reported=hb.reported, ttl_s=hb.ttl_s
        ).SerializeToString(deterministic=True)
        size = len(hb.device_id) + (hb.reported_bytes or _map_bytes(hb.reported))
        parts.append(pack(len(body), hb.seq, hb.ttl_s, size))
        parts.append(body)
        count += 1
    q = quota or Quota(0, 0)
    parts[0] = MAGIC + HEAD.pack(proposed_at_ms, q.max_devices, q.max_state_bytes, count)
    return b"".join(parts)


def _map_bytes(reported: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in reported.items())


def is_v2(entry: bytes) -> bool:
    return entry[:1] == MAGIC


def decode_head(entry: bytes) -> tuple[int, Quota, int]:
    """``(proposed_at_ms, quota, count)``; raises ``DecodeError``."""
    if len(entry) < HEAD_SIZE or entry[:1] != MAGIC:
        raise DecodeError("log entry is not a format-2 heartbeat batch")
    proposed_at_ms, max_devices, max_state_bytes, count = HEAD.unpack_from(entry, 1)
    return proposed_at_ms, Quota(max_devices, max_state_bytes), count


def records(entry: bytes, count: int) -> Iterator[tuple[str, int, int, int, bytes]]:
    """``(device_id, seq, ttl_s, state_bytes, body)`` per heartbeat, checking
    every length; raises ``DecodeError`` at the first inconsistency."""
    off = HEAD_SIZE
    end = len(entry)
    unpack = RECORD.unpack_from
    size = RECORD.size
    for _ in range(count):
        if off + size > end:
            raise DecodeError("heartbeat batch entry ends inside a record head")
        body_len, seq, ttl_s, state_bytes = unpack(entry, off)
        off += size
        if off + body_len > end:
            raise DecodeError("heartbeat batch entry ends inside a record")
        body = entry[off : off + body_len]
        off += body_len
        yield id_at(body, 0), seq, ttl_s, state_bytes, body
    if off != end:
        raise DecodeError("heartbeat batch entry has bytes after its last record")


def id_at(buf: bytes, off: int) -> str:
    """The device id of the ``HeartbeatRecord`` whose bytes start at ``off``
    in ``buf`` (field 1 first, with a one- or two-byte length: ids are at
    most 128 ASCII characters)."""
    end = len(buf)
    if off + 3 > end or buf[off] != 0x0A:
        raise DecodeError("heartbeat record does not start with its device id")
    n = buf[off + 1]
    start = off + 2
    if n >= 0x80:
        high = buf[off + 2]
        if high >= 0x80:
            raise DecodeError("heartbeat record has a bad device id length")
        n = (n & 0x7F) | (high << 7)
        start += 1
    if n == 0 or start + n > end:
        raise DecodeError("heartbeat record has a bad device id length")
    try:
        return buf[start : start + n].decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError("heartbeat record's device id is not ASCII") from exc
