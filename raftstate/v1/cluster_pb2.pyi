from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_FOLLOWER: _ClassVar[Role]
    ROLE_CANDIDATE: _ClassVar[Role]
    ROLE_LEADER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_FOLLOWER: Role
ROLE_CANDIDATE: Role
ROLE_LEADER: Role

class Member(_message.Message):
    __slots__ = ("node_id", "raft_address", "grpc_address", "connected", "match_index", "path", "rtt_ms", "loss_rate", "retransmissions", "sessions", "paths", "entries_sent", "entries_resent")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    MATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    LOSS_RATE_FIELD_NUMBER: _ClassVar[int]
    RETRANSMISSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_SENT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_RESENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    raft_address: str
    grpc_address: str
    connected: bool
    match_index: int
    path: str
    rtt_ms: float
    loss_rate: float
    retransmissions: int
    sessions: int
    paths: int
    entries_sent: int
    entries_resent: int
    def __init__(self, node_id: _Optional[str] = ..., raft_address: _Optional[str] = ..., grpc_address: _Optional[str] = ..., connected: _Optional[bool] = ..., match_index: _Optional[int] = ..., path: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., loss_rate: _Optional[float] = ..., retransmissions: _Optional[int] = ..., sessions: _Optional[int] = ..., paths: _Optional[int] = ..., entries_sent: _Optional[int] = ..., entries_resent: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "role", "term", "commit_index", "last_applied", "leader_id", "leader_grpc_address", "members", "revision", "devices", "transport", "durability", "transport_drops", "last_log_index", "tick_failures", "last_tick_error", "catching_up", "journal_bytes", "max_tick_ms", "tick_stalls", "max_tick_cpu_ms", "elections", "leader_changes", "heartbeat_ms", "election_timeout_min_ms", "election_timeout_max_ms", "leader_step_down_ms", "timing_source")
    class TransportDropsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_DROPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    TICK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_TICK_ERROR_FIELD_NUMBER: _ClassVar[int]
    CATCHING_UP_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TICK_MS_FIELD_NUMBER: _ClassVar[int]
    TICK_STALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_TICK_CPU_MS_FIELD_NUMBER: _ClassVar[int]
    ELECTIONS_FIELD_NUMBER: _ClassVar[int]
    LEADER_CHANGES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    ELECTION_TIMEOUT_MIN_MS_FIELD_NUMBER: _ClassVar[int]
    ELECTION_TIMEOUT_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_STEP_DOWN_MS_FIELD_NUMBER: _ClassVar[int]
    TIMING_SOURCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    term: int
    commit_index: int
    last_applied: int
    leader_id: str
    leader_grpc_address: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    revision: int
    devices: int
    transport: str
    durability: str
    transport_drops: _containers.ScalarMap[str, int]
    last_log_index: int
    tick_failures: int
    last_tick_error: str
    catching_up: bool
    journal_bytes: int
    max_tick_ms: float
    tick_stalls: int
    max_tick_cpu_ms: float
    elections: int
    leader_changes: int
    heartbeat_ms: float
    election_timeout_min_ms: float
    election_timeout_max_ms: float
    leader_step_down_ms: float
    timing_source: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., last_applied: _Optional[int] = ..., leader_id: _Optional[str] = ..., leader_grpc_address: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., revision: _Optional[int] = ..., devices: _Optional[int] = ..., transport: _Optional[str] = ..., durability: _Optional[str] = ..., transport_drops: _Optional[_Mapping[str, int]] = ..., last_log_index: _Optional[int] = ..., tick_failures: _Optional[int] = ..., last_tick_error: _Optional[str] = ..., catching_up: _Optional[bool] = ..., journal_bytes: _Optional[int] = ..., max_tick_ms: _Optional[float] = ..., tick_stalls: _Optional[int] = ..., max_tick_cpu_ms: _Optional[float] = ..., elections: _Optional[int] = ..., leader_changes: _Optional[int] = ..., heartbeat_ms: _Optional[float] = ..., election_timeout_min_ms: _Optional[float] = ..., election_timeout_max_ms: _Optional[float] = ..., leader_step_down_ms: _Optional[float] = ..., timing_source: _Optional[str] = ...) -> None: ...
