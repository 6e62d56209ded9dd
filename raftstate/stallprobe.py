"""Stall probe: log the write path's state while heartbeats wait (diagnosis).

Theory of operation
-------------------
Off unless the environment sets ``RAFTSTATE_STALL_PROBE`` (the lab passes
its environment to the nodes). Then a task on the node's event loop wakes
every ``PERIOD_S`` and takes a :class:`Sample`: how late the loop woke (CPU
starvation shows here first: the loop also runs the UDP transport and gRPC),
the proposer's in-flight slots and the age of its oldest entry still in
flight and of its oldest pending heartbeat, and Raft's view (leader or not,
commit / applied / last index, matchIndex and nextIndex per peer, commands
queued, callbacks waiting). It logs a ``stall:`` line whenever
:func:`stalled` says so, and a ``tick:`` summary with counters once a
second, so a lab run can be lined up with the per-heartbeat records.

It was written to chase the "leader's site stalls" report; what it showed is
in docs/architecture.md (search "stall probe").
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("raftstate.stallprobe")

ENV = "RAFTSTATE_STALL_PROBE"
PERIOD_S = 0.25
#: An entry in flight, or a heartbeat pending, longer than this is a stall.
STALL_AGE_S = 0.5
#: The loop waking this much later than asked is a stall.
STALL_LAG_S = 0.3


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the write path (ages and lag in seconds)."""

    lag: float
    oldest_inflight: float
    oldest_pending: float


class Arrivals:
    """Unary heartbeat calls reaching their handler since the last summary,
    and the least deadline time they had left on arrival (a call that waited
    in gRPC before its handler ran arrives with little left)."""

    __slots__ = ("count", "least_left")

    def __init__(self) -> None:
        self.count = 0
        self.least_left: float | None = None

    def note(self, left: float | None) -> None:
        """A call reached its handler with ``left`` seconds to its deadline."""
        self.count += 1
        if left is not None and (self.least_left is None or left < self.least_left):
            self.least_left = left

    def take(self) -> tuple[int, float | None]:
        """The counts so far, then start again."""
        out = (self.count, self.least_left)
        self.count, self.least_left = 0, None
        return out


#: Fed by the server's Heartbeat handler (only while the probe runs).
ARRIVALS = Arrivals()
ENABLED = bool(os.environ.get(ENV))


def stalled(sample: Sample) -> bool:
    """Whether ``sample`` is worth a ``stall:`` line."""
    return (
        sample.oldest_inflight > STALL_AGE_S
        or sample.oldest_pending > STALL_AGE_S
        or sample.lag > STALL_LAG_S
    )


def raft_view(raft: Any) -> str:
    """pysyncobj's leader-side state, read without locks (diagnosis only:
    values may be a tick apart)."""
    try:
        def field(name: str) -> Any:
            return getattr(raft, "_SyncObj__" + name, None)

        nexts = {getattr(k, "id", k): v for k, v in (field("raftNextIndex") or {}).items()}
        matches = {getattr(k, "id", k): v for k, v in (field("raftMatchIndex") or {}).items()}
        queue = field("commandsQueue")
        queued = len(queue._FastQueue__queue) if queue is not None else None
        return (
            f"leader={raft._isLeader()} term={field('raftCurrentTerm')} "
            f"commit={field('raftCommitIndex')} applied={field('raftLastApplied')} "
            f"last={raft._last_log_index()} match={matches} next={nexts} queue={queued} "
            f"waitcommit={len(field('commandsWaitingCommit') or {})} "
            f"waitreply={len(field('commandsWaitingReply') or {})}"
        )
    except Exception as err:  # noqa: BLE001 - a diagnosis line must not kill the node
        return f"raft view failed: {err!r}"


async def run(proposer: Any, raft: Any) -> None:
    """Probe until cancelled (returns at once unless ``ENV`` is set)."""
    if not os.environ.get(ENV):
        return
    loop = asyncio.get_running_loop()
    next_summary = loop.time() + 1.0
    max_lag = 0.0
    while True:
        before = loop.time()
        await asyncio.sleep(PERIOD_S)
        now = loop.time()
        batcher = proposer._batcher
        since = list(proposer.inflight_since.values())
        sample = Sample(
            lag=max(0.0, now - before - PERIOD_S),
            oldest_inflight=now - min(since) if since else 0.0,
            oldest_pending=now - batcher._oldest if batcher._oldest is not None else 0.0,
        )
        max_lag = max(max_lag, sample.lag)
        slots = f"inflight={batcher.inflight}/{batcher.max_inflight} pending={batcher.pending}"
        if stalled(sample):
            log.warning(
                "stall: lag=%.2f oldest_inflight=%.2f oldest_pending=%.2f %s %s",
                sample.lag, sample.oldest_inflight, sample.oldest_pending, slots, raft_view(raft),
            )  # fmt: skip
        if now >= next_summary:
            next_summary = now + 1.0
            calls, least = ARRIVALS.take()
            log.warning(
                "tick: calls=%d least_left=%s max_lag=%.2f submitted=%d proposed=%d "
                "answered=%d failed=%d %s %s",
                calls, "-" if least is None else f"{least:.2f}", max_lag,
                proposer.submitted, proposer.entries_proposed,
                proposer.entries_answered, proposer.entries_failed, slots, raft_view(raft),
            )  # fmt: skip
            max_lag = 0.0
