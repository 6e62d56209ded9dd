"""Values the SDK returns. Plain frozen dataclasses, converted from protobuf
at the boundary with ``from_proto``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from raftstate.errors import RaftStateError
from raftstate.v1 import cluster_pb2, device_pb2

ROLE_NAMES = {0: "unknown", 1: "follower", 2: "candidate", 3: "leader"}


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """A committed delete: ``deleted`` is false when there was no such device
    (nothing changed); ``revision`` is the store revision after it."""

    device_id: str
    deleted: bool
    revision: int
    deleted_seq: int


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """An acknowledged heartbeat: it is committed on a majority.

    ``duplicate`` is true when the cluster already held this seq or a newer
    one, so nothing changed. That happens when an earlier attempt of the
    same heartbeat committed but its answer was lost (``stored_seq == seq``)
    or when a newer heartbeat overtook it (``stored_seq > seq``).
    """

    device_id: str
    seq: int
    revision: int
    duplicate: bool
    stored_seq: int
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One heartbeat for :meth:`AsyncDeviceClient.heartbeat_batch`. ``seq``
    ``None``: the client chooses it (as for ``heartbeat``)."""

    device_id: str
    reported: Mapping[str, str]
    seq: int | None = None
    ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What became of one :class:`BatchItem`: exactly one of ``ack`` (it is
    committed on a majority) and ``error`` (a ``RaftStateError``: e.g.
    ``InvalidArgument`` naming ``heartbeats[i].<field>``, ``PermissionDenied``,
    ``QuotaExceeded``, or ``Unavailable``/``DeadlineExceeded`` when the
    deadline passed with the outcome unknown: sending the same seq again is
    safe). ``seq`` is the seq it was sent with (0 if it was never sent)."""

    device_id: str
    seq: int
    ack: HeartbeatAck | None
    error: RaftStateError | None

    @property
    def ok(self) -> bool:
        """True when the heartbeat is acknowledged."""
        return self.ack is not None


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    seq: int
    reported: Mapping[str, str]
    revision: int
    first_seen_ms: int
    last_seen_ms: int
    heartbeats: int
    ttl_s: int
    online: bool
    #: Unix ms (log time) when ``online`` last changed.
    presence_changed_ms: int = 0

    @classmethod
    def from_proto(cls, d: device_pb2.Device) -> Device:
        return cls(
            d.device_id,
            d.seq,
            dict(d.reported),
            d.revision,
            d.first_seen_ms,
            d.last_seen_ms,
            d.heartbeats,
            d.ttl_s,
            d.online,
            d.presence_changed_ms,
        )


@dataclass(frozen=True, slots=True)
class DevicePage:
    devices: tuple[Device, ...]
    next_page_token: str
    revision: int


@dataclass(frozen=True, slots=True)
class MemberStatus:
    node_id: str
    raft_address: str
    grpc_address: str
    connected: bool
    match_index: int
    #: UDP transport: "static", "host", "srflx", "relay" or "none"; "" otherwise.
    path: str = ""
    #: ``None``: not measured (no traffic on the link yet, or not UDP).
    rtt_ms: float | None = None
    loss_rate: float | None = None
    retransmissions: int = 0
    sessions: int = 0
    paths: int = 0
    #: On the leader: entries sent to that member this term / sent again.
    entries_sent: int = 0
    entries_resent: int = 0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """One node's view of the cluster (``Cluster.Status``)."""

    node_id: str
    role: str
    term: int
    commit_index: int
    last_applied: int
    leader_id: str
    leader_grpc_address: str
    members: tuple[MemberStatus, ...]
    revision: int
    devices: int
    transport: str
    durability: str
    #: UDP transport: datagrams dropped since start, by reason.
    transport_drops: Mapping[str, int] = field(default_factory=dict)
    #: Index of the last entry in this node's log (appended, maybe uncommitted).
    last_log_index: int = 0
    #: Raft ticks that raised since the node started, and the last such error.
    tick_failures: int = 0
    last_tick_error: str = ""
    #: Lost data found at start; not voting until caught up with a leader.
    catching_up: bool = False
    journal_bytes: int = 0

    @classmethod
    def from_proto(cls, s: cluster_pb2.StatusResponse) -> ClusterStatus:
        return cls(
            node_id=s.node_id,
            role=ROLE_NAMES.get(s.role, "unknown"),
            term=s.term,
            commit_index=s.commit_index,
            last_applied=s.last_applied,
            leader_id=s.leader_id,
            leader_grpc_address=s.leader_grpc_address,
            members=tuple(
                MemberStatus(
                    m.node_id,
                    m.raft_address,
                    m.grpc_address,
                    m.connected,
                    m.match_index,
                    m.path,
                    m.rtt_ms if m.HasField("rtt_ms") else None,
                    m.loss_rate if m.HasField("loss_rate") else None,
                    m.retransmissions,
                    m.sessions,
                    m.paths,
                    m.entries_sent,
                    m.entries_resent,
                )
                for m in s.members
            ),
            revision=s.revision,
            devices=s.devices,
            transport=s.transport,
            durability=s.durability,
            transport_drops=dict(s.transport_drops),
            last_log_index=s.last_log_index,
            tick_failures=s.tick_failures,
            last_tick_error=s.last_tick_error,
            catching_up=s.catching_up,
            journal_bytes=s.journal_bytes,
        )


class EventKind(enum.IntEnum):
    """What a committed change was (``raftstate.v1.EventKind``). One event
    may be several kinds (a heartbeat from an offline device is HEARTBEAT
    and ONLINE)."""

    REPORTED_CHANGED = 1
    HEARTBEAT = 2
    ONLINE = 3
    OFFLINE = 4
    DELETED = 5


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One committed change to one device, as a watch delivers it.
    ``device`` is the state after it (``None`` when deleted);
    ``prev_device`` the state before it, when the watch asked for it and the
    device existed."""

    revision: int
    device_id: str
    kinds: frozenset[EventKind]
    device: Device | None
    prev_device: Device | None
    time_ms: int

    @classmethod
    def from_proto(cls, ev: device_pb2.Event) -> WatchEvent:
        return cls(
            ev.revision,
            ev.device_id,
            frozenset(EventKind(k) for k in ev.kinds if 1 <= k <= 5),
            Device.from_proto(ev.device) if ev.HasField("device") else None,
            Device.from_proto(ev.prev_device) if ev.HasField("prev_device") else None,
            ev.time_ms,
        )


@dataclass(frozen=True, slots=True)
class Listing:
    """Every matching device as of one store ``revision`` (all pages read at
    that revision); :meth:`AsyncDeviceClient.list_then_watch` then watches
    from ``revision + 1``, so the listing plus the events is exact."""

    devices: tuple[Device, ...]
    revision: int
