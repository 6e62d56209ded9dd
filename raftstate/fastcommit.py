"""Follower-side commit in three-node clusters (sans-IO).

Why: a heartbeat sent to a follower is forwarded to the leader, replicated,
and acknowledged once the follower *learns* it is committed. With pysyncobj
that takes the commit index in the leader's next AppendEntries: forward (one
way), AppendEntries (one way), ack (one way), next AppendEntries (one way),
two round trips between the follower and the leader. On a weak WAN that is
the difference between ~60 and ~120 ms at the median for two thirds of a
fleet.

The rule: in a cluster of **three** voters, a majority is two. A follower that
appends an entry of the leader's current term ``T``, sent by that leader, knows
two voters hold it: itself, and the leader, which appended it to its own log
(durably, under the same durability policy) before sending it and never
removes its own entries while it leads. That is the definition of committed
(Raft §5.3-5.4: an entry of the current term is committed once the leader
that created it has stored it on a majority); the Leader Completeness proof
uses only that a majority stored it in term ``T`` before voting in any later
term, which holds for both. Entries before it are committed with it (log
matching). So the follower may raise its commit index to the last entry of
term ``T`` it holds after accepting the message, without waiting for the
leader to count acks.

What it changes for reads: the leader may now be the *last* to learn of a
commit, so a linearizable read cannot use the leader's commit index as its
read index (a heartbeat acknowledged by a follower could be missing). With
follower commit on, the leader's ReadIndex uses its last log index instead:
every entry anyone may have acknowledged is in the leader's log. The read
then waits for that index to be applied (about one replication round trip,
which the ReadIndex quorum round costs anyway).

Not for five voters (a majority is three; the follower knows only two).
"""

from __future__ import annotations

from typing import Any


def enabled(voters: int) -> bool:
    """Follower commit is sound only where the leader and one follower form a majority."""
    return voters == 3


def raise_commit(message: dict[str, Any]) -> dict[str, Any]:
    """``message``: a pysyncobj ``append_entries`` dict the follower is about
    to process (after :func:`raftstate.appendguard.trim`). Returns it with
    ``commit_index`` raised to the index of the last entry the follower will
    hold from it when that entry is of the message's term; unchanged
    otherwise. pysyncobj applies the commit index only if it accepts the
    message (the ``prevLogIdx``/``prevLogTerm`` check), and never past its
    last log entry."""
    if "prevLogIdx" not in message or "transmission" in message:
        return message
    term = message.get("term")
    entries = message.get("entries") or []
    if entries:
        index, entry_term = int(entries[-1][1]), entries[-1][2]
    else:
        index, entry_term = int(message["prevLogIdx"]), message.get("prevLogTerm")
    if entry_term != term or index <= int(message.get("commit_index", 0)):
        return message
    return {**message, "commit_index": index}


def read_floor(follower_commit: bool, commit_index: int, last_log_index: int) -> int:
    """The lowest index a leader's linearizable read must wait for: its commit
    index, or with follower commit its last log index (a follower may have
    acknowledged any entry the leader holds before the leader counted it)."""
    return last_log_index if follower_commit else commit_index


__all__ = ["enabled", "raise_commit", "read_floor"]
