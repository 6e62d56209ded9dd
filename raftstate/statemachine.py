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

Storage: each device is one immutable ``bytes`` record
(:mod:`raftstate.devicerecord`) in a dict, and the ids are kept in order in
blocks (:mod:`raftstate.sortedids`) for listings: O(log n) inserts, ~232
bytes of RSS per device with two small reported fields.

Snapshots: ``capture`` (tick thread) takes a consistent image in O(n/B);
changes after it copy a block or save a device's captured record first
(copy-on-write), so a writer thread can encode the capture
(:mod:`raftstate.snapshotfile`) while entries go on being applied.
``install`` swaps in a table a loader built.

Threading: ``apply``/``capture``/``install`` run on pysyncobj's tick thread.
Readers on other threads see whole records, because a record is never
mutated, only replaced in the dict (a single, atomic store under the GIL).
The sorted ids are guarded by a lock.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from raftstate import atrevision, batchentry, devicerecord
from raftstate.admission import Quota, quota_refusal, state_bytes
from raftstate.errors import DecodeError
from raftstate.eventwindow import (
    KIND_DELETED,
    KIND_HEARTBEAT,
    KIND_OFFLINE,
    KIND_ONLINE,
    KIND_REPORTED_CHANGED,
    Event,
    EventWindow,
)
from raftstate.internal.v1 import storage_pb2
from raftstate.model import DevicePage, DeviceView, Heartbeat, HeartbeatResult, OnlineFilter
from raftstate.presence import DeadlineWheel, reported_equal, state_of_record
from raftstate.sortedids import SortedIds


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What applying one ``ControlCommand`` did. ``changed``: a device was
    deleted / a token newly revoked; ``revision`` is the store revision after
    it (the delete's own revision when one was deleted); ``deleted`` is the
    record a delete removed (for the future watch event)."""

    kind: str  # "delete_device" | "revoke_token" | "expire_devices" | "" (empty command)
    changed: bool
    revision: int
    device_id: str = ""
    token_id: bytes = b""
    deleted: DeviceView | None = None
    #: ``expire_devices``: the ids that went offline (the others were not
    #: online at the given revision any more: a heartbeat or delete won).
    expired: tuple[str, ...] = ()


class DeviceTable:
    """The latest state of every device, plus the store-wide revision."""

    def __init__(
        self, default_ttl_s: int = 30, window: EventWindow | None = None
    ) -> None:
        self.default_ttl_s = default_ttl_s
        self.revision = 0
        self.max_proposed_at_ms = 0
        #: ``proposed_at_ms`` of the last applied entry (the expiry driver's
        #: clock anchor reads it, raftstate/presence.py).
        self.last_entry_ms = 0
        #: One event per revision (raftstate/eventwindow.py).
        self.window = window if window is not None else EventWindow()
        self.window.on_trim = self._on_trim
        #: Devices deleted within the window: id -> the delete's revision
        #: (reads at a revision, raftstate/atrevision.py). Replaced, never
        #: mutated in place by more than one dict operation at a time.
        self.tombstones: dict[str, int] = {}
        #: Local (not replicated) index of online devices by deadline.
        self.wheel = DeadlineWheel()
        #: Sum of every device's ``state_bytes`` (the ``max_state_bytes`` measure).
        self.state_bytes = 0
        #: device id -> its record (raftstate/devicerecord.py), never mutated.
        self._recs: dict[str, bytes] = {}
        self._ids = SortedIds()
        self._ids_lock = threading.Lock()
        #: While a snapshot capture is being written: device id -> its record
        #: when the capture was taken (``None``: it did not exist), saved the
        #: first time the device changes after the capture (copy-on-write).
        self._undo: dict[str, bytes | None] | None = None
        #: Revoked token ids -> the token's expiry (Unix seconds). Replaced
        #: (never mutated) so readers on other threads see a whole set.
        self.revoked: dict[bytes, int] = {}

    # ---- writes (tick thread) -------------------------------------------------

    def apply(self, entry: bytes) -> list[HeartbeatResult]:
        """Apply one heartbeat batch log entry (format 2, raftstate/batchentry.py,
        or a format-1 ``HeartbeatBatch``); return one result per heartbeat.

        An entry with no heartbeats (a new leader's barrier) changes nothing and
        returns ``[]``. Raises ``DecodeError`` (changing nothing) if the bytes
        are not a batch.
        """
        if batchentry.is_v2(entry):
            now_ms, quota, count = batchentry.decode_head(entry)
            items = list(batchentry.records(entry, count))
            self.last_entry_ms = now_ms
            if now_ms > self.max_proposed_at_ms:
                self.max_proposed_at_ms = now_ms
            store = self._store
            results = [
                store(device_id, seq, ttl_s, size, body, now_ms, quota)
                for device_id, seq, ttl_s, size, body in items
            ]
            self._entry_done(now_ms)
            return results
        batch = storage_pb2.HeartbeatBatch()
        try:
            batch.ParseFromString(entry)
        except Exception as exc:  # protobuf raises its own DecodeError type
            raise DecodeError(f"log entry is not a HeartbeatBatch: {exc}") from exc
        now_ms = batch.proposed_at_ms
        self.last_entry_ms = now_ms
        if now_ms > self.max_proposed_at_ms:
            self.max_proposed_at_ms = now_ms
        quota = Quota(batch.max_devices, batch.max_state_bytes)
        store = self._store
        results = [
            store(
                hb.device_id,
                hb.seq,
                hb.ttl_s,
                state_bytes(hb.device_id, hb.reported),
                hb.SerializeToString(),
                now_ms,
                quota,
            )
            for hb in batch.heartbeats
        ]
        self._entry_done(now_ms)
        return results

    def _entry_done(self, now_ms: int) -> None:
        """After each applied entry: trim the window, tell its listener."""
        window = self.window
        if window.latest != self.revision:  # cannot happen: one event per revision
            raise AssertionError(f"window at {window.latest}, table at {self.revision}")
        window.trim(now_ms)
        window.notify()

    def _on_trim(self, ev: Event) -> None:
        if ev.kinds & KIND_DELETED and self.tombstones.get(ev.device_id) == ev.revision:
            del self.tombstones[ev.device_id]

    def apply_control(self, entry: bytes) -> ControlResult:
        """Apply one ``ControlCommand`` log entry (module docstring). Raises
        ``DecodeError`` if the bytes are not one."""
        cmd = storage_pb2.ControlCommand()
        try:
            cmd.ParseFromString(entry)
        except Exception as exc:
            raise DecodeError(f"log entry is not a ControlCommand: {exc}") from exc
        now_ms = cmd.proposed_at_ms
        self.last_entry_ms = now_ms
        if now_ms > self.max_proposed_at_ms:
            self.max_proposed_at_ms = now_ms
        op = cmd.WhichOneof("op")
        now_s = now_ms // 1000
        if any(exp < now_s for exp in self.revoked.values()):
            self.revoked = {t: exp for t, exp in self.revoked.items() if exp >= now_s}
        if op == "delete_device":
            result = self._delete(cmd.delete_device.device_id, now_ms)
            self._entry_done(now_ms)
            return result
        if op == "expire_devices":
            expire = self._expire
            expired = [expire(d.device_id, d.revision, now_ms) for d in cmd.expire_devices.devices]
            self._entry_done(now_ms)
            ids = tuple(device_id for device_id in expired if device_id)
            return ControlResult("expire_devices", bool(ids), self.revision, expired=ids)
        if op == "revoke_token":
            token_id = cmd.revoke_token.token_id
            if token_id in self.revoked:
                return ControlResult("revoke_token", False, self.revision, token_id=token_id)
            revoked = dict(self.revoked)
            revoked[token_id] = cmd.revoke_token.expires_at_s
            self.revoked = revoked
            return ControlResult("revoke_token", True, self.revision, token_id=token_id)
        return ControlResult("", False, self.revision)

    def _delete(self, device_id: str, now_ms: int) -> ControlResult:
        old = self._recs.get(device_id)
        if old is None:
            return ControlResult("delete_device", False, self.revision, device_id)
        undo = self._undo
        if undo is not None and device_id not in undo:
            undo[device_id] = old
        head = devicerecord.head(old)
        rev = self.revision + 1
        self.window.append(Event(rev, device_id, KIND_DELETED, None, old, head[1], now_ms))
        self.tombstones[device_id] = rev  # before the record goes: see atrevision
        del self._recs[device_id]
        with self._ids_lock:
            self._ids.discard(device_id)
        self.revision = rev
        self.state_bytes -= head[6]
        deleted = devicerecord.view(old)
        return ControlResult("delete_device", True, rev, device_id, deleted=deleted)

    def _expire(self, device_id: str, revision: int, now_ms: int) -> str:
        """One device of an ``ExpireDevices`` entry: offline at a new revision
        if it exists, is online and is still at ``revision``; else nothing.
        Returns the id if it went offline, else ``""``."""
        old = self._recs.get(device_id)
        if old is None:
            return ""
        seq, o_rev, first, last, beats, ttl_s, size, _changed, flags = _HEAD_UNPACK(old)
        if o_rev != revision or flags & devicerecord.FLAG_OFFLINE:
            return ""
        rev = self.revision + 1
        new = (
            _HEAD_PACK(
                seq, rev, first, last, beats, ttl_s, size, now_ms, flags | devicerecord.FLAG_OFFLINE
            )
            + old[_HEAD_SIZE:]
        )
        self.window.append(Event(rev, device_id, KIND_OFFLINE, new, old, o_rev, now_ms))
        undo = self._undo
        if undo is not None and device_id not in undo:
            undo[device_id] = old
        self._recs[device_id] = new
        self.revision = rev
        self.wheel.discard_due(device_id)
        return device_id

    def quota_refusal(self, quota: Quota, device_id: str, new_bytes: int) -> str | None:
        """The quota (field name) that storing ``new_bytes`` of state for
        ``device_id`` would break in the table as it is now, or ``None``."""
        old = self._recs.get(device_id)
        old_bytes = devicerecord.head(old)[6] if old is not None else 0
        return quota_refusal(
            quota, len(self._recs), self.state_bytes, old is None, old_bytes, new_bytes
        )

    def _store(
        self,
        device_id: str,
        seq: int,
        ttl_s: int,
        size: int,
        body: bytes,
        now_ms: int,
        quota: Quota,
    ) -> HeartbeatResult:
        """Apply one heartbeat: ``body`` is its ``HeartbeatRecord`` bytes and
        ``size`` its quota measure (``admission.state_bytes``)."""
        old = self._recs.get(device_id)
        if old is not None:
            o_seq, o_rev, first, last, beats, o_ttl, o_size, changed, flags = _HEAD_UNPACK(old)
            if seq <= o_seq:
                return HeartbeatResult(o_rev, True, o_seq)
        if quota.max_devices or quota.max_state_bytes:
            refused = self.quota_refusal(quota, device_id, size)
            if refused is not None:
                if old is None:
                    return HeartbeatResult(0, False, 0, refused)
                return HeartbeatResult(o_rev, False, o_seq, refused)
        # Event first, then the record, then the revision: a reader that sees
        # the revision finds the record, and one that sees the record finds
        # its event (raftstate/atrevision.py).
        rev = self.revision + 1
        undo = self._undo
        if undo is not None and device_id not in undo:
            undo[device_id] = old
        if old is None:
            self.state_bytes += size
            ttl_s = ttl_s or self.default_ttl_s
            record = _HEAD_PACK(seq, rev, now_ms, now_ms, 1, ttl_s, size, now_ms, 0) + body
            self.window.append(
                Event(
                    rev,
                    device_id,
                    _KINDS_NEW,
                    record,
                    None,
                    self.tombstones.get(device_id, 0),
                    now_ms,
                )
            )
            self._recs[device_id] = record
            with self._ids_lock:
                self._ids.add(device_id)
            if self.tombstones:
                self.tombstones.pop(device_id, None)
            self.wheel.add(device_id, now_ms + ttl_s * 1000)
        else:
            ttl_s = ttl_s or o_ttl
            kinds = KIND_HEARTBEAT
            if not reported_equal(old, body, o_seq, seq):
                kinds = _KINDS_CHANGED
            if flags & _OFFLINE:
                kinds |= KIND_ONLINE
                flags &= ~_OFFLINE
                changed = now_ms
                self.wheel.add(device_id, (last if last > now_ms else now_ms) + ttl_s * 1000)
            self.state_bytes += size - o_size
            record = (
                _HEAD_PACK(
                    seq,
                    rev,
                    first,
                    last if last > now_ms else now_ms,
                    beats + 1,
                    ttl_s,
                    size,
                    changed,
                    flags,
                )
                + body
            )
            self.window.append(Event(rev, device_id, kinds, record, old, o_rev, now_ms))
            self._recs[device_id] = record
        self.revision = rev
        return HeartbeatResult(rev, False, seq)

    # ---- reads (any thread) ---------------------------------------------------

    def __len__(self) -> int:
        return len(self._recs)

    def get(self, device_id: str) -> DeviceView | None:
        """Return the device's current record, or ``None``. Thread-safe."""
        record = self._recs.get(device_id)
        return devicerecord.view(record) if record is not None else None

    def get_at(self, device_id: str, revision: int) -> DeviceView | None:
        """The device as it was at store ``revision`` (0: now), or ``None``
        if it did not exist then. Raises ``RevisionCompacted`` /
        ``FutureRevision`` (raftstate/atrevision.py). Thread-safe."""
        if revision == 0:
            return self.get(device_id)
        atrevision.check(self.window, self.revision, revision)
        record = atrevision.record_at(
            self._recs.get(device_id), self.tombstones.get(device_id, 0), self.window, revision
        )
        return devicerecord.view(record) if record is not None else None

    def deadline_of(self, device_id: str) -> int | None:
        """``last_seen_ms + ttl_s`` of an online device; ``None`` if it is
        gone or offline (the deadline wheel's lookup). Tick thread."""
        record = self._recs.get(device_id)
        if record is None:
            return None
        head = _HEAD_UNPACK(record)
        if head[8] & _OFFLINE:
            return None
        return int(head[3] + head[5] * 1000)

    def presence_state(self, device_id: str) -> tuple[int, int, int] | None:
        """``(revision, last_seen_ms, deadline_ms)`` of an online device,
        ``None`` if gone or offline (the expiry planner's lookup)."""
        return state_of_record(self._recs.get(device_id))

    def list(
        self,
        *,
        prefix: str = "",
        after: str | None = None,
        limit: int = 100,
        online: OnlineFilter = OnlineFilter.ALL,
        max_scan: int = 10_000,
        at_revision: int = 0,
    ) -> DevicePage:
        """Return up to ``limit`` devices in id order whose id starts with
        ``prefix`` and is greater than ``after``; with ``at_revision``, as
        they were at that store revision (raftstate/atrevision.py: raises
        ``RevisionCompacted`` / ``FutureRevision``).

        ``online`` filters by the committed presence. At most ``max_scan``
        ids are examined per call; if the scan stops early the page may be
        short but ``next_after`` lets the caller continue. Thread-safe.
        """
        if at_revision:
            atrevision.check(self.window, self.revision, at_revision)
        with self._ids_lock:
            if after is None or after < prefix:
                window = self._ids.window(prefix, inclusive=True, limit=max_scan)
            else:
                window = self._ids.window(after, inclusive=False, limit=max_scan)
        recs = self._recs
        if at_revision:
            return atrevision.page(
                window,
                recs,
                self.tombstones,
                self.window,
                prefix=prefix,
                after=after,
                limit=limit,
                online=online,
                max_scan=max_scan,
                revision=at_revision,
            )
        out: list[DeviceView] = []
        last: str | None = None
        for device_id in window:
            if not device_id.startswith(prefix):
                return DevicePage(out, None)
            last = device_id
            record = recs.get(device_id)
            if record is None:
                continue
            view = devicerecord.view(record)
            if online is OnlineFilter.ONLINE and not view.online:
                continue
            if online is OnlineFilter.OFFLINE and view.online:
                continue
            out.append(view)
            if len(out) == limit:
                break
        more = last is not None and (len(out) == limit or len(window) == max_scan)
        return DevicePage(out, last if more else None)

    def digest(self) -> str:
        """A SHA-256 over the revision and every record in id order; equal on
        two nodes that applied the same entries. Tick thread (or a quiet table)."""
        h = hashlib.sha256()
        h.update(str(self.revision).encode())
        with self._ids_lock:
            ids = list(self._ids)
        for device_id in ids:
            d = devicerecord.view(self._recs[device_id])
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
                        d.online,
                        d.presence_changed_ms,
                    )
                ).encode()
            )
        for token_id, expires in sorted(self.revoked.items()):
            h.update(b"revoked" + token_id + str(expires).encode())
        return h.hexdigest()

    # ---- snapshots --------------------------------------------------------------

    def capture(self) -> TableCapture:
        """Tick thread: a consistent image of the table as it is now, cheap to
        take (O(n/B) block references, raftstate/sortedids.py) and readable
        from another thread while entries go on being applied: changes after
        the capture save the captured record first (copy-on-write). Call
        :meth:`release` when the capture is no longer read."""
        undo: dict[str, bytes | None] = {}
        with self._ids_lock:
            blocks = self._ids.freeze()
        self._undo = undo
        return TableCapture(
            revision=self.revision,
            max_proposed_at_ms=self.max_proposed_at_ms,
            revoked=self.revoked,
            devices=len(self._recs),
            blocks=blocks,
            recs=self._recs,
            undo=undo,
        )

    def release(self, capture: TableCapture) -> None:
        """Tick thread: ``capture`` is no longer read; stop copy-on-write."""
        if self._undo is capture.undo:
            self._undo = None
            with self._ids_lock:
                self._ids.thaw()

    def install(self, loaded: LoadedTable) -> None:
        """Tick thread: replace the whole table with a loaded snapshot's. The
        dicts are replaced, not cleared, so a capture still being written
        keeps reading the old ones."""
        self._recs = loaded.recs
        with self._ids_lock:
            self._ids = loaded.ids
        self._undo = None
        self.window.reset(loaded.revision)
        self.tombstones = {}
        self.revision = loaded.revision
        self.max_proposed_at_ms = loaded.max_proposed_at_ms
        self.state_bytes = loaded.state_bytes
        self.revoked = dict(loaded.revoked)
        self.wheel.rebuild(list(loaded.recs))


