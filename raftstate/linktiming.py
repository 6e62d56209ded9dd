"""Raft timers derived from the measured links (issue 15, item 6).

Theory of operation
-------------------
A follower starts an election when no ``append_entries`` reached it within
its election timeout T. With the leader alive, that happens only if the
messages in flight were delayed past T. On our reliable UDP link
(raftstate/transport/reliable.py) a message is never lost for good; it is
late by one loss-repair delay per attempt that fails. So, per message the
follower receives, the next one arrives within

    gap <= 2 H + tail + k R + margin

unless k attempts in a row fail, where

* ``H`` is the leader's idle AppendEntries period (one period because that
  is when the next one leaves, and one more as slack for the two ends of
  the link estimating it differently: the leader chooses H from *its*
  estimate of the link, the follower T from its own, and the two may
  disagree by up to 2x before the slack runs out);
* ``tail = srtt + 4 rttvar`` is the delay tail (RFC 6298's RTO without the
  clock floor; a one-way delay is below it with room to spare);
* ``R = srtt + 4 rttvar`` is one repair: the loss is detected by the next
  ACK or a probe and the data sent again (RFC 9002 §6);
* ``margin`` is :data:`HOST_MARGIN_S`, for the tick thread's scheduling on
  a loaded host (pysyncobj polls every ``tick_ms``; ticks of 50-100 ms were
  measured on the shared two-core box);
* the first attempt carries the link's proactive copies, so it fails with
  :func:`~raftstate.transport.recovery.residual_loss` ``(p, q, copies)``
  (mean loss p, burst loss q, Gilbert-Elliott); a repair leaves at least one
  RTT later, past the burst, and fails with p. P(k in a row) =
  ``residual * p ** (k - 1)``.

:func:`election_timeout_for` picks the smallest k with that probability at
most :data:`SPURIOUS_TARGET` and sets T = (tail + k R + margin) / (1 - 2/N)
with H = T / N (:data:`HEARTBEATS_PER_TIMEOUT`), so that T >= 2 H + tail +
k R + margin. T is clamped to ``[floor, ceiling / spread]``: the floor keeps
T above what the host's scheduling needs (a ``lan`` link has an RTT of well
under a millisecond), the ceiling bounds how long a failover may take on any
link; a T held down by the ceiling is reported (``capped``). T is monotone
in srtt, rttvar, p and q.

Agreement and roles (:func:`derive`). Each node derives one T per peer it
has an RTT sample for, and then:

* its election timeout (pysyncobj ``raftMinTimeout``; ``raftMaxTimeout`` =
  ``spread`` x that, pysyncobj draws uniformly between them, so the
  randomisation of Raft §5.2 stays) from its link to the leader it follows;
  with no leader known, the largest over its links (a candidate waiting for
  votes must not time out before the slowest voter answers);
* its heartbeat period H (used while it leads) = min over its links of
  T / N, so every follower gets at least N heartbeats per its own timeout;
* its check-quorum (pysyncobj ``leaderFallbackTimeout``) =
  :data:`STEP_DOWN_FACTOR` x the largest T over its followers (within the
  ceiling): it steps down only when no majority answered for longer than
  the slowest link's timeout, i.e. when every link of a majority missed
  more than its own spurious bound at once.

The PreVote lease (raftstate/prevote.py) is each node's own T: a peer
refuses a pre-vote while it heard the leader within its T, so failover after
a leader crash takes the longer of the two followers' T, never less, and a
follower with a short T on a good link cannot depose a leader the other
follower still hears. Timings differ between nodes; each lies within
``[floor, ceiling]``.

No clock and no I/O here: the caller passes the link estimates in
(``RaftNode.apply_link_timing``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from raftstate.transport.recovery import residual_loss

#: Probability that one follower's timer fires although the leader is alive
#: and sending, per message it receives. A spurious timer costs a pre-vote
#: round, not a leader change: a change needs a majority to time out at
#: once (the lease), about this squared.
SPURIOUS_TARGET = 1e-6
#: Heartbeats per election timeout (etcd: 10 ticks per election, 1 per
#: heartbeat). Two of them are the slack of the formula above.
HEARTBEATS_PER_TIMEOUT = 10
#: Host scheduling allowance inside every timeout, seconds.
HOST_MARGIN_S = 0.1
#: Check-quorum = this x the slowest link's election timeout (today's
#: configured defaults have 800 ms against 600-1200 ms): within the
#: followers' randomised range, so a cut-off leader is gone about when a new
#: one is elected, and a stall of the leader's own host (every link late at
#: once) gets half a timeout more than a follower's timer does.
STEP_DOWN_FACTOR = 1.5
#: Repairs in a row considered at most: beyond this, a link is broken, not lossy.
MAX_REPAIRS = 30


@dataclass(frozen=True, slots=True)
class LinkSample:
    """One link's estimates, as the transport measures them. Seconds and
    fractions: ``loss`` the mean loss p, ``burst`` q = P(lost | previous
    lost), ``copies`` the redundant copies the link adds per chunk."""

    srtt: float
    rttvar: float
    loss: float = 0.0
    burst: float = 0.0
    copies: int = 0

    @property
    def tail(self) -> float:
        """The delay tail and one repair's time, ``srtt + 4 rttvar``."""
        return max(self.srtt, 0.0) + 4 * max(self.rttvar, 0.0)

    def first_attempt_loss(self) -> float:
        """P(a message and all its proactive copies are lost)."""
        p = _unit(self.loss)
        return residual_loss(p, max(_unit(self.burst), p), max(self.copies, 0))


