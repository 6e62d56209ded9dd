from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeartbeatRecord(_message.Message):
    __slots__ = ("device_id", "seq", "reported", "ttl_s")
    class ReportedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    reported: _containers.ScalarMap[str, str]
    ttl_s: int
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., reported: _Optional[_Mapping[str, str]] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("proposed_at_ms", "heartbeats", "max_devices", "max_state_bytes")
    PROPOSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    proposed_at_ms: int
    heartbeats: _containers.RepeatedCompositeFieldContainer[HeartbeatRecord]
    max_devices: int
    max_state_bytes: int
    def __init__(self, proposed_at_ms: _Optional[int] = ..., heartbeats: _Optional[_Iterable[_Union[HeartbeatRecord, _Mapping]]] = ..., max_devices: _Optional[int] = ..., max_state_bytes: _Optional[int] = ...) -> None: ...

class ControlCommand(_message.Message):
    __slots__ = ("proposed_at_ms", "delete_device", "revoke_token", "expire_devices")
    PROPOSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DELETE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    proposed_at_ms: int
    delete_device: DeleteDevice
    revoke_token: RevokeToken
    expire_devices: ExpireDevices
    def __init__(self, proposed_at_ms: _Optional[int] = ..., delete_device: _Optional[_Union[DeleteDevice, _Mapping]] = ..., revoke_token: _Optional[_Union[RevokeToken, _Mapping]] = ..., expire_devices: _Optional[_Union[ExpireDevices, _Mapping]] = ...) -> None: ...

class ExpireDevices(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[ExpiredDevice]
    def __init__(self, devices: _Optional[_Iterable[_Union[ExpiredDevice, _Mapping]]] = ...) -> None: ...

class ExpiredDevice(_message.Message):
    __slots__ = ("device_id", "revision")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    revision: int
    def __init__(self, device_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteDevice(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class RevokeToken(_message.Message):
    __slots__ = ("token_id", "expires_at_s")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_S_FIELD_NUMBER: _ClassVar[int]
    token_id: bytes
    expires_at_s: int
    def __init__(self, token_id: _Optional[bytes] = ..., expires_at_s: _Optional[int] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("token_id", "expires_at_s")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_S_FIELD_NUMBER: _ClassVar[int]
    token_id: bytes
    expires_at_s: int
    def __init__(self, token_id: _Optional[bytes] = ..., expires_at_s: _Optional[int] = ...) -> None: ...

class DeviceRecord(_message.Message):
    __slots__ = ("device_id", "seq", "reported", "revision", "first_seen_ms", "last_seen_ms", "heartbeats", "ttl_s")
    class ReportedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    reported: _containers.ScalarMap[str, str]
    revision: int
    first_seen_ms: int
    last_seen_ms: int
    heartbeats: int
    ttl_s: int
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., reported: _Optional[_Mapping[str, str]] = ..., revision: _Optional[int] = ..., first_seen_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ..., heartbeats: _Optional[int] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class RaftEntry(_message.Message):
    __slots__ = ("command", "index", "term")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    command: bytes
    index: int
    term: int
    def __init__(self, command: _Optional[bytes] = ..., index: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("format", "revision", "max_proposed_at_ms", "devices", "last_entry", "prev_entry", "cluster", "revocations", "device_count")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_PROPOSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LAST_ENTRY_FIELD_NUMBER: _ClassVar[int]
    PREV_ENTRY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    format: int
    revision: int
    max_proposed_at_ms: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceRecord]
    last_entry: RaftEntry
    prev_entry: RaftEntry
    cluster: _containers.RepeatedScalarFieldContainer[str]
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    device_count: int
    def __init__(self, format: _Optional[int] = ..., revision: _Optional[int] = ..., max_proposed_at_ms: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceRecord, _Mapping]]] = ..., last_entry: _Optional[_Union[RaftEntry, _Mapping]] = ..., prev_entry: _Optional[_Union[RaftEntry, _Mapping]] = ..., cluster: _Optional[_Iterable[str]] = ..., revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ..., device_count: _Optional[int] = ...) -> None: ...
