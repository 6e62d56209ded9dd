"""The device model: limits, validation and the typed values passed around.

Validation happens once, on the node that receives a request, before anything
is proposed to Raft; the state machine trusts what is in the log. Every
rejection is an :class:`~raftstate.errors.InvalidArgument` naming the field.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from raftstate.errors import InvalidArgument

DEVICE_ID_MAX = 128
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REPORTED_MAX_ENTRIES = 64
REPORTED_MAX_BYTES = 8 * 1024
REPORTED_KEY_MAX = 256
TTL_MAX_S = 7 * 24 * 3600
SEQ_MAX = 2**64 - 1
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
#: Bytes of one ``HeartbeatBatch`` around its records: ``proposed_at_ms``,
#: ``max_devices`` and ``max_state_bytes``, each a tag and a varint.
BATCH_HEADER_BOUND = 33
#: Framing of one heartbeat in a batch entry besides its id and reported
#: bytes. Format 2 (raftstate/batchentry.py): the record head (20), then the
#: ``HeartbeatRecord``: the id's tag and length (3), seq (11), ttl_s (6) =
#: 40. (Format 1 needed 24: the record's own tag and length instead of the head.)
_RECORD_FRAMING = 40
#: Framing of one reported map entry: entry tag and length (3), key tag and
#: length (3), value tag and length (3).
_MAP_ENTRY_FRAMING = 9


def record_bound(device_id: str, reported_bytes: int, entries: int) -> int:
    """An upper bound on the encoded bytes of one heartbeat's record in a
    ``HeartbeatBatch`` log entry (``device_id`` is ASCII by validation). The
    batcher sums these, so an entry never exceeds its byte bound."""
    return len(device_id) + reported_bytes + _MAP_ENTRY_FRAMING * entries + _RECORD_FRAMING


#: The largest record a valid heartbeat can encode to.
RECORD_MAX_BYTES = (
    DEVICE_ID_MAX + REPORTED_MAX_BYTES + _MAP_ENTRY_FRAMING * REPORTED_MAX_ENTRIES + _RECORD_FRAMING
)


class Consistency(enum.IntEnum):
    """Read consistency; values match ``raftstate.v1.Consistency``."""

    LINEARIZABLE = 1
    SERIALIZABLE = 2


class OnlineFilter(enum.IntEnum):
    """Values match ``raftstate.v1.OnlineFilter``."""

    ALL = 1
    ONLINE = 2
    OFFLINE = 3


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One validated heartbeat, as it will be recorded in the log."""

    device_id: str
    seq: int
    reported: Mapping[str, str]
    ttl_s: int = 0
    #: UTF-8 bytes of the reported keys and values (computed by validation).
    reported_bytes: int = 0

    @property
    def record_bound(self) -> int:
        """Upper bound on this heartbeat's encoded record (see :func:`record_bound`)."""
        return record_bound(self.device_id, self.reported_bytes, len(self.reported))


class HeartbeatResult(NamedTuple):
    """What applying one heartbeat did. ``revision`` is the device's revision
    after the heartbeat (unchanged for a duplicate). A named tuple: apply makes
    one per heartbeat on every node, and a frozen dataclass cost twice as much
    to build."""

    revision: int
    duplicate: bool
    stored_seq: int
    #: Non-empty when a quota refused the heartbeat (nothing changed): the
    #: quota's field name, ``max_devices`` or ``max_state_bytes``.
    rejected: str = ""


@dataclass(frozen=True, slots=True)
class DeviceView:
    """A read-only copy of one device's stored state."""

    device_id: str
    seq: int
    reported: Mapping[str, str]
    revision: int
    first_seen_ms: int
    last_seen_ms: int
    heartbeats: int
    ttl_s: int
    #: UTF-8 bytes of the id and reported keys and values (the quota measure).
    state_bytes: int = 0
    #: Committed presence: True from a heartbeat until an expiry commits
    #: (raftstate/presence.py); the same on every node at a revision.
    online: bool = True
    #: Log time (Unix ms) when ``online`` last changed.
    presence_changed_ms: int = 0

    @property
    def deadline_ms(self) -> int:
        """Log time after which the leader may expire the device."""
        return self.last_seen_ms + self.ttl_s * 1000


@dataclass(frozen=True, slots=True)
class DevicePage:
    """One page of a listing. ``next_after`` is the last device id on the
    page when more may follow, else ``None``."""

    devices: list[DeviceView] = field(default_factory=list)
    next_after: str | None = None


