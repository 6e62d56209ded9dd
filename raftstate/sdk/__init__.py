"""The raftstate device SDK.

>>> from raftstate.sdk import DeviceClient
>>> with DeviceClient("127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003") as client:
...     ack = client.heartbeat("pump-17", {"temp_c": "21.5"})
...     device = client.get("pump-17")

A gateway sends many devices' heartbeats per call, one result per item:

>>> results = client.heartbeat_batch([("pump-17", {"temp_c": "21.5"}), ("pump-18", {})])
>>> [r.ok for r in results]

or pipelines them on one stream:

>>> async with AsyncDeviceClient(endpoints) as client, client.stream() as stream:
...     acks = await asyncio.gather(*(stream.send(d, state) for d, state in batch))

An operator follows committed changes, resuming on another node after a
failure (no loss, no duplicate), or lists then watches for an exact copy:

>>> with client.watch(prefix="pump-") as watch:
...     for event in watch:
...         print(event.revision, event.device_id, sorted(event.kinds))
>>> listing, watch = client.list_then_watch("pump-")
"""

from raftstate.errors import (
    Cancelled,
    DeadlineExceeded,
    FutureRevision,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    ResyncRequired,
    RevisionCompacted,
    Unauthenticated,
    Unavailable,
    WatcherTooSlow,
)
from raftstate.model import Consistency, OnlineFilter
from raftstate.sdk.client import AsyncDeviceClient
from raftstate.sdk.credentials import Credentials
from raftstate.sdk.retry import Backoff
from raftstate.sdk.stream import HeartbeatStream
from raftstate.sdk.sync import DeviceClient, SyncHeartbeatStream, SyncWatch
from raftstate.sdk.types import (
    BatchItem,
    BatchResult,
    ClusterStatus,
    DeleteResult,
    Device,
    DevicePage,
    EventKind,
    HeartbeatAck,
    Listing,
    MemberStatus,
    WatchEvent,
)
from raftstate.sdk.watch import Watch

__all__ = [
    "AsyncDeviceClient",
    "Backoff",
    "BatchItem",
    "BatchResult",
    "Cancelled",
    "ClusterStatus",
    "Credentials",
    "DeleteResult",
    "Consistency",
    "DeadlineExceeded",
    "Device",
    "DeviceClient",
    "DevicePage",
    "EventKind",
    "FutureRevision",
    "HeartbeatAck",
    "HeartbeatStream",
    "InvalidArgument",
    "Listing",
    "MemberStatus",
    "NotFound",
    "NotLeader",
    "OnlineFilter",
    "PermissionDenied",
    "RaftStateError",
    "QuotaExceeded",
    "ResourceExhausted",
    "ResyncRequired",
    "RevisionCompacted",
    "SyncHeartbeatStream",
    "SyncWatch",
    "Unauthenticated",
    "Unavailable",
    "Watch",
    "WatchEvent",
    "WatcherTooSlow",
]
