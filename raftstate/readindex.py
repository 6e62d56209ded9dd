"""Leader-side ReadIndex: linearizable reads without writing to the log.

Theory of operation
-------------------
A leader may answer a read from its local state machine only if nothing newer
has been committed anywhere, i.e. if it is still *the* leader. Raft thesis §6.4
gets that guarantee without a log write:

1. **Own-term commit.** The leader must know the latest commit index, which it
   does only once an entry of its own term has committed (the no-op pysyncobj
   appends on election). Until the driver reports that with
   :meth:`ReadIndexTracker.on_leader_ready`, reads are held. Reads held this way
   get ``read_index = max(commit index at arrival, commit index when ready)``;
   reads after that get the commit index at arrival.
2. **Quorum round after arrival.** The leader proves it was still leader at
   some moment *after* the read arrived: it sends a probe tagged ``(term,
   round)`` to every peer, and a follower acks only if it is in the same term
   and follows this leader (:func:`should_ack`). A read needs acks from a
   majority (the leader counts itself) for rounds that *started after it
   arrived*. Round numbers increase in time, so each read records the first
   round that can start after it (``required``); an ack for any round ``>=
   required`` counts, an ack for an older round never does.
3. **Apply.** The read is granted as ``(read_id, read_index)``; the driver waits
   until ``last_applied >= read_index`` and then reads locally. That step is not
   here.
4. **Follower reads** (also §6.4) are ordinary reads on the leader whose
   grant the driver sends back to the asking follower; ``read_id`` is opaque.

Reads share rounds: at most one round is in flight. A read arriving while one
is in flight waits for the next round, which starts as soon as the in-flight
one reaches quorum or fails (no waiting read needs it any more, because those
reads expired or were cancelled). Lease-based reads (§6.4.1) are not used:
they rely on bounded clock drift.

Why rounds and not request contexts: etcd matched heartbeat responses to reads
by a caller-chosen context, so a delayed response for an earlier read could
confirm a later, identical one from a deposed leader (etcd-io/etcd#20418, fixed
by etcd-io/raft#397). Here the leader alone chooses ``(term, round)``, acks for
other terms, unstarted rounds and unknown peers are dropped, and each peer
counts once, with the highest round it has acked.

Invariants
----------
* A grant is only ever returned while leader and ready in one term, for a read
  that arrived in that term and whose deadline has not passed, after a majority
  acked rounds that started after the read arrived.
* A term change or step-down fails every waiting read and forgets all acks.
* Every read ends exactly once: granted, failed, or removed by :meth:`cancel`.

Driver contract
---------------
The tracker cannot see Raft state, so a grant is only as fresh as the events
fed to it. The driver calls :meth:`~ReadIndexTracker.on_become_leader`,
:meth:`~ReadIndexTracker.on_leader_ready` and
:meth:`~ReadIndexTracker.on_step_down` as soon as pysyncobj's state changes,
before feeding any further ack; sends each :class:`Probe` to its peers; answers
``failed`` reads UNAVAILABLE; and serves a :class:`Grant` only once
``last_applied >= read_index``. Check-quorum (stepping down after losing the
majority) is also the driver's job.

The tracker is sans-IO: no sockets, no clock, no randomness. Time is the
``now`` argument (any monotonic seconds). It is not thread-safe; call it from
one thread (pysyncobj's tick thread).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Grant", "Output", "Probe", "ReadIndexTracker", "should_ack"]

R = TypeVar("R", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Probe:
    """Send ``(term, round)`` to each of ``peers``; they answer with an ack
    carrying the same ``(term, round)``."""

    term: int
    round: int
    peers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Grant(Generic[R]):
    """``read_id`` may be served once ``last_applied >= read_index``."""

    read_id: R
    read_index: int


@dataclass(frozen=True, slots=True)
class Output(Generic[R]):
    """What the driver must do after one call. Any call may fill any field.

    ``failed`` reads must be answered UNAVAILABLE (or NotLeader). Build it
    unsubscripted (``Output()``, not ``Output[int]()``): Python 3.11 cannot
    construct frozen slotted generic dataclasses through an alias.
    """

    probes: tuple[Probe, ...] = ()
    grants: tuple[Grant[R], ...] = ()
    failed: tuple[R, ...] = ()


def should_ack(probe_term: int, my_term: int, my_leader_id: str | None, sender_id: str) -> bool:
    """Follower side: ack a probe only if it is from our term and from the node
    we follow. Pure; safe from any thread."""
    return probe_term == my_term and my_leader_id is not None and my_leader_id == sender_id


@dataclass(slots=True)
class _Read:
    read_index: int
    deadline: float
    required: int  # the first round that can start after this read arrived
    seq: int  # arrival order; tells a live deadline-heap entry from a stale one


@dataclass(slots=True)
class _Round:
    number: int
    last_sent: float


class ReadIndexTracker(Generic[R]):
    """Tracks reads waiting for leadership confirmation on the leader.

    Every event method returns an :class:`Output` for the driver to act on;
    :meth:`cancel` returns a bool. Not thread-safe.
    """

    def __init__(self, self_id: str, peers: Iterable[str], *, resend_after: float) -> None:
        """``peers`` are the other voting members. Raises ``ValueError`` if
        ``resend_after`` is not positive or ``peers`` contains ``self_id``."""
        peer_ids = tuple(sorted(set(peers)))
        if self_id in peer_ids:
            raise ValueError(f"peers must not contain self_id {self_id!r}")
        if not resend_after > 0:
            raise ValueError(f"resend_after must be > 0, got {resend_after!r}")
        self.self_id = self_id
        self.peers = peer_ids
        self.resend_after = resend_after
        # Peer acks a majority of len(peers) + 1 voters needs besides the leader.
        self._needed = (len(peer_ids) + 1) // 2
        self._max_term = 0
        self._term: int | None = None
        self._ready = False
        self._commit_floor = 0
        # Round numbers never repeat for the tracker's lifetime, so (term, round)
        # is unique even if a driver reports the same term twice.
        self._rounds_started = 0
        self._term_first_round = 1
        self._inflight: _Round | None = None
        self._acked: dict[str, int] = {}  # peer -> highest round acked this term
        # In arrival order, so ``required`` never decreases along it: the reads
        # a round confirms are a prefix, and the first and last entries bound
        # every read's ``required``. That keeps each call O(1) amortised (plus
        # O(log n) per read for the deadline heap) however many reads wait.
        self._reads: dict[R, _Read] = {}
        # (deadline, seq, read_id); entries of reads that ended are skipped lazily.
        self._deadlines: list[tuple[float, int, R]] = []
        self._seq = itertools.count()

    # -- read-only state -------------------------------------------------

    @property
    def term(self) -> int | None:
        """The term we lead, or ``None`` when not leader."""
        return self._term

    @property
    def ready(self) -> bool:
        """True once an own-term entry committed (reads can be confirmed)."""
        return self._ready

    @property
    def waiting(self) -> int:
        """Number of reads neither granted nor failed yet."""
        return len(self._reads)

    @property
    def rounds_started(self) -> int:
        """Quorum rounds started over the tracker's lifetime; also the number
        of the latest round."""
        return self._rounds_started

    @property
    def round_in_flight(self) -> int | None:
        """Number of the round awaiting quorum, if any."""
        return None if self._inflight is None else self._inflight.number

    def next_tick_at(self) -> float | None:
        """When :meth:`on_tick` next has work (a resend or an expiry), or
        ``None``. Drivers that tick periodically can ignore this."""
        self._drop_stale_deadlines()
        times = [self._deadlines[0][0]] if self._deadlines else []
        if self._inflight is not None and self._unacked():
            times.append(self._inflight.last_sent + self.resend_after)
        return min(times, default=None)

    # -- leadership ------------------------------------------------------

    def on_become_leader(self, term: int) -> Output[R]:
        """We won the election for ``term``; reads are held until
        :meth:`on_leader_ready`. Fails reads of any previous term. A repeat call
        for the current term is a no-op. Raises ``ValueError`` if ``term`` is
        older than a term seen before."""
        if term < self._max_term:
            raise ValueError(f"term {term} is older than term {self._max_term}")
        if term == self._term:
            return Output()
        out = self.on_step_down()
        self._max_term = self._term = term
        self._term_first_round = self._rounds_started + 1
        return out

    def on_leader_ready(self, term: int, *, commit_index: int, now: float) -> Output[R]:
        """An entry of ``term`` committed; ``commit_index`` is the commit index
        now. Starts a round for held reads. Ignored unless we lead ``term``."""
        if term != self._term or self._ready:
            return Output()
        self._ready = True
        self._commit_floor = commit_index
        for read in self._reads.values():
            read.read_index = max(read.read_index, commit_index)
        return self._advance(now, [])

    def on_step_down(self) -> Output[R]:
        """We are no longer leader (or never were). Fails every waiting read."""
        failed = tuple(self._reads)
        self._reads.clear()
        self._deadlines.clear()
        self._term = None
        self._ready = False
        self._commit_floor = 0
        self._inflight = None
        self._acked.clear()
        return Output(failed=failed)

    # -- reads -----------------------------------------------------------

    def start_read(
        self, read_id: R, *, commit_index: int, term: int, now: float, deadline: float
    ) -> Output[R]:
        """A linearizable read arrived (locally, or from a follower) while the
        driver's Raft state was in ``term`` with ``commit_index``.

        It fails at once if we do not lead ``term`` (a newer ``term`` means we
        missed a step-down: every read fails) or if ``deadline <= now``.
        Raises ``ValueError`` if ``read_id`` is already waiting.
        """
        if read_id in self._reads:
            raise ValueError(f"read {read_id!r} is already waiting")
        if self._term is None or term < self._term:
            return Output(failed=(read_id,))
        if term > self._term:
            return Output(failed=(*self.on_step_down().failed, read_id))
        if deadline <= now:
            return Output(failed=(read_id,))
        seq = next(self._seq)
        self._reads[read_id] = _Read(
            read_index=max(commit_index, self._commit_floor),
            deadline=deadline,
            required=self._rounds_started + 1,
            seq=seq,
        )
        heapq.heappush(self._deadlines, (deadline, seq, read_id))
        return self._advance(now, [])

    def on_ack(self, peer: str, term: int, round: int, now: float) -> Output[R]:
        """``peer`` acked probe ``(term, round)``. Acks for another term, a round
        not started in this term, or an unknown peer are ignored; a repeat or
        an older round than the peer already acked changes nothing."""
        if (
            term != self._term
            or peer not in self.peers
            or not self._term_first_round <= round <= self._rounds_started
        ):
            return self._advance(now, [])
        if round > self._acked.get(peer, 0):
            self._acked[peer] = round
        return self._advance(now, [])

    def on_tick(self, now: float) -> Output[R]:
        """Expire reads whose deadline is ``<= now`` and re-send the in-flight
        probe to peers that have not acked it, at most every ``resend_after``."""
        probes: list[Probe] = []
        out = self._advance(now, probes)
        inflight = self._inflight
        if inflight is not None and now - inflight.last_sent >= self.resend_after:
            unacked = self._unacked()
            if unacked and self._term is not None:
                inflight.last_sent = now
                probes.append(Probe(self._term, inflight.number, unacked))
        return Output(probes=tuple(probes), grants=out.grants, failed=out.failed)

    def cancel(self, read_id: R) -> bool:
        """Forget ``read_id`` (the client went away); it will be neither granted
        nor failed. Returns whether it was waiting. A round that nobody needs
        any more is dropped by the next call that takes ``now``."""
        return self._reads.pop(read_id, None) is not None

    # -- internals -------------------------------------------------------

    def _unacked(self) -> tuple[str, ...]:
        if self._inflight is None:
            return ()
        number = self._inflight.number
        return tuple(p for p in self.peers if self._acked.get(p, 0) < number)

    def _confirmed_round(self) -> int:
        """The highest round r such that a majority acked some round >= r."""
        if self._needed == 0:
            return self._rounds_started
        highest = sorted((self._acked.get(p, 0) for p in self.peers), reverse=True)
        return highest[self._needed - 1]

    def _drop_stale_deadlines(self) -> None:
        heap, reads = self._deadlines, self._reads
        while heap:
            _, seq, rid = heap[0]
            read = reads.get(rid)
            if read is not None and read.seq == seq:
                return
            heapq.heappop(heap)

    def _expire(self, now: float) -> list[R]:
        """Remove the reads whose deadline is ``<= now``; in arrival order."""
        heap, reads = self._deadlines, self._reads
        expired: list[tuple[int, R]] = []
        while heap and heap[0][0] <= now:
            _, seq, rid = heapq.heappop(heap)
            read = reads.get(rid)
            if read is not None and read.seq == seq:
                del reads[rid]
                expired.append((seq, rid))
        expired.sort(key=lambda e: e[0])
        return [rid for _, rid in expired]

    def _advance(self, now: float, probes: list[Probe]) -> Output[R]:
        """Expire, grant, retire the in-flight round, start the next one."""
        failed = self._expire(now) if self._deadlines and self._deadlines[0][0] <= now else []
        grants: list[Grant[R]] = []
        reads = self._reads
        while self._ready and self._term is not None:
            confirmed = self._confirmed_round()
            while reads:
                rid = next(iter(reads))
                if reads[rid].required > confirmed:
                    break
                grants.append(Grant(rid, reads.pop(rid).read_index))
            inflight = self._inflight
            # ``required`` never decreases in arrival order: the first read has
            # the lowest, the last the highest.
            if inflight is not None and (
                inflight.number <= confirmed
                or not reads
                or reads[next(iter(reads))].required > inflight.number
            ):
                self._inflight = None  # reached quorum, or failed: nobody needs it
            if (
                self._inflight is not None
                or not reads
                or reads[next(reversed(reads))].required <= self._rounds_started
            ):
                break
            self._rounds_started += 1
            self._inflight = _Round(self._rounds_started, last_sent=now)
            if self.peers:
                probes.append(Probe(self._term, self._rounds_started, self.peers))
        return Output(probes=tuple(probes), grants=tuple(grants), failed=tuple(failed))
