"""Committed presence: deciding, on the leader, which devices' TTLs lapsed.

Theory of operation
-------------------
A device is online from a heartbeat until an ``ExpireDevices`` log entry
makes it offline (raftstate/statemachine.py applies it); its next heartbeat
makes it online again. The deadline is ``last_seen_ms + ttl_s * 1000`` in
*log time* (the ``proposed_at_ms`` stamps of the entries), so it is the same
on every node and a leader change does not reset it. This module is the
sans-IO part of the leader's decision; raftstate/raftnode.py drives it on
the tick thread.

* :class:`DeadlineWheel` (every node, local, not replicated): buckets of
  ``bucket_ms`` of log time -> device ids, one entry per online device, added
  when a device becomes online (a heartbeat of an online device does not
  touch it). :meth:`DeadlineWheel.advance` empties the buckets whose time
  has passed, re-checking each id against the table: gone or offline ->
  dropped, deadline later (it heartbeated meanwhile) -> re-bucketed, else ->
  the ``due`` set. Work per call is bounded (``budget``), so a million
  devices never stall a tick. After a snapshot install it is rebuilt by one
  scan, also in budgeted steps. Every node keeps it, so a new leader has it.
* :class:`ClockAnchor`: a follower estimates the log clock from the entries
  it applies (``offset = max(proposed_at_ms - mono_now)``, a lower bound
  since a stamp precedes its apply), reset when the leader changes. The new
  leader freezes that offset: ``anchor_now = mono_now + offset`` is the
  previous leader's clock carried forward by this node's monotonic clock.
  Its stamps are ``max(wall, anchor_now, committed max)`` (log time never
  goes back), and a device last seen before this term is expired only when
  ``min(stamp_now, anchor_now + max_clock_skew_ms) >= deadline``; a device
  seen in this term when ``stamp_now >= deadline``. So whatever the new
  leader's wall clock says, an expiry is at most ``max_clock_skew_ms`` early
  against the previous leader's clock, and not late because of skew.
* :class:`ExpiryPlanner` (leader): takes ids from ``due``, re-verifies each
  (exists, online, deadline passed by the anchor's rule) and forms entries
  of at most ``max_per_entry`` ``(device_id, revision seen)`` pairs, with at
  most ``max_inflight`` entries proposed and not yet answered. A mass outage
  of 100,000 devices is then ~100 bounded entries, between which heartbeats
  keep committing. A failed proposal puts its ids back in ``due``.

Pure logic: the caller passes every clock reading in.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from raftstate import devicerecord
from raftstate.internal.v1 import storage_pb2

DEFAULT_BUCKET_MS = 250
#: Ids the wheel examines per tick (rebuild scan, buckets, due re-checks).
DEFAULT_TICK_BUDGET = 10_000
MAX_PER_ENTRY = 1000
MAX_INFLIGHT = 2

#: ``deadline_of(device_id)``: the deadline of an online device, ``None`` if
#: it is gone or offline.
DeadlineLookup = Callable[[str], int | None]


class DeadlineWheel:
    """Online devices by deadline, and the ``due`` set (module docstring).
    Tick thread only."""

    def __init__(self, bucket_ms: int = DEFAULT_BUCKET_MS) -> None:
        self.bucket_ms = bucket_ms
        self._buckets: dict[int, list[str]] = {}
        self._keys: list[int] = []  # heap of the bucket keys in use
        #: Ids whose deadline passed, in the order found (a dict as an ordered set).
        self.due: dict[str, None] = {}
        self._scan: list[str] = []
        self._scan_at = 0

    def __len__(self) -> int:
        """Ids in buckets (an id may be in more than one; see :meth:`add`)."""
        return sum(len(b) for b in self._buckets.values())

    def add(self, device_id: str, deadline_ms: int) -> None:
        """File ``device_id`` under ``deadline_ms`` (log time). Cheap: apply
        calls it when a device becomes online. A second entry for an id is
        harmless (both are re-checked; ``due`` is a set)."""
        key = -(-deadline_ms // self.bucket_ms)  # bucket k holds ((k-1)B, kB]
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [device_id]
            heapq.heappush(self._keys, key)
        else:
            bucket.append(device_id)

    def discard_due(self, device_id: str) -> None:
        """The device went offline (an expiry applied): no longer due."""
        if self.due:
            self.due.pop(device_id, None)

    def rebuild(self, device_ids: list[str]) -> None:
        """Forget everything and re-scan ``device_ids`` in budgeted steps
        (after a snapshot install)."""
        self._buckets = {}
        self._keys = []
        self.due = {}
        self._scan = device_ids
        self._scan_at = 0

    @property
    def rebuilding(self) -> bool:
        return self._scan_at < len(self._scan)

    def next_deadline_ms(self) -> int | None:
        """The end of the earliest bucket in use (when :meth:`advance` next
        has work), or ``None``."""
        return self._keys[0] * self.bucket_ms if self._keys else None

    def advance(self, now_ms: int, deadline_of: DeadlineLookup, budget: int) -> int:
        """Continue the rebuild scan, then empty buckets whose time is at or
        before ``now_ms`` (log time), examining at most ``budget`` ids.
        Returns the ids examined."""
        work = 0
        scan = self._scan
        if self._scan_at < len(scan):
            stop = min(len(scan), self._scan_at + budget)
            for device_id in scan[self._scan_at : stop]:
                deadline = deadline_of(device_id)
                if deadline is not None:
                    self.add(device_id, deadline)
            work = stop - self._scan_at
            self._scan_at = stop
            if stop == len(scan):
                self._scan, self._scan_at = [], 0
        keys, buckets, bucket_ms, due = self._keys, self._buckets, self.bucket_ms, self.due
        while keys and keys[0] * bucket_ms <= now_ms and work < budget:
            key = keys[0]
            bucket = buckets[key]
            while bucket and work < budget:
                device_id = bucket.pop()
                work += 1
                deadline = deadline_of(device_id)
                if deadline is None:
                    continue
                if deadline > now_ms:  # heartbeated meanwhile: a later bucket
                    self.add(device_id, deadline)
                else:
                    due[device_id] = None
            if not bucket:
                heapq.heappop(keys)
                del buckets[key]
        return work

    def recheck_due(self, now_ms: int, deadline_of: DeadlineLookup, budget: int) -> int:
        """A follower's upkeep of ``due``: drop ids gone or offline, move back
        to the wheel those whose deadline moved past ``now_ms``. Examines at
        most ``budget`` ids (oldest first, rotating). Returns the ids examined."""
        due = self.due
        ids = list(itertools.islice(due, budget))
        for device_id in ids:
            del due[device_id]
            deadline = deadline_of(device_id)
            if deadline is None:
                continue
            if deadline > now_ms:
                self.add(device_id, deadline)
            else:
                due[device_id] = None  # to the end: still due
        return len(ids)


class ClockAnchor:
    """The leader's decision clock (module docstring). Times are integer
    milliseconds: ``mono_ms`` a monotonic clock, ``wall_ms`` Unix time, both
    of this node. Tick thread only."""

    def __init__(self, max_clock_skew_ms: int) -> None:
        self.max_clock_skew_ms = max_clock_skew_ms
        #: Estimate of (log clock - mono) from applied entries; None: no entry
        #: applied since the leader last changed.
        self.offset: int | None = None
        #: While leader: the frozen offset, and the first stamp of the term.
        self.frozen: int | None = None
        self.term_start_ms = 0
        self.leader = False

    def observe(self, proposed_at_ms: int, mono_ms: int) -> None:
        """An entry stamped ``proposed_at_ms`` was applied at ``mono_ms``."""
        if self.leader:
            return
        est = proposed_at_ms - mono_ms
        if self.offset is None or est > self.offset:
            self.offset = est

    def leader_changed(self) -> None:
        """A follower saw a new leader: the old estimate is of another clock."""
        self.offset = None

    def become_leader(self, mono_ms: int, wall_ms: int, committed_ms: int) -> None:
        """Freeze the estimate (this node's own clock if it has none) and
        note the term's first stamp."""
        self.frozen = self.offset if self.offset is not None else wall_ms - mono_ms
        self.leader = True
        self.term_start_ms = self.stamp(mono_ms, wall_ms, committed_ms)

    def step_down(self) -> None:
        self.leader = False
        self.frozen = None
        self.offset = None

    def anchor_now(self, mono_ms: int, wall_ms: int) -> int:
        """The log clock now: the frozen (leader) or current (follower)
        estimate carried forward; this node's wall clock without one."""
        offset = self.frozen if self.leader else self.offset
        return wall_ms if offset is None else mono_ms + offset

    def stamp(self, mono_ms: int, wall_ms: int, committed_ms: int) -> int:
        """The ``proposed_at_ms`` for an entry this node proposes now: never
        below the anchor or the committed log time."""
        return max(wall_ms, self.anchor_now(mono_ms, wall_ms), committed_ms)

    def skew_ms(self, mono_ms: int, wall_ms: int) -> int:
        """How far this node's wall clock is ahead (+) of the log clock estimate."""
        return wall_ms - self.anchor_now(mono_ms, wall_ms)

    def may_expire(
        self, last_seen_ms: int, deadline_ms: int, mono_ms: int, wall_ms: int, committed_ms: int
    ) -> bool:
        """Whether the leader may expire a device with these values now."""
        stamp = self.stamp(mono_ms, wall_ms, committed_ms)
        if last_seen_ms >= self.term_start_ms:
            return stamp >= deadline_ms
        bound = self.anchor_now(mono_ms, wall_ms) + self.max_clock_skew_ms
        return min(stamp, bound) >= deadline_ms


#: ``state_of(device_id)``: ``(revision, last_seen_ms, deadline_ms)`` of an
#: online device, ``None`` if it is gone or offline.
StateLookup = Callable[[str], tuple[int, int, int] | None]


def state_of_record(record: bytes | None) -> tuple[int, int, int] | None:
    """:data:`StateLookup` for a stored record (raftstate/devicerecord.py)."""
    if record is None:
        return None
    head = devicerecord.head(record)
    if head[8] & devicerecord.FLAG_OFFLINE:
        return None
    return head[1], head[3], head[3] + head[5] * 1000


class ExpiryPlanner:
    """Forms ``ExpireDevices`` entries from the wheel's ``due`` set, with at
    most ``max_inflight`` unanswered (module docstring). Tick thread only."""

    def __init__(self, max_per_entry: int = MAX_PER_ENTRY, max_inflight: int = MAX_INFLIGHT):
        self.max_per_entry = max_per_entry
        self.max_inflight = max_inflight
        #: token -> (ids, log time proposed at).
        self.inflight: dict[int, tuple[list[str], int]] = {}
        self._tokens = itertools.count(1)
        #: Totals: entries proposed, devices in them, entries that failed.
        self.entries = 0
        self.devices = 0
        self.failures = 0

    def plan(
        self,
        wheel: DeadlineWheel,
        state_of: StateLookup,
        may_expire: Callable[[int, int], bool],
        now_ms: int,
        budget: int,
    ) -> list[tuple[int, list[tuple[str, int]]]]:
        """New entries to propose: ``(token, [(device_id, revision)])``, at
        most ``max_inflight`` in flight overall, examining at most ``budget``
        ids of ``due``. ``may_expire(last_seen_ms, deadline_ms)`` is the
        anchor's rule; an id not yet expirable goes back to the wheel
        (``now_ms``: log time, to re-check it a bucket later)."""
        out: list[tuple[int, list[tuple[str, int]]]] = []
        due = wheel.due
        while due and budget > 0 and len(self.inflight) < self.max_inflight:
            batch: list[tuple[str, int]] = []
            ids = list(itertools.islice(due, min(budget, self.max_per_entry * 4)))
            for device_id in ids:
                if len(batch) == self.max_per_entry:
                    break
                budget -= 1
                del due[device_id]
                st = state_of(device_id)
                if st is None:
                    continue
                revision, last_seen, deadline = st
                if may_expire(last_seen, deadline):
                    batch.append((device_id, revision))
                else:
                    wheel.add(device_id, max(deadline, now_ms + wheel.bucket_ms))
            if batch:
                token = next(self._tokens)
                self.inflight[token] = ([device_id for device_id, _ in batch], now_ms)
                self.entries += 1
                self.devices += len(batch)
                out.append((token, batch))
            elif not ids:
                break
        return out

    def done(self, token: int, wheel: DeadlineWheel, expired: tuple[str, ...] | None) -> None:
        """The entry ``token`` was answered: ``expired`` are the ids that went
        offline; ``None``: the proposal failed. Every other id goes back to
        ``due`` to be re-checked (a heartbeat won: back to the wheel then)."""
        entry = self.inflight.pop(token, None)
        if entry is None:
            return
        if expired is None:
            self.failures += 1
        gone = set(expired or ())
        for device_id in entry[0]:
            if device_id not in gone:
                wheel.due[device_id] = None

    def give_up(self, wheel: DeadlineWheel, now_ms: int, timeout_ms: int) -> int:
        """Treat entries proposed more than ``timeout_ms`` before ``now_ms``
        (or all, with ``timeout_ms < 0``: leadership ended) as failed: their
        ids go back to ``due``; a late answer is then ignored. Returns how many."""
        stale = [
            t for t, (_, at) in self.inflight.items() if timeout_ms < 0 or now_ms - at > timeout_ms
        ]
        for token in stale:
            self.done(token, wheel, None)
        return len(stale)


def reported_equal(old: bytes, body: bytes, old_seq: int, seq: int) -> bool:
    """Whether the stored record ``old`` and the new ``HeartbeatRecord``
    ``body`` of the same device carry the same ``reported`` map (exactly).

    Both bodies are ``id | seq | reported entries | ttl_s``, and proposers
    encode maps deterministically (sorted by key, raftstate/batchentry.py):
    equal bytes after the seq mean equal maps, the common "nothing changed",
    for one ``bytes`` comparison. Otherwise both are parsed and compared as
    messages by protobuf (in C; map equality ignores entry order, so bodies
    from older, non-deterministic proposers compare exactly too)."""
    n = body[1]
    b = 2 + n if n < 0x80 else 3 + (n & 0x7F) + (body[2] << 7)
    a = _HEAD_SIZE + b
    if old[a] == 0x10 and body[b] == 0x10:  # the seq field follows the id
        # What follows the seq (reported entries, ttl_s) is itself a valid
        # HeartbeatRecord encoding: compare it as bytes, else as messages.
        old_tail = old[a + _VARINT_LEN[old_seq.bit_length()] :]
        new_tail = body[b + _VARINT_LEN[seq.bit_length()] :]
        if old_tail == new_tail:
            return True
    else:  # another encoder's field order: parse the whole bodies
        old_tail, new_tail = old[_HEAD_SIZE:], body
    x = _RECORD()
    x.ParseFromString(old_tail)
    y = _RECORD()
    y.ParseFromString(new_tail)
    x.device_id = y.device_id = ""
    x.seq = y.seq = x.ttl_s = y.ttl_s = 0
    return bool(x == y)


_RECORD = storage_pb2.HeartbeatRecord
_HEAD_SIZE = devicerecord.HEAD_SIZE
#: 1 (the seq's tag) + the varint length of a seq of each bit length (seq >= 1).
_VARINT_LEN = [2] + [1 + 1 + (bits - 1) // 7 for bits in range(1, 65)]


def _varint_len(value: int) -> int:
    return 1 + (value.bit_length() - 1) // 7 if value > 0 else 1
