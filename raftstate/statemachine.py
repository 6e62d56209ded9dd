"""DeviceTable: the replicated state machine.

Theory of operation
-------------------
Every node applies the same committed log entries in the same order, so every
node must compute the same table from them. ``apply`` is therefore pure in the
entry: it never reads a clock (time comes from ``proposed_at_ms`` inside the
entry), never draws random numbers and never consults anything outside the
table.

Per heartbeat ``(device_id, seq)``:

1. If the device is known and ``seq <= stored seq``, nothing changes and the
   result is a *duplicate* carrying the current revision. A retried heartbeat
   is therefore applied at most once, whatever the network did to it.
2. Otherwise the store-wide ``revision`` increases by one and the device's
   record is replaced by a new immutable :class:`DeviceView` stamped with it.
   ``last_seen_ms`` never goes backwards even if proposing nodes' clocks
   disagree: it is ``max(previous, proposed_at_ms)``.
3. Before step 2, the quotas carried in the entry (``max_devices``,
   ``max_state_bytes``, stamped by the proposing node; 0 = none) are
   checked against the table as it is at that point of the log
   (``raftstate.admission.quota_refusal``). A heartbeat that would create a
   device past ``max_devices`` or grow the state past ``max_state_bytes``
   changes nothing and its result names the quota (``rejected``). Because
   the limits travel in the entry and the table is the same on every node at
   that index, every node refuses exactly the same heartbeats.

Control entries (``apply_control``, :mod:`raftstate.logcommand`):

* ``DeleteDevice``: a known device's record is removed and the revision
  increases by one; an unknown device changes nothing (``changed=False``),
  so a retried delete is harmless. A later heartbeat recreates the device.
* ``RevokeToken``: the token id joins ``revoked`` until the token's own
  expiry; ids whose expiry is before the entry's ``proposed_at_ms`` are
  dropped at every control entry (the same on every node, no clock). The
  revision does not change (no device changed). The set is in the snapshot.

Threading: ``apply``/``restore`` run on pysyncobj's tick thread. Readers on
other threads see whole records, because a record is never mutated, only
replaced in the dict (a single, atomic store under the GIL). The sorted index
used for listings is guarded by a lock.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from raftstate.admission import Quota, quota_refusal, state_bytes
from raftstate.errors import DecodeError
from raftstate.model import DevicePage, DeviceView, Heartbeat, HeartbeatResult, OnlineFilter
from raftstate.v1 import storage_pb2

SNAPSHOT_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What applying one ``ControlCommand`` did. ``changed``: a device was
    deleted / a token newly revoked; ``revision`` is the store revision after
    it (the delete's own revision when one was deleted); ``deleted`` is the
    record a delete removed (for the future watch event)."""

    kind: str  # "delete_device" | "revoke_token" | "" (empty command)
    changed: bool
    revision: int
    device_id: str = ""
    token_id: bytes = b""
    deleted: DeviceView | None = None


