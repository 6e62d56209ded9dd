"""Raft events that a scrape cannot read afterwards: elections, leader
changes, snapshots.

Theory of operation. Term, role and indexes are state: ``/metrics`` reads
them when scraped. Elections and leader changes are events between scrapes,
so :class:`RaftEvents` watches the state once per Raft tick (three attribute
reads, tick thread) and counts transitions:

* an **election** is started by this node when its term rises and it is then
  a candidate, or already leader (a single voter wins in the same tick):
  pysyncobj raises the term by one and sends RequestVote in one tick (Raft
  §5.2), so at most one election starts between two observations, and a
  term adopted from another node's RequestVote leaves it a follower;
* a **leader change** is a known leader different from the last known one
  (the first leader seen counts, like etcd's ``leader_changes_seen``).

:class:`SnapshotStats` wraps pysyncobj's snapshot serializer: each snapshot
written is timed and the size of the file it wrote is kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from raftstate.histogram import SLOW_BUCKETS_S, Histogram

#: pysyncobj's ``_RAFT_STATE`` values.
CANDIDATE = 1
LEADER = 2


class RaftEvents:
    """Counts elections started by this node and leader changes seen.
    :meth:`observe` on the tick thread only; counters readable anywhere."""

    __slots__ = ("elections", "leader_changes", "_term", "_leader")

    def __init__(self, term: int = 0) -> None:
        self.elections = 0
        self.leader_changes = 0
        self._term = term
        self._leader: object = None

    def observe(self, state: int, term: int, leader: object) -> None:
        """One look at pysyncobj's state (``_RAFT_STATE``), term and leader
        (any comparable identity, ``None`` when unknown)."""
        if term > self._term and state in (CANDIDATE, LEADER):
            self.elections += 1
        self._term = max(self._term, term)
        if leader is not None and leader != self._leader:
            self.leader_changes += 1
            self._leader = leader


class SnapshotStats:
    """Duration and size of the snapshots this node writes. Written on the
    thread that writes snapshots; read anywhere."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.duration = Histogram(SLOW_BUCKETS_S)
        self.last_bytes = 0
        self.failures = 0
        self._clock = clock

    def observe(self, duration_s: float, size_bytes: int) -> None:
        """Record one snapshot written in ``duration_s`` to ``size_bytes``."""
        self.duration.observe(duration_s)
        self.last_bytes = size_bytes

    def timed(self, serializer: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        """``serializer(path, data)`` (pysyncobj's hook) timed: each call that
        returns is observed with the size of ``path``; one that raises is
        counted in ``failures`` and re-raised."""

        def write(path: str, data: Any) -> None:
            started = self._clock()
            try:
                serializer(path, data)
            except BaseException:
                self.failures += 1
                raise
            try:
                size = os.stat(path).st_size
            except OSError:
                size = 0
            self.observe(self._clock() - started, size)

        return write


__all__ = ["RaftEvents", "SnapshotStats"]
