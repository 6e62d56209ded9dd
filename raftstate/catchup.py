"""Catch-up gate: a node that lost data does not vote until it has caught up.

Theory of operation (Raft §5.4 election restriction). A voter's log is what
stops a candidate that misses committed entries from winning: every
committed entry is on a majority, and a voter refuses a candidate whose log
is less up to date than its own. A node whose journal or snapshot was
corrupt lost entries it may have acknowledged; if it voted (or stood for
election) with its shortened log, a candidate missing committed entries
could win, and those entries would be overwritten. So such a node:

1. persists a ``catch_up`` flag (``raftstate/journal.py`` meta file) when it
   detects the damage;
2. drops RequestVote / PreVote requests and does not start elections while
   the flag is set;
3. takes the ``commit_index`` of the first AppendEntries it accepts from a
   leader as its target (Leader Completeness: that leader holds every entry
   committed before it was elected, and its commit index covers them), or
   the commit index it had stored itself if that is higher;
4. clears the flag once it has applied up to that target.

Residual risk: an entry this node acknowledged just before the loss that
the leader had not yet counted as committed when it sent the target; the
leader counts acks within a tick, far less than a node restart takes.

The cost is availability: if the only other holders of the lost entries are
down, the cluster waits for them instead of electing a leader without them.
"""

from __future__ import annotations


class CatchUpGate:
    """Sans-IO state for one node's catch-up. Tick thread only (reads of
    :attr:`active` from other threads see a recent value)."""

    def __init__(self, active: bool, known_committed: int = 0) -> None:
        """``known_committed``: an index this node knows was committed (its
        stored commit index); the target is never below it."""
        self.active = active
        self.known_committed = known_committed
        #: The index this node must apply before voting again.
        self.target: int | None = None

    def may_vote(self) -> bool:
        """Whether this node may grant votes or stand for election."""
        return not self.active

    def on_leader_commit(self, commit_index: int) -> None:
        """An AppendEntries from a current leader said ``commit_index``."""
        if self.active and self.target is None:
            self.target = max(commit_index, self.known_committed)

    def on_applied(self, last_applied: int) -> bool:
        """Record progress; return ``True`` exactly when catch-up completes."""
        if self.active and self.target is not None and last_applied >= self.target:
            self.active = False
            return True
        return False


__all__ = ["CatchUpGate"]