class DeviceTable:
    """The latest state of every device, plus the store-wide revision."""

    def __init__(self, default_ttl_s: int = 30) -> None:
        self.default_ttl_s = default_ttl_s
        self.revision = 0
        self.max_proposed_at_ms = 0
        #: Sum of every device's ``state_bytes`` (the ``max_state_bytes`` measure).
        self.state_bytes = 0
        self._devices: dict[str, DeviceView] = {}
        self._ids: list[str] = []
        self._ids_lock = threading.Lock()
        #: Revoked token ids -> the token's expiry (Unix seconds). Replaced
        #: (never mutated) so readers on other threads see a whole set.
        self.revoked: dict[bytes, int] = {}

    # ---- writes (tick thread) -------------------------------------------------

    def apply(self, entry: bytes) -> list[HeartbeatResult]:
        """Apply one ``HeartbeatBatch`` log entry; return one result per heartbeat.

        An entry with no heartbeats (a new leader's barrier) changes nothing and
        returns ``[]``. Raises ``DecodeError`` if the bytes are not a batch.
        """
        batch = storage_pb2.HeartbeatBatch()
        try:
            batch.ParseFromString(entry)
        except Exception as exc:  # protobuf raises its own DecodeError type
            raise DecodeError(f"log entry is not a HeartbeatBatch: {exc}") from exc
        now_ms = batch.proposed_at_ms
        if now_ms > self.max_proposed_at_ms:
            self.max_proposed_at_ms = now_ms
        quota = Quota(batch.max_devices, batch.max_state_bytes)
        return [self._apply_one(hb, now_ms, quota) for hb in batch.heartbeats]

    def apply_control(self, entry: bytes) -> ControlResult:
        """Apply one ``ControlCommand`` log entry (module docstring). Raises
        ``DecodeError`` if the bytes are not one."""
        cmd = storage_pb2.ControlCommand()
        try:
            cmd.ParseFromString(entry)
        except Exception as exc:
            raise DecodeError(f"log entry is not a ControlCommand: {exc}") from exc
        if cmd.proposed_at_ms > self.max_proposed_at_ms:
            self.max_proposed_at_ms = cmd.proposed_at_ms
        op = cmd.WhichOneof("op")
        now_s = cmd.proposed_at_ms // 1000
        if any(exp < now_s for exp in self.revoked.values()):
            self.revoked = {t: exp for t, exp in self.revoked.items() if exp >= now_s}
        if op == "delete_device":
            return self._delete(cmd.delete_device.device_id)
        if op == "revoke_token":
            token_id = cmd.revoke_token.token_id
            if token_id in self.revoked:
                return ControlResult("revoke_token", False, self.revision, token_id=token_id)
            revoked = dict(self.revoked)
            revoked[token_id] = cmd.revoke_token.expires_at_s
            self.revoked = revoked
            return ControlResult("revoke_token", True, self.revision, token_id=token_id)
        return ControlResult("", False, self.revision)

    def _delete(self, device_id: str) -> ControlResult:
        old = self._devices.pop(device_id, None)
        if old is None:
            return ControlResult("delete_device", False, self.revision, device_id)
        with self._ids_lock:
            pos = bisect.bisect_left(self._ids, device_id)
            del self._ids[pos]
        self.revision += 1
        self.state_bytes -= old.state_bytes
        return ControlResult("delete_device", True, self.revision, device_id, deleted=old)

    def quota_refusal(self, quota: Quota, device_id: str, new_bytes: int) -> str | None:
        """The quota (field name) that storing ``new_bytes`` of state for
        ``device_id`` would break in the table as it is now, or ``None``."""
        old = self._devices.get(device_id)
        old_bytes = old.state_bytes if old is not None else 0
        return quota_refusal(
            quota, len(self._devices), self.state_bytes, old is None, old_bytes, new_bytes
        )

    def _apply_one(
        self, hb: storage_pb2.HeartbeatRecord, now_ms: int, quota: Quota
    ) -> HeartbeatResult:
        old = self._devices.get(hb.device_id)
        if old is not None and hb.seq <= old.seq:
            return HeartbeatResult(old.revision, True, old.seq)
        size = state_bytes(hb.device_id, hb.reported)
        if quota.max_devices or quota.max_state_bytes:
            refused = self.quota_refusal(quota, hb.device_id, size)
            if refused is not None:
                if old is None:
                    return HeartbeatResult(0, False, 0, refused)
                return HeartbeatResult(old.revision, False, old.seq, refused)
        self.revision += 1
        self.state_bytes += size - (old.state_bytes if old is not None else 0)
        ttl_s = hb.ttl_s or (old.ttl_s if old is not None else self.default_ttl_s)
        if old is None:
            new = DeviceView(
                hb.device_id,
                hb.seq,
                dict(hb.reported),
                self.revision,
                now_ms,
                now_ms,
                1,
                ttl_s,
                size,
            )
            with self._ids_lock:
                bisect.insort(self._ids, hb.device_id)
        else:
            new = DeviceView(
                hb.device_id,
                hb.seq,
                dict(hb.reported),
                self.revision,
                old.first_seen_ms,
                max(old.last_seen_ms, now_ms),
                old.heartbeats + 1,
                ttl_s,
                size,
            )
        self._devices[hb.device_id] = new
        return HeartbeatResult(self.revision, False, hb.seq)

    # ---- reads (any thread) ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, device_id: str) -> DeviceView | None:
        """Return the device's current record, or ``None``. Thread-safe."""
        return self._devices.get(device_id)

    def list(
        self,
        *,
        prefix: str = "",
        after: str | None = None,
        limit: int = 100,
        online: OnlineFilter = OnlineFilter.ALL,
        now_ms: int = 0,
        max_scan: int = 10_000,
    ) -> DevicePage:
        """Return up to ``limit`` devices in id order whose id starts with
        ``prefix`` and is greater than ``after``.

        ``online`` filters by ``DeviceView.online(now_ms)``. At most
        ``max_scan`` ids are examined per call; if the scan stops early the
        page may be short but ``next_after`` lets the caller continue.
        Thread-safe.
        """
        with self._ids_lock:
            if after is None or after < prefix:
                pos = bisect.bisect_left(self._ids, prefix)
            else:
                pos = bisect.bisect_right(self._ids, after)
            window = self._ids[pos : pos + max_scan]
        out: list[DeviceView] = []
        last: str | None = None
        for device_id in window:
            if not device_id.startswith(prefix):
                return DevicePage(out, None)
            last = device_id
            view = self._devices.get(device_id)
            if view is None:
                continue
            if online is OnlineFilter.ONLINE and not view.online(now_ms):
                continue
            if online is OnlineFilter.OFFLINE and view.online(now_ms):
                continue
            out.append(view)
            if len(out) == limit:
                break
        more = last is not None and (len(out) == limit or len(window) == max_scan)
        return DevicePage(out, last if more else None)

    def digest(self) -> str:
        """A SHA-256 over the revision and every record in id order; equal on
        two nodes that applied the same entries."""
        h = hashlib.sha256()
        h.update(str(self.revision).encode())
        with self._ids_lock:
            ids = list(self._ids)
        for device_id in ids:
            d = self._devices[device_id]
            h.update(
                repr(
                    (
                        d.device_id,
                        d.seq,
                        sorted(d.reported.items()),
                        d.revision,
                        d.first_seen_ms,
                        d.last_seen_ms,
                        d.heartbeats,
                        d.ttl_s,
                    )
                ).encode()
            )
        for token_id, expires in sorted(self.revoked.items()):
            h.update(b"revoked" + token_id + str(expires).encode())
        return h.hexdigest()

    # ---- snapshots (tick thread) ----------------------------------------------

    def to_snapshot(self) -> storage_pb2.Snapshot:
        """Return the table as a ``Snapshot`` message (Raft fields left empty)."""
        snap = storage_pb2.Snapshot(
            format=SNAPSHOT_FORMAT,
            revision=self.revision,
            max_proposed_at_ms=self.max_proposed_at_ms,
        )
        with self._ids_lock:
            ids = list(self._ids)
        add = snap.devices.add
        for device_id in ids:
            d = self._devices[device_id]
            add(
                device_id=d.device_id,
                seq=d.seq,
                reported=d.reported,
                revision=d.revision,
                first_seen_ms=d.first_seen_ms,
                last_seen_ms=d.last_seen_ms,
                heartbeats=d.heartbeats,
                ttl_s=d.ttl_s,
            )
        for token_id, expires in sorted(self.revoked.items()):
            snap.revocations.add(token_id=token_id, expires_at_s=expires)
        return snap

    def restore(self, snap: storage_pb2.Snapshot) -> None:
        """Replace the whole table with the snapshot's contents.

        Raises ``DecodeError`` for an unknown snapshot format.
        """
        if snap.format != SNAPSHOT_FORMAT:
            raise DecodeError(f"snapshot format {snap.format} is not {SNAPSHOT_FORMAT}")
        devices = {r.device_id: _view(r) for r in snap.devices}
        ids = sorted(devices)
        self._devices = devices
        with self._ids_lock:
            self._ids = ids
        self.revision = snap.revision
        self.max_proposed_at_ms = snap.max_proposed_at_ms
        self.state_bytes = sum(v.state_bytes for v in devices.values())
        self.revoked = {r.token_id: r.expires_at_s for r in snap.revocations}


