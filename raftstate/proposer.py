"""The event-loop side of writes: batching, proposing, retrying, answering.

Theory of operation
-------------------
1. A request handler calls :meth:`Proposer.submit` with a validated heartbeat
   and awaits the future, or :meth:`Proposer.submit_many` with many (a
   ``HeartbeatBatch`` call) and awaits the one future of the returned
   :class:`HeartbeatGroup`: one asyncio future per call, not per heartbeat;
   each heartbeat's outcome is written into the group's result list by
   index, and the future resolves once the last one is settled.
2. The :class:`~raftstate.batcher.Batcher` decides when pending items become
   one ``HeartbeatBatch`` entry; the proposer encodes it, stamps it with this
   node's wall clock and this node's quotas (``max_devices``,
   ``max_state_bytes``), and hands it to pysyncobj (leader: appended; follower:
   forwarded to the leader by pysyncobj over the Raft transport).
3. pysyncobj calls back on its tick thread once the entry is committed and
   applied *on this node*; the callback hops to the loop with
   ``call_soon_threadsafe`` (once per entry) and settles each item: its own
   future, or its slot in its group.
4. If pysyncobj reports a failure (no leader, leader changed, queue full,
   outcome unknown) the items are proposed again after a short pause, until
   the caller's deadline. Re-proposing is always safe: a heartbeat whose
   ``(device_id, seq)`` was already applied is a no-op "duplicate" whose
   stored seq equals the heartbeat's, which the caller reads as success.

Only the loop thread touches the batcher and the pending items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from raftstate.admission import Quota, quota_error
from raftstate.batcher import Batcher, SlotSizer
from raftstate.config import NodeConfig
from raftstate.errors import DeadlineExceeded, RaftStateError, ResourceExhausted, Unavailable
from raftstate.histogram import LATENCY_BUCKETS_S, SIZE_BUCKETS, Histogram
from raftstate.model import BATCH_HEADER_BOUND, Heartbeat, HeartbeatResult
from raftstate.raftnode import SUCCESS, ProposeCallback
from raftstate.statemachine import encode_batch

log = logging.getLogger("raftstate.proposer")

RETRY_DELAY_S = 0.02


#: What one heartbeat came to: its result, or the error that refused it.
Outcome = HeartbeatResult | RaftStateError


class HeartbeatGroup:
    """Heartbeats submitted together by :meth:`Proposer.submit_many`.

    ``results[i]`` is the outcome of heartbeat ``i`` once it is settled
    (``None`` before): a :class:`HeartbeatResult`, ``QuotaExceeded`` (the
    entry's quota refused it), ``DeadlineExceeded`` (retried past its age
    limit) or ``Unavailable`` (node shutting down). ``future`` resolves with
    ``results`` when every heartbeat is settled. :meth:`cancel` gives up on
    the ones still unsettled: they are no longer proposed (one already in a
    proposed entry may still commit; its outcome is then not recorded)."""

    __slots__ = ("future", "left", "results", "_proposer")

    def __init__(self, future: asyncio.Future[list[Outcome | None]], n: int, proposer: Proposer):
        self.future = future
        self.results: list[Outcome | None] = [None] * n
        self.left = n
        self._proposer = proposer

    def cancel(self) -> None:
        """Stop waiting for the unsettled heartbeats (no-op when all are settled)."""
        if not self.future.done():
            self.future.cancel()

    def _settle(self, index: int, outcome: Outcome) -> None:
        self.results[index] = outcome
        self.left -= 1
        self._proposer._waiting -= 1
        if self.left == 0:
            self.future.set_result(self.results)

    def _on_done(self, fut: asyncio.Future[list[Outcome | None]]) -> None:
        if fut.cancelled():  # the unsettled ones no longer wait
            self._proposer._waiting -= self.left
            self.left = 0


class _Item:
    """One heartbeat in the batcher. ``size`` bounds its encoded record (for
    the entry byte bound); after loop time ``expires`` it is no longer
    retried (its caller has given up)."""

    __slots__ = ("expires", "heartbeat", "size")

    def __init__(self, heartbeat: Heartbeat, expires: float) -> None:
        self.heartbeat = heartbeat
        self.size = heartbeat.record_bound
        self.expires = expires

    def done(self) -> bool:
        raise NotImplementedError

    def settle(self, outcome: Outcome) -> None:
        """Record the outcome (the item must not be done)."""
        raise NotImplementedError


class _One(_Item):
    """A heartbeat from :meth:`Proposer.submit`, with its own future."""

    __slots__ = ("future",)

    def __init__(
        self, heartbeat: Heartbeat, expires: float, future: asyncio.Future[HeartbeatResult]
    ) -> None:
        super().__init__(heartbeat, expires)
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def settle(self, outcome: Outcome) -> None:
        if isinstance(outcome, RaftStateError):
            self.future.set_exception(outcome)
            # Its caller may be gone (a cancelled RPC): do not let asyncio
            # log "exception was never retrieved" once per heartbeat.
            self.future.exception()
        else:
            self.future.set_result(outcome)


class _Member(_Item):
    """A heartbeat of a :class:`HeartbeatGroup`, at ``index``."""

    __slots__ = ("group", "index")

    def __init__(
        self, heartbeat: Heartbeat, expires: float, group: HeartbeatGroup, index: int
    ) -> None:
        super().__init__(heartbeat, expires)
        self.group = group
        self.index = index

    def done(self) -> bool:
        group = self.group
        return group.future.done() or group.results[self.index] is not None

    def settle(self, outcome: Outcome) -> None:
        self.group._settle(self.index, outcome)


class Proposer:
    """Turns heartbeats into committed log entries. Loop thread only."""

    def __init__(
        self,
        cfg: NodeConfig,
        propose: Callable[[bytes, ProposeCallback], None],
        loop: asyncio.AbstractEventLoop,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._propose = propose
        self._loop = loop
        self._clock_ms = clock_ms
        self._batcher: Batcher[_Item] = Batcher(
            max_delay=cfg.batch_max_delay_ms / 1000,
            max_items=cfg.batch_max_heartbeats,
            max_bytes=cfg.batch_max_bytes - BATCH_HEADER_BOUND,
            max_inflight=cfg.max_inflight_batches,
        )
        self._slots = SlotSizer(
            floor=cfg.max_inflight_batches,
            cap=cfg.max_inflight_batches_cap,
            max_delay=cfg.batch_max_delay_ms / 1000,
        )
        self._max_pending = cfg.max_pending_heartbeats
        self._max_entry = cfg.batch_max_bytes
        #: A heartbeat is retried at most this long: twice the longest a
        #: request waits by default, so a caller's own deadline ends it first,
        #: and one whose caller vanished stops being proposed.
        self._max_age = 2 * cfg.default_request_timeout_ms / 1000
        self.quota = Quota(cfg.max_devices, cfg.max_state_bytes)
        self._waiting = 0
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        self._closed = False
        self.entries_proposed = 0
        self.entries_retried = 0
        #: For /metrics: heartbeats per proposed entry, and seconds from
        #: submit to commit-and-apply on this node per answered heartbeat.
        self.batch_sizes = Histogram(SIZE_BUCKETS)
        self.ack_latency = Histogram(LATENCY_BUCKETS_S)
        #: For stall diagnosis (raftstate/stallprobe.py): heartbeats submitted,
        #: entries whose pysyncobj callback came back (and how many with a
        #: failure), and the loop time each entry still in flight was proposed
        #: (by proposal number): an entry whose callback never comes stays here.
        self.submitted = 0
        self.entries_answered = 0
        self.entries_failed = 0
        self.inflight_since: dict[int, float] = {}

    @property
    def waiting(self) -> int:
        """Heartbeats submitted and not yet answered (``max_pending_heartbeats``)."""
        return self._waiting

    @property
    def room(self) -> int:
        """How many more heartbeats may wait now (``max_pending_heartbeats``)."""
        return max(0, self._max_pending - self._waiting)

    def submit(self, hb: Heartbeat) -> asyncio.Future[HeartbeatResult]:
        """Queue a heartbeat; the future resolves once it is committed and
        applied here (it fails with ``QuotaExceeded`` if the entry's quota
        refused it). Raises ``ResourceExhausted`` when too many are waiting,
        ``Unavailable`` while shutting down."""
        if self._waiting >= self._max_pending:
            raise self._full()
        if self._closed:
            raise Unavailable("node is shutting down", "SHUTTING_DOWN")
        item = _One(hb, self._loop.time() + self._max_age, self._loop.create_future())
        self.submitted += 1
        self._waiting += 1
        item.future.add_done_callback(self._on_item_done)
        self._send(self._batcher.add(item, item.size, self._loop.time()))
        return item.future

    def submit_many(self, hbs: Sequence[Heartbeat]) -> HeartbeatGroup:
        """Queue heartbeats that arrived together, in order; the returned
        group's one future resolves when all are settled (class docstring).
        All or nothing: raises ``ResourceExhausted`` when more than
        :attr:`room` are given (nothing queued), ``Unavailable`` while
        shutting down. An empty sequence gives a group already resolved."""
        n = len(hbs)
        if n > self.room:
            raise self._full()
        if self._closed:
            raise Unavailable("node is shutting down", "SHUTTING_DOWN")
        group = HeartbeatGroup(self._loop.create_future(), n, self)
        if n == 0:
            group.future.set_result(group.results)
            return group
        self._waiting += n
        self.submitted += n
        group.future.add_done_callback(group._on_done)
        now = self._loop.time()
        expires = now + self._max_age
        members: list[_Item] = [_Member(hb, expires, group, i) for i, hb in enumerate(hbs)]
        self._send(self._batcher.add_many(members, [m.size for m in members], now))
        return group

    def _full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"max_pending_heartbeats: {self._waiting} heartbeats are waiting to commit "
            f"on this node (limit {self._max_pending}); retry later"
        )

    def close(self) -> None:
        """Fail everything still pending with ``Unavailable``."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for item in self._batcher.drain():
            if not item.done():
                item.settle(Unavailable("node is shutting down", "SHUTTING_DOWN"))

    # ---- internals ------------------------------------------------------------

    def _on_item_done(self, _fut: asyncio.Future[HeartbeatResult]) -> None:
        self._waiting -= 1

    def _send(self, batches: list[list[_Item]]) -> None:
        for items in batches:
            live = [i for i in items if not i.done()]
            if not live:
                self._send(self._batcher.finished(self._loop.time()))
                continue
            entry = encode_batch((i.heartbeat for i in live), self._clock_ms(), self.quota)
            if len(entry) > self._max_entry:  # the record bounds are wrong: a bug
                raise AssertionError(
                    f"entry of {len(entry)} bytes exceeds batch_max_bytes ({self._max_entry})"
                )
            self.entries_proposed += 1
            self.batch_sizes.observe(len(live))
            now = self._loop.time()
            self.inflight_since[self.entries_proposed] = now
            self._propose(entry, self._callback_for(live, now, self.entries_proposed))
        self._arm_timer()

    def _callback_for(self, items: list[_Item], proposed: float, number: int) -> ProposeCallback:
        call = self._loop.call_soon_threadsafe

        def on_result(results: list[HeartbeatResult] | None, err: int) -> None:
            # Tick thread: hop to the loop and return at once.
            try:
                call(self._on_result, items, results, err, proposed, number)
            except RuntimeError:  # loop closed during shutdown
                pass

        return on_result

    def _on_result(
        self,
        items: list[_Item],
        results: list[HeartbeatResult] | None,
        err: int,
        proposed: float | None = None,
        number: int | None = None,
    ) -> None:
        if number is not None:
            self.inflight_since.pop(number, None)
            self.entries_answered += 1
            self.entries_failed += err != SUCCESS
        if err == SUCCESS and results is not None and proposed is not None:
            # In-flight slots follow the measured commit time (batcher.SlotSizer).
            self._batcher.max_inflight = self._slots.observe(self._loop.time() - proposed)
        if err == SUCCESS and results is not None:
            # An item's ``expires`` is its submit time plus ``_max_age``, so
            # its wait so far is ``horizon - expires``.
            horizon = self._loop.time() + self._max_age
            for item, value in zip(items, results, strict=True):
                if item.done():
                    continue
                self.ack_latency.observe(horizon - item.expires)
                if value.rejected:
                    item.settle(quota_error(self.quota, value.rejected, item.heartbeat.device_id))
                else:
                    item.settle(value)
        else:
            self.entries_retried += 1
            log.debug("batch of %d failed with pysyncobj reason %d; retrying", len(items), err)
            self._loop.call_later(RETRY_DELAY_S, self._requeue, items)
        self._send(self._batcher.finished(self._loop.time()))

    def _requeue(self, items: list[_Item]) -> None:
        if self._closed:
            return
        now = self._loop.time()
        for item in items:
            if item.done():
                continue
            if now >= item.expires:
                item.settle(DeadlineExceeded(
                    "heartbeat not committed in time; retrying with the same seq is safe"
                ))
                continue
            self._send(self._batcher.add(item, item.size, now))

    def _arm_timer(self) -> None:
        deadline = self._batcher.deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._send(self._batcher.poll(self._loop.time()))