_HEAD_UNPACK = devicerecord.HEAD.unpack_from
_HEAD_PACK = devicerecord.HEAD.pack
_HEAD_SIZE = devicerecord.HEAD_SIZE
_OFFLINE = devicerecord.FLAG_OFFLINE
_KINDS_NEW = KIND_REPORTED_CHANGED | KIND_HEARTBEAT | KIND_ONLINE
_KINDS_CHANGED = KIND_REPORTED_CHANGED | KIND_HEARTBEAT
_MISSING = b""


@dataclass(frozen=True, slots=True)
class TableCapture:
    """A consistent image of a :class:`DeviceTable` (``DeviceTable.capture``).
    Readable from any thread."""

    revision: int
    max_proposed_at_ms: int
    revoked: dict[bytes, int]
    devices: int
    blocks: list[list[str]]
    recs: dict[str, bytes]
    undo: dict[str, bytes | None]

    def records(self) -> Iterator[bytes]:
        """Every captured record, in device id order."""
        recs, undo = self.recs, self.undo
        for block in self.blocks:
            for device_id in block:
                record = recs.get(device_id)
                saved = undo.get(device_id, _MISSING)
                if saved is not _MISSING:
                    record = saved
                if record is None:  # cannot happen: captured ids existed
                    raise AssertionError(f"captured device {device_id} has no record")
                yield record