def _view(r: storage_pb2.DeviceRecord) -> DeviceView:
    return DeviceView(
        r.device_id,
        r.seq,
        dict(r.reported),
        r.revision,
        r.first_seen_ms,
        r.last_seen_ms,
        r.heartbeats,
        r.ttl_s,
        state_bytes(r.device_id, r.reported),
    )


def encode_delete(device_id: str, proposed_at_ms: int) -> bytes:
    """A ``ControlCommand`` deleting ``device_id`` (already validated)."""
    cmd = storage_pb2.ControlCommand(proposed_at_ms=proposed_at_ms)
    cmd.delete_device.device_id = device_id
    out: bytes = cmd.SerializeToString()
    return out


def encode_revoke(token_id: bytes, expires_at_s: int, proposed_at_ms: int) -> bytes:
    """A ``ControlCommand`` revoking ``token_id`` until ``expires_at_s``."""
    cmd = storage_pb2.ControlCommand(proposed_at_ms=proposed_at_ms)
    cmd.revoke_token.token_id = token_id
    cmd.revoke_token.expires_at_s = expires_at_s
    out: bytes = cmd.SerializeToString()
    return out


def encode_batch(
    heartbeats: Iterable[Heartbeat], proposed_at_ms: int, quota: Quota | None = None
) -> bytes:
    """Encode validated heartbeats as one ``HeartbeatBatch`` log entry,
    carrying ``quota`` (none when omitted). An empty iterable gives a barrier
    entry that changes nothing."""
    batch = storage_pb2.HeartbeatBatch(proposed_at_ms=proposed_at_ms)
    if quota is not None:
        batch.max_devices = quota.max_devices
        batch.max_state_bytes = quota.max_state_bytes
    add = batch.heartbeats.add
    for hb in heartbeats:
        add(device_id=hb.device_id, seq=hb.seq, reported=hb.reported, ttl_s=hb.ttl_s)
    out: bytes = batch.SerializeToString()
    return out
