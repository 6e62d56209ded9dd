from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[Consistency]
    CONSISTENCY_LINEARIZABLE: _ClassVar[Consistency]
    CONSISTENCY_SERIALIZABLE: _ClassVar[Consistency]

class OnlineFilter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ONLINE_FILTER_UNSPECIFIED: _ClassVar[OnlineFilter]
    ONLINE_FILTER_ALL: _ClassVar[OnlineFilter]
    ONLINE_FILTER_ONLINE: _ClassVar[OnlineFilter]
    ONLINE_FILTER_OFFLINE: _ClassVar[OnlineFilter]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_REPORTED_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_HEARTBEAT: _ClassVar[EventKind]
    EVENT_KIND_ONLINE: _ClassVar[EventKind]
    EVENT_KIND_OFFLINE: _ClassVar[EventKind]
    EVENT_KIND_DELETED: _ClassVar[EventKind]
CONSISTENCY_UNSPECIFIED: Consistency
CONSISTENCY_LINEARIZABLE: Consistency
CONSISTENCY_SERIALIZABLE: Consistency
ONLINE_FILTER_UNSPECIFIED: OnlineFilter
ONLINE_FILTER_ALL: OnlineFilter
ONLINE_FILTER_ONLINE: OnlineFilter
ONLINE_FILTER_OFFLINE: OnlineFilter
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_REPORTED_CHANGED: EventKind
EVENT_KIND_HEARTBEAT: EventKind
EVENT_KIND_ONLINE: EventKind
EVENT_KIND_OFFLINE: EventKind
EVENT_KIND_DELETED: EventKind

class HeartbeatRequest(_message.Message):
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

class HeartbeatResponse(_message.Message):
    __slots__ = ("revision", "duplicate", "stored_seq")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STORED_SEQ_FIELD_NUMBER: _ClassVar[int]
    revision: int
    duplicate: bool
    stored_seq: int
    def __init__(self, revision: _Optional[int] = ..., duplicate: _Optional[bool] = ..., stored_seq: _Optional[int] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("device_id", "seq", "code", "message", "result", "details")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    code: int
    message: str
    result: HeartbeatResponse
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., result: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class HeartbeatStreamRequest(_message.Message):
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

class HeartbeatStreamResponse(_message.Message):
    __slots__ = ("device_id", "seq", "code", "message", "result", "details")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    code: int
    message: str
    result: HeartbeatResponse
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., result: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class HeartbeatBatchRequest(_message.Message):
    __slots__ = ("heartbeats",)
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    heartbeats: _containers.RepeatedCompositeFieldContainer[HeartbeatRequest]
    def __init__(self, heartbeats: _Optional[_Iterable[_Union[HeartbeatRequest, _Mapping]]] = ...) -> None: ...

class HeartbeatBatchResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[HeartbeatAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[HeartbeatAck, _Mapping]]] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "seq", "reported", "revision", "first_seen_ms", "last_seen_ms", "heartbeats", "ttl_s", "online", "presence_changed_ms")
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
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_CHANGED_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    reported: _containers.ScalarMap[str, str]
    revision: int
    first_seen_ms: int
    last_seen_ms: int
    heartbeats: int
    ttl_s: int
    online: bool
    presence_changed_ms: int
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., reported: _Optional[_Mapping[str, str]] = ..., revision: _Optional[int] = ..., first_seen_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ..., heartbeats: _Optional[int] = ..., ttl_s: _Optional[int] = ..., online: _Optional[bool] = ..., presence_changed_ms: _Optional[int] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("device_id", "consistency", "at_revision")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    AT_REVISION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    consistency: Consistency
    at_revision: int
    def __init__(self, device_id: _Optional[str] = ..., consistency: _Optional[_Union[Consistency, str]] = ..., at_revision: _Optional[int] = ...) -> None: ...

class GetDeviceResponse(_message.Message):
    __slots__ = ("device", "revision")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    device: Device
    revision: int
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token", "filter", "consistency", "at_revision")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    AT_REVISION_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    filter: OnlineFilter
    consistency: Consistency
    at_revision: int
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Union[OnlineFilter, str]] = ..., consistency: _Optional[_Union[Consistency, str]] = ..., at_revision: _Optional[int] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token", "revision")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    next_page_token: str
    revision: int
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class DeleteDeviceResponse(_message.Message):
    __slots__ = ("deleted", "revision", "deleted_seq")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DELETED_SEQ_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    revision: int
    deleted_seq: int
    def __init__(self, deleted: _Optional[bool] = ..., revision: _Optional[int] = ..., deleted_seq: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("start_revision", "prefix", "device_ids", "kinds", "prev_device", "progress_interval_ms")
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    PREV_DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    start_revision: int
    prefix: str
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    prev_device: bool
    progress_interval_ms: int
    def __init__(self, start_revision: _Optional[int] = ..., prefix: _Optional[str] = ..., device_ids: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., prev_device: _Optional[bool] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("revision", "device_id", "kinds", "device", "prev_device", "time_ms")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PREV_DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    device_id: str
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    device: Device
    prev_device: Device
    time_ms: int
    def __init__(self, revision: _Optional[int] = ..., device_id: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., device: _Optional[_Union[Device, _Mapping]] = ..., prev_device: _Optional[_Union[Device, _Mapping]] = ..., time_ms: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "revision", "created")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    revision: int
    created: bool
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...