@dataclass(slots=True)
class LoadedTable:
    """A table read from a snapshot, ready for ``DeviceTable.install``."""

    recs: dict[str, bytes]
    ids: SortedIds
    revision: int = 0
    max_proposed_at_ms: int = 0
    state_bytes: int = 0
    revoked: dict[bytes, int] = field(default_factory=dict)


def encode_delete(device_id: str, proposed_at_ms: int) -> bytes:
    """A ``ControlCommand`` deleting ``device_id`` (already validated)."""
    cmd = storage_pb2.ControlCommand(proposed_at_ms=proposed_at_ms)
    cmd.delete_device.device_id = device_id
    out: bytes = cmd.SerializeToString()
    return out


def encode_expire(devices: Iterable[tuple[str, int]], proposed_at_ms: int) -> bytes:
    """A ``ControlCommand`` expiring ``(device_id, revision seen)`` pairs."""
    cmd = storage_pb2.ControlCommand(proposed_at_ms=proposed_at_ms)
    add = cmd.expire_devices.devices.add
    for device_id, revision in devices:
        add(device_id=device_id, revision=revision)
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
    """Encode validated heartbeats as one heartbeat batch log entry (format 2,
    raftstate/batchentry.py), carrying ``quota`` (none when omitted). An
    empty iterable gives a barrier entry that changes nothing."""
    return batchentry.encode(heartbeats, proposed_at_ms, quota)


def encode_batch_v1(
    heartbeats: Iterable[Heartbeat], proposed_at_ms: int, quota: Quota | None = None
) -> bytes:
    """The same entry in format 1 (one protobuf ``HeartbeatBatch``), as
    journals written before format 2 hold it; ``apply`` reads both."""
    batch = storage_pb2.HeartbeatBatch(proposed_at_ms=proposed_at_ms)
    if quota is not None:
        batch.max_devices = quota.max_devices
        batch.max_state_bytes = quota.max_state_bytes
    add = batch.heartbeats.add
    for hb in heartbeats:
        add(device_id=hb.device_id, seq=hb.seq, reported=hb.reported, ttl_s=hb.ttl_s)
    out: bytes = batch.SerializeToString()
    return out