def validate_device_id(device_id: str, field_name: str = "device_id") -> str:
    """Return ``device_id`` or raise ``InvalidArgument``."""
    if not device_id:
        raise InvalidArgument(field_name, "must not be empty")
    if len(device_id) > DEVICE_ID_MAX:
        raise InvalidArgument(field_name, f"longer than {DEVICE_ID_MAX} characters")
    if DEVICE_ID_RE.fullmatch(device_id) is None:
        raise InvalidArgument(field_name, "may only contain A-Z a-z 0-9 . _ : -")
    return device_id


def validate_heartbeat(
    device_id: str,
    seq: int,
    reported: Mapping[str, str],
    ttl_s: int,
    *,
    now_us: int | None = None,
    max_seq_ahead_s: int = 0,
) -> Heartbeat:
    """Check one heartbeat against the limits and return it as a value.

    With ``now_us`` (the receiving node's clock, Unix microseconds) and
    ``max_seq_ahead_s > 0``, a seq above ``now_us + max_seq_ahead_s * 10**6``
    is refused: automatic seqs are Unix microseconds, so such a seq can only
    be a mistake or an attempt to make every later heartbeat of the device a
    stale duplicate. Small counter seqs stay valid.

    Raises ``InvalidArgument`` naming the first field that breaks a rule.
    """
    validate_device_id(device_id)
    if seq <= 0:
        raise InvalidArgument("seq", "must be at least 1")
    if seq > SEQ_MAX:
        raise InvalidArgument("seq", "must fit in 64 bits")
    if now_us is not None and max_seq_ahead_s > 0:
        limit = now_us + max_seq_ahead_s * 1_000_000
        if seq > limit:
            raise InvalidArgument(
                "seq",
                f"{seq} is more than max_seq_ahead_s = {max_seq_ahead_s} s of microseconds "
                f"ahead of this node's clock ({now_us} us); use a counter or Unix "
                f"microseconds",
            )
    if len(reported) > REPORTED_MAX_ENTRIES:
        raise InvalidArgument(
            "reported", f"has {len(reported)} entries, at most {REPORTED_MAX_ENTRIES} allowed"
        )
    total = 0
    for key, value in reported.items():
        if not key:
            raise InvalidArgument("reported", "keys must not be empty")
        if len(key) > REPORTED_KEY_MAX:
            raise InvalidArgument("reported", f"key longer than {REPORTED_KEY_MAX} characters")
        total += len(key.encode()) + len(value.encode())
    if total > REPORTED_MAX_BYTES:
        raise InvalidArgument(
            "reported", f"is {total} bytes of keys and values, at most {REPORTED_MAX_BYTES}"
        )
    if ttl_s < 0 or ttl_s > TTL_MAX_S:
        raise InvalidArgument("ttl_s", f"must be between 0 and {TTL_MAX_S} seconds")
    return Heartbeat(device_id, seq, reported, ttl_s, total)


def validate_seq_ttl(seq: int | None, ttl_s: int | None) -> None:
    """Client-side range check of a heartbeat's numbers before they are put
    in a protobuf (which would raise ``ValueError`` for a negative or a
    65-bit value). ``None`` is "choose for me". Raises ``InvalidArgument``
    naming ``seq`` or ``ttl_s``."""
    if seq is not None and not 1 <= seq <= SEQ_MAX:
        raise InvalidArgument("seq", f"must be from 1 to {SEQ_MAX}, got {seq}")
    if ttl_s is not None and not 0 <= ttl_s <= TTL_MAX_S:
        raise InvalidArgument("ttl_s", f"must be between 0 and {TTL_MAX_S} seconds, got {ttl_s}")


def validate_consistency(value: int) -> Consistency:
    """Map a wire enum value to :class:`Consistency`; 0 means LINEARIZABLE."""
    if value == 0:
        return Consistency.LINEARIZABLE
    try:
        return Consistency(value)
    except ValueError:
        raise InvalidArgument("consistency", f"unknown value {value}") from None


def validate_filter(value: int) -> OnlineFilter:
    """Map a wire enum value to :class:`OnlineFilter`; 0 means ALL."""
    if value == 0:
        return OnlineFilter.ALL
    try:
        return OnlineFilter(value)
    except ValueError:
        raise InvalidArgument("filter", f"unknown value {value}") from None


def validate_page_size(value: int) -> int:
    """Return the effective page size; 0 means the default."""
    if value == 0:
        return PAGE_SIZE_DEFAULT
    if value > PAGE_SIZE_MAX:
        raise InvalidArgument("page_size", f"must be at most {PAGE_SIZE_MAX}")
    return value