@dataclass(frozen=True, slots=True)
class TimingBounds:
    """Where derived values may lie. Seconds."""

    #: Lowest election timeout (the host's scheduling needs it).
    floor: float
    #: Highest ``raftMaxTimeout``: the longest detection any link may get.
    ceiling: float
    #: ``raftMaxTimeout / raftMinTimeout`` (Raft §5.2 randomisation).
    spread: float = 2.0
    #: Shortest heartbeat period (pysyncobj cannot send more often than it ticks).
    min_heartbeat: float = 0.02

    @property
    def max_election_min(self) -> float:
        return self.ceiling / self.spread


@dataclass(frozen=True, slots=True)
class Timing:
    """pysyncobj's four timers, seconds, and where they came from."""

    heartbeat: float
    election_min: float
    election_max: float
    step_down: float
    #: "configured" (no link measured yet, or adaptive timing off) or
    #: "links": derived from the peers named in ``basis``.
    source: str = "configured"
    #: The peer the election timeout came from ("" if none).
    basis: str = ""
    #: Some link needed more than the ceiling allows.
    capped: bool = False


@dataclass(frozen=True, slots=True)
class LinkTimeout:
    """One link's election timeout and whether the ceiling held it down."""

    seconds: float
    capped: bool


def repairs_needed(link: LinkSample, target: float = SPURIOUS_TARGET) -> int:
    """The fewest attempts k such that P(k attempts in a row fail) =
    ``first_attempt_loss * p ** (k - 1)`` is at most ``target``; 0 on a
    link without loss, at most :data:`MAX_REPAIRS`."""
    first = link.first_attempt_loss()
    if first <= target:
        return 0 if first == 0 else 1
    p = _unit(link.loss)
    k, prob = 1, first
    while prob > target and k < MAX_REPAIRS:
        k += 1
        prob *= p
    return k


def raw_election_timeout(link: LinkSample, target: float = SPURIOUS_TARGET) -> float:
    """T before the bounds: (tail + (k - 1) R + margin) / (1 - 2/N), with
    k = :func:`repairs_needed` (at least 1: the message itself) and R = tail.
    The k-th attempt leaves (k - 1) R after the first and arrives within tail."""
    need = link.tail * max(repairs_needed(link, target), 1) + HOST_MARGIN_S
    return need / (1 - 2 / HEARTBEATS_PER_TIMEOUT)


def election_timeout_for(
    link: LinkSample, bounds: TimingBounds, target: float = SPURIOUS_TARGET
) -> LinkTimeout:
    """The minimum election timeout a follower of ``link`` needs, within
    ``bounds``: never below ``floor``, never above ``ceiling / spread``."""
    raw = raw_election_timeout(link, target)
    top = bounds.max_election_min
    return LinkTimeout(min(max(raw, bounds.floor), top), raw > top)


def spurious_probability(link: LinkSample, timeout: float, heartbeat: float) -> float:
    """P(no message within ``timeout`` of the last one, the leader alive and
    sending every ``heartbeat``) by the model of the module doc: the repairs
    that fit in the timeout must all fail."""
    room = timeout - 2 * heartbeat - HOST_MARGIN_S
    tail = link.tail
    if tail <= 0:
        return 0.0 if room >= 0 else 1.0
    # attempts that can still arrive in time: tail + (k - 1) R <= room
    # (a relative 1e-9 forgives the rounding of the derivation's arithmetic)
    k = int(min(float(MAX_REPAIRS), room / tail + 1e-9))
    if k < 1:
        return 1.0
    return link.first_attempt_loss() * _unit(link.loss) ** (k - 1)


def derive(
    links: Mapping[str, LinkSample],
    leader: str | None,
    bounds: TimingBounds,
    previous: Timing,
) -> Timing:
    """This node's timers from its links (peer id -> sample; peers without
    an RTT sample left out). ``leader``: the peer it follows (None: none
    known, or itself). The heartbeat period and check-quorum are computed on
    every node (they take effect when it leads, so a new leader has them at
    once). ``previous``: the timing in force, returned unchanged when no link
    has a sample."""
    if not links:
        return previous
    per = {peer: election_timeout_for(link, bounds) for peer, link in links.items()}
    capped = any(t.capped for t in per.values())
    if leader is not None and leader in per:
        basis, own = leader, per[leader].seconds
    else:
        basis = max(per, key=lambda peer: per[peer].seconds)
        own = per[basis].seconds
    shortest = min(t.seconds for t in per.values())
    heartbeat = max(shortest / HEARTBEATS_PER_TIMEOUT, bounds.min_heartbeat)
    step_down = min(max(t.seconds for t in per.values()) * STEP_DOWN_FACTOR, bounds.ceiling)
    return Timing(
        heartbeat=heartbeat,
        election_min=own,
        election_max=min(own * bounds.spread, bounds.ceiling),
        step_down=step_down,
        source="links",
        basis=basis,
        capped=capped,
    )


def _unit(x: float) -> float:
    if math.isnan(x):
        return 1.0
    return min(max(x, 0.0), 1.0)


__all__ = [
    "HEARTBEATS_PER_TIMEOUT",
    "HOST_MARGIN_S",
    "SPURIOUS_TARGET",
    "STEP_DOWN_FACTOR",
    "LinkSample",
    "LinkTimeout",
    "Timing",
    "TimingBounds",
    "derive",
    "election_timeout_for",
    "raw_election_timeout",
    "repairs_needed",
    "spurious_probability",
]
