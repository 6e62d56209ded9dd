"""Wire encoding of Watch responses, built from bytes shared across watchers.

Theory of operation. Serializing an ``Event`` protobuf costs tens of
microseconds in Python; doing it per watcher would cap fan-out far below
100,000 events/s. Protobuf messages concatenate, though: a
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
from raftstate.model import DeviceView
from raftstate.v1 import device_pb2
from raftstate.watchhub import EventLike

#: ``WatchResponse`` field tags (field number << 3 | wire type).
_EVENTS_TAG = b"\x0a"  # 1, length-delimited
_REVISION_TAG = b"\x10"  # 2, varint
_CREATED = b"\x18\x01"  # 3, varint true

#: EventKind values in bit order (bit = 1 << value).
_KIND_VALUES = tuple(range(1, 6))


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def kinds_of(mask: int) -> list[Any]:
    """The EventKind values whose bits are set in ``mask``, ascending."""
    return [device_pb2.EventKind.ValueType(k) for k in _KIND_VALUES if mask & (1 << k)]


def device_pb(view: DeviceView, time_ms: int) -> device_pb2.Device:
    """A device record as the public ``Device`` message."""
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
    for and the device existed before)."""
    msg = device_pb2.Event(
        revision=ev.revision, device_id=ev.device_id, kinds=kinds_of(ev.kinds), time_ms=ev.time_ms
    )
    if ev.after is not None:
        msg.device.CopyFrom(device_pb(devicerecord.view(ev.after), ev.time_ms))
    if prev_device and ev.before is not None:
        msg.prev_device.CopyFrom(device_pb(devicerecord.view(ev.before), ev.time_ms))
    return msg


def encode_event(ev: EventLike, prev_device: bool) -> bytes:
    """``ev`` as one framed ``WatchResponse.events`` element."""
    body: bytes = event_pb(ev, prev_device).SerializeToString()
    return _EVENTS_TAG + varint(len(body)) + body


def response(frames: Sequence[bytes], revision: int, created: bool = False) -> bytes:
    """A serialized ``WatchResponse`` with these framed events."""
    tail = _REVISION_TAG + varint(revision) if revision else b""
    if created:
        tail += _CREATED
    if not frames:
        return tail
    return b"".join(frames) + tail


__all__ = ["device_pb", "encode_event", "event_pb", "kinds_of", "response", "varint"]
