"""Wire encoding of Watch responses, built from bytes shared across watchers.

Theory of operation. Building and serializing an ``Event`` protobuf costs
~100 microseconds in Python (parse the stored record, build a dict, build
the message); doing it per watcher would cap fan-out far below 100,000
events/s. So :func:`encode_event` writes the ``Event`` bytes directly: the
stored record's BODY is the device's ``HeartbeatRecord``, whose fields 1
(device_id) and 3 (reported) have the same numbers and types as ``Device``'s,
so their bytes are copied as they are (:func:`device_bytes` scans the BODY's
tags, skipping its seq and ttl_s) and the other ``Device`` fields, from the
record's HEAD, are one small message serialized in C, appended (protobuf
parsers merge fields in any order). :func:`event_pb` is the message-building reference the
tests compare it with. Protobuf messages concatenate, too: a
``WatchResponse`` is the concatenation of its fields, and a repeated message
field is ``tag, length, bytes`` per element. So each event is serialized
once per ``prev_device`` flag (:func:`encode_event`, cached by the hub) as an
already framed ``events`` field, and a response is the join of those frames
plus the ``revision`` and ``created`` fields (:func:`response`). The Watch
handler yields these bytes; the server's response serializer passes
``bytes`` through unchanged (raftstate/rpcguard.py). Clients decode a normal
``WatchResponse``. Pure functions; any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raftstate import devicerecord
from raftstate.errors import DecodeError
from raftstate.model import DeviceView
from raftstate.v1 import device_pb2
from raftstate.watchhub import EventLike

#: ``WatchResponse`` field tags (field number << 3 | wire type).
_EVENTS_TAG = b"\x0a"  # 1, length-delimited
_REVISION_TAG = b"\x10"  # 2, varint
_CREATED = b"\x18\x01"  # 3, varint true

#: EventKind values in bit order (bit = 1 << value).
_KIND_VALUES = tuple(range(1, 6))


_SMALL = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def kinds_of(mask: int) -> list[Any]:
    """The EventKind values whose bits are set in ``mask``, ascending."""
    return [k for k in _KIND_VALUES if mask & (1 << k)]


def device_pb(view: DeviceView) -> device_pb2.Device:
    """A device record as the public ``Device`` message (the reference)."""
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


def event_pb(ev: EventLike, prev_device: bool) -> device_pb2.Event:
    """``ev`` as the public ``Event`` message (``prev_device`` only when asked
    for and the device existed before). The reference for :func:`encode_event`."""
    msg = device_pb2.Event(
        revision=ev.revision, device_id=ev.device_id, kinds=kinds_of(ev.kinds), time_ms=ev.time_ms
    )
    if ev.after is not None:
        msg.device.CopyFrom(device_pb(devicerecord.view(ev.after)))
    if prev_device and ev.before is not None:
        msg.prev_device.CopyFrom(device_pb(devicerecord.view(ev.before)))
    return msg


_Device = device_pb2.Device
_Event = device_pb2.Event
_HEAD = devicerecord.HEAD
_HEAD_SIZE = devicerecord.HEAD_SIZE
_OFFLINE = devicerecord.FLAG_OFFLINE


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise DecodeError("device record: truncated or overlong varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def device_bytes(record: bytes) -> bytes:
    """The serialized ``Device`` message of a stored record (parses to what
    :func:`device_pb` builds).

    The BODY is a ``HeartbeatRecord``: fields 1-3 (device_id, seq, reported)
    are ``Device``'s fields 1-3 with the same types and values, and its
    field 4 (ttl_s) collides with ``Device.revision``, a varint too. A
    parser keeps the LAST value of a repeated scalar field (protobuf
    encoding spec, "Last One Wins"), so the BODY followed by the HEAD's
    fields (revision among them, never 0 in a stored record) is the right
    ``Device``: no byte of the BODY is parsed in Python. A record with
    revision 0 (never stored; tests) takes the slow path, which drops the
    BODY's field 4. Raises ``DecodeError`` for a broken BODY there."""
    seq, revision, first, last, heartbeats, ttl_s, _, changed, flags = _HEAD.unpack_from(record)
    scalars: bytes = _Device(
        seq=seq,
        revision=revision,
        first_seen_ms=first,
        last_seen_ms=last,
        heartbeats=heartbeats,
        ttl_s=ttl_s,
        online=not flags & _OFFLINE,
        presence_changed_ms=changed,
    ).SerializeToString()
    if revision:
        return record[_HEAD_SIZE:] + scalars
    return _without_field_4(record, _HEAD_SIZE) + scalars


def _without_field_4(data: bytes, i: int) -> bytes:
    """``data[i:]`` (protobuf fields) without its field-4 occurrences."""
    keep: list[bytes] = []
    n = len(data)
    while i < n:
        tag, j = _read_varint(data, i)
        wire = tag & 7
        if wire == 0:
            _, j = _read_varint(data, j)
        elif wire == 2:
            length, j = _read_varint(data, j)
            j += length
        elif wire == 1:
            j += 8
        elif wire == 5:
            j += 4
        else:
            raise DecodeError(f"device record: wire type {wire}")
        if j > n:
            raise DecodeError("device record: field past the end")
        if tag >> 3 != 4:
            keep.append(data[i:j])
        i = j
    return b"".join(keep)


def encode_event(ev: EventLike, prev_device: bool) -> bytes:
    """``ev`` as one framed ``WatchResponse.events`` element (module docstring)."""
    parts = [
        _Event(
            revision=ev.revision,
            device_id=ev.device_id,
            kinds=kinds_of(ev.kinds),
            time_ms=ev.time_ms,
        ).SerializeToString()
    ]
    if ev.after is not None:
        dev = device_bytes(ev.after)
        parts.append(b"\x22" + varint(len(dev)) + dev)
    if prev_device and ev.before is not None:
        dev = device_bytes(ev.before)
        parts.append(b"\x2a" + varint(len(dev)) + dev)
    body = b"".join(parts)
    return _EVENTS_TAG + varint(len(body)) + body


def response(frames: Sequence[bytes], revision: int, created: bool = False) -> bytes:
    """A serialized ``WatchResponse`` with these framed events."""
    tail = _REVISION_TAG + varint(revision) if revision else b""
    if created:
        tail += _CREATED
    if not frames:
        return tail
    return b"".join(frames) + tail


__all__ = [
    "device_bytes",
    "device_pb",
    "encode_event",
    "event_pb",
    "kinds_of",
    "response",
    "varint",
]
