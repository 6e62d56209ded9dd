"""Pre-encoded wire bytes for the fleet load generator (``raftstate bench --fleet``).

A Python load generator that builds a protobuf message per heartbeat spends
more CPU than the server it measures. Almost all of a heartbeat is the same
from one send to the next: the device id and the reported state. So each
device's bytes are encoded once (:class:`FleetDevices`), and a request is a
``b"".join`` of those pieces around the one field that changes, the seq.

Theory of operation (protobuf encoding, developers.google.com/protocol-buffers
"Encoding": a field is ``varint(field_number << 3 | wire_type)`` then, for
wire type 2, ``varint(length)`` and the bytes):

* raftstate ``HeartbeatRequest`` = ``device_id`` (1, bytes) · ``seq`` (2,
  varint) · one ``reported`` map entry per key (3, an embedded message of
  key = 1, value = 2). ``HeartbeatBatchRequest`` repeats it as field 1.
* etcd ``TxnRequest`` (etcd-io/etcd api/etcdserverpb/rpc.proto) = ``success``
  (2) ``RequestOp``s, each a ``request_put`` (2) ``PutRequest`` of ``key``
  (1) and ``value`` (2); the value is the device's JSON with its seq.

Everything here is pure and checked against the generated classes in
tests/test_fleet_bench.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The reported state every fleet device sends: two small fields, the shape
#: the [million] memory target is stated for.
FLEET_PAYLOAD: Mapping[str, str] = {"temp_c": "21.5", "battery_pct": "87"}


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint. Raises ``ValueError``
    for a negative value."""
    if value < 0:
        raise ValueError(f"varint of a negative number: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def fleet_device_id(index: int) -> str:
    """The id of fleet device number ``index`` (same in every phase and system)."""
    return f"fleet-{index:07d}"


def encode_reported(reported: Mapping[str, str]) -> bytes:
    """The ``reported`` map (HeartbeatRequest field 3) in sorted key order."""
    return b"".join(
        _field_bytes(3, _field_bytes(1, k.encode()) + _field_bytes(2, v.encode()))
        for k, v in sorted(reported.items())
    )


@dataclass(frozen=True, slots=True)
class FleetDevices:
    """Devices ``first .. first + count - 1`` with their encodings prepared.

    ``ids[i]`` is device ``first + i``'s id; ``hb_head[i]`` its encoded
    ``device_id`` field; ``etcd_key[i]`` its encoded etcd ``key`` field.
    """

    first: int
    ids: tuple[str, ...]
    hb_head: tuple[bytes, ...]
    etcd_key: tuple[bytes, ...]
    hb_tail: bytes
    etcd_value_head: bytes
    etcd_value_tail: bytes

    @classmethod
    def make(
        cls, first: int, count: int, reported: Mapping[str, str] = FLEET_PAYLOAD
    ) -> FleetDevices:
        """Prepare ``count`` devices from ``first``. Raises ``ValueError`` for
        a negative ``first`` or ``count``."""
        if first < 0 or count < 0:
            raise ValueError(f"first and count must be >= 0, got {first}, {count}")
        ids = tuple(fleet_device_id(first + i) for i in range(count))
        # JSON of {"seq": N, **reported}: what etcd stores per device.
        rest = json.dumps(dict(sorted(reported.items())), separators=(",", ":"))[1:]
        return cls(
            first=first,
            ids=ids,
            hb_head=tuple(_field_bytes(1, i.encode()) for i in ids),
            etcd_key=tuple(_field_bytes(1, b"/devices/" + i.encode()) for i in ids),
            hb_tail=encode_reported(reported),
            etcd_value_head=b'{"seq":',
            etcd_value_tail=(b"," + rest.encode()) if rest != "}" else b"}",
        )

    def __len__(self) -> int:
        return len(self.ids)

    def heartbeat(self, i: int, seq: int) -> bytes:
        """An encoded ``HeartbeatRequest`` of local device ``i`` with ``seq``."""
        return self.hb_head[i] + b"\x10" + varint(seq) + self.hb_tail

    def heartbeat_batch(self, indexes: Sequence[int], seq: int) -> bytes:
        """An encoded ``HeartbeatBatchRequest`` of the local devices
        ``indexes``, all with ``seq``."""
        body = b"\x10" + varint(seq) + self.hb_tail
        parts: list[bytes] = []
        for i in indexes:
            head = self.hb_head[i]
            parts.append(b"\x0a" + varint(len(head) + len(body)) + head + body)
        return b"".join(parts)

    def etcd_txn(self, indexes: Sequence[int], seq: int) -> bytes:
        """An encoded etcd ``TxnRequest`` with one Put per local device in
        ``indexes`` (no compare: it always succeeds), value = JSON with ``seq``."""
        value = _field_bytes(2, self.etcd_value_head + str(seq).encode() + self.etcd_value_tail)
        parts: list[bytes] = []
        for i in indexes:
            put = self.etcd_key[i] + value
            op = b"\x12" + varint(len(put)) + put
            parts.append(b"\x12" + varint(len(op)) + op)
        return b"".join(parts)


__all__ = ["FLEET_PAYLOAD", "FleetDevices", "encode_reported", "fleet_device_id", "varint"]
