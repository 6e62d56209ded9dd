"""Resource bounds a client cannot push past: sans-IO pieces.

Theory of operation
-------------------
Everything a client can make a node hold is bounded, and a request that
would pass a bound is refused with ``RESOURCE_EXHAUSTED`` whose message
starts with the config field that sets it (``max_streams: ...``), so the
operator knows what to raise and the client knows what it hit.

* :class:`Gate` counts what is open now (unary RPCs, streams) against a
  limit. The gRPC layer (``raftstate.rpcguard``) enters before it decodes
  anything and leaves when the RPC ends, so a refusal costs no decoding
  and holds nothing.
* :class:`Quota` and :func:`quota_refusal` decide whether one heartbeat may
  grow the table: at most ``max_devices`` devices and ``max_state_bytes`` of
  device state (:func:`state_bytes`). The state machine applies them with the
  values carried in the log entry, so every node decides alike; the receiving
  node applies them to its local table first to refuse cheaply.
* :func:`fit_page` cuts a listing to a byte budget so a response always fits
  the gRPC message limit.
* Message size limits: :data:`MAX_REQUEST_BYTES` is far above the largest
  legal request (one heartbeat: 128-character id and 8 KiB of reported
  state, about 9 KiB encoded) and far below gRPC's 4 MiB default.
  ``HeartbeatBatch`` requests may be up to :data:`MAX_BATCH_REQUEST_BYTES`
  (gRPC's own receive limit, which refuses anything larger before it is
  buffered whole); every other method's requests and stream messages are
  held to :data:`MAX_REQUEST_BYTES` by the admission layer before they are
  decoded (:func:`request_byte_limit`). A batch is also bounded in count
  (``batch_rpc_max_heartbeats``) and in how many are served at once
  (``max_concurrent_batch_rpcs``), so the bytes batch calls hold are at most
  that many times the byte limit.
  :data:`MAX_RESPONSE_BYTES` is the server's send limit and the SDK's
  receive limit; :data:`LIST_PAGE_BUDGET_BYTES` keeps every page well under it.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from raftstate.errors import QuotaExceeded, ResourceExhausted

#: The largest request message a node accepts (gRPC refuses bigger ones with
#: RESOURCE_EXHAUSTED before they reach a handler).
MAX_REQUEST_BYTES = 64 * 1024
#: The largest ``HeartbeatBatch`` request a node accepts: gRPC's default
#: message limit. 1,000 heartbeats of up to ~4 KiB each fit; 1,000 of the
#: largest legal size (~9.3 KiB) do not, so the SDK splits by bytes too.
MAX_BATCH_REQUEST_BYTES = 4 * 1024 * 1024
#: Heartbeats one ``HeartbeatBatch`` may carry, unless configured
#: (``batch_rpc_max_heartbeats``), and the most a node may be configured to take.
DEFAULT_BATCH_RPC_MAX_HEARTBEATS = 1000
BATCH_RPC_MAX_HEARTBEATS_LIMIT = 10_000
#: gRPC method path of the batch RPC (its own byte limit and gate).
BATCH_METHOD = "/raftstate.v1.DeviceStateService/HeartbeatBatch"
#: gRPC method path of Watch (its own gate, ``watch_max_watchers``) and the
#: largest WatchRequest: 1,000 device ids of up to 128 characters.
WATCH_METHOD = "/raftstate.v1.DeviceStateService/Watch"
MAX_WATCH_REQUEST_BYTES = 256 * 1024
#: The largest response message a node sends / the SDK accepts.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Encoded bytes of devices per ListDevices page (a quarter of the limit:
#: room for the envelope, and for whatever a future field adds).
LIST_PAGE_BUDGET_BYTES = 1024 * 1024

#: Unanswered heartbeats a stream may have at a node, unless configured
#: (``stream_window``); what the SDK assumes until the node says.
DEFAULT_STREAM_WINDOW = 256
#: Initial-metadata key of a HeartbeatStream: the server's ``stream_window``.
STREAM_WINDOW_KEY = "raftstate-stream-window"

#: The quota fields, as named in config, log entries and error messages.
MAX_DEVICES = "max_devices"
MAX_STATE_BYTES = "max_state_bytes"


class Gate:
    """A counter of things open now, refused past ``limit``. ``field`` is
    the config field that sets the limit; ``what`` names what is counted
    (plural). Not thread-safe: use it from the event loop only."""

    __slots__ = ("field", "limit", "open", "refused", "what")

    def __init__(self, field: str, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError(f"{field}: must be at least 1")
        self.field = field
        self.limit = limit
        self.what = what
        self.open = 0
        self.refused = 0

    def try_enter(self) -> bool:
        """Count one more; ``False`` (and nothing counted) when at the limit."""
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        """One that :meth:`try_enter` admitted has ended."""
        self.open -= 1

    def refusal(self) -> ResourceExhausted:
        """The error for a refused entry, naming the limit and its field."""
        return ResourceExhausted(
            f"{self.field}: this node already serves {self.open} {self.what}, its limit "
            f"(config {self.field} = {self.limit}); retry later or on another node"
        )


@dataclass(frozen=True, slots=True)
class Quota:
    """Cluster-wide table limits; 0 means no limit."""

    max_devices: int = 0
    max_state_bytes: int = 0


def state_bytes(device_id: str, reported: Mapping[str, str]) -> int:
    """The quota measure of one device: UTF-8 bytes of its id and of every
    reported key and value (what the device chose to store; not the node's
    per-record overhead, which is bounded by ``max_devices``)."""
    total = len(device_id.encode())
    for key, value in reported.items():
        total += len(key.encode()) + len(value.encode())
    return total


def quota_refusal(
    quota: Quota, devices: int, total_bytes: int, is_new: bool, old_bytes: int, new_bytes: int
) -> str | None:
    """Which quota (its field name) a heartbeat would break, or ``None``.

    ``devices``/``total_bytes``: the table now; ``is_new``: the heartbeat
    creates a device; ``old_bytes``/``new_bytes``: the device's state bytes
    before and after. An update that does not grow the state is always
    allowed, even over quota (so a full table can still shrink)."""
    if is_new and quota.max_devices and devices >= quota.max_devices:
        return MAX_DEVICES
    grow = new_bytes - old_bytes
    if grow > 0 and quota.max_state_bytes and total_bytes + grow > quota.max_state_bytes:
        return MAX_STATE_BYTES
    return None


def quota_error(quota: Quota, which: str, device_id: str) -> QuotaExceeded:
    """The client-facing error for a heartbeat refused by quota ``which``."""
    if which == MAX_DEVICES:
        return QuotaExceeded(
            MAX_DEVICES,
            f"the cluster already holds its quota of {quota.max_devices} devices; new device "
            f"{device_id!r} was not stored (existing devices can still be updated)",
        )
    return QuotaExceeded(
        MAX_STATE_BYTES,
        f"storing this heartbeat of {device_id!r} would take the cluster's device state "
        f"past its quota of {quota.max_state_bytes} bytes (ids + reported keys and values); "
        "it was not stored (heartbeats that do not grow a device's state are still accepted)",
    )


def request_byte_limit(method: str) -> int:
    """The most bytes one request message of ``method`` may have."""
    if method == BATCH_METHOD:
        return MAX_BATCH_REQUEST_BYTES
    if method == WATCH_METHOD:
        return MAX_WATCH_REQUEST_BYTES
    return MAX_REQUEST_BYTES


def fit_page(sizes: Iterable[int], budget: int) -> int:
    """How many leading items of encoded ``sizes`` fit in ``budget`` bytes;
    always at least one when there is one (a single item is never bigger than
    a page can carry, by the heartbeat size limit)."""
    total = 0
    n = 0
    for size in sizes:
        total += size
        if n and total > budget:
            break
        n += 1
    return n
