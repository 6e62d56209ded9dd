"""Follower-side trim of pysyncobj AppendEntries so matching entries are never truncated (sans-IO).

Why: pysyncobj 0.3.17's follower, on an AppendEntries whose ``prevLogIdx``
matches, deletes *every* entry after ``prevLogIdx`` and then appends the
message's entries. Raft (§5.3) deletes only from the first entry that
conflicts. When the leader resends a range the follower already holds (after
a ``next_node_idx`` reset, or a heartbeat that starts below the follower's
end), entries the follower has acknowledged are deleted and, if the message
carries fewer of them, not re-added: an acknowledged entry can vanish from a
majority. Seen in the WAN lab as pysyncobj's CRITICAL "truncating
already-applied log entries" line, hundreds of times per run.

:func:`trim` rewrites such a message before pysyncobj sees it, using the
follower's own entries from ``prevLogIdx`` on (``(command, index, term)``
tuples, as pysyncobj stores them):

* entries the follower already has with the same term are dropped from the
  message, and ``prevLogIdx``/``prevLogTerm`` move past them;
* at the first conflict the message starts there, so pysyncobj truncates
  exactly from the conflict (correct Raft);
* if every entry is already there and the follower's further entries all
  carry the message's term, they are this leader's entries (a leader never
  rewrites its own index/term pairs), so ``prevLogIdx`` moves to the
  follower's last entry and nothing is deleted;
* if some further entries are of older terms, they are still not deleted
  (Raft deletes only on a conflict, and those entries may be committed and
  applied: deleting them is what pysyncobj logs as "truncating
  already-applied log entries"), but nor are they claimed: ``prevLogIdx``
  moves to the follower's last entry so pysyncobj deletes nothing, the
  message's ``commit_index`` is capped at the last index it confirmed, and
  the caller must cap the follower's reply (``next_node_idx``) at that index
  + 1. A later AppendEntries that conflicts with them truncates from the
  conflict (the rule above).

Messages pysyncobj would reject (no entry at ``prevLogIdx``, or a term
mismatch) and snapshot transmissions pass unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Entry = Sequence[Any]  # (command, index, term)


def trim(message: dict[str, Any], ours: Sequence[Entry]) -> tuple[dict[str, Any], int | None]:
    """``message``: a pysyncobj ``append_entries`` dict; ``ours``: the
    follower's entries from ``message['prevLogIdx']`` to its end (what
    pysyncobj's ``__getEntries(prevLogIdx)`` returns). Returns the message
    to hand to pysyncobj (``message`` itself when nothing changes) and the
    highest index the follower's reply may claim (``None``: no cap)."""
    if "prevLogIdx" not in message or "transmission" in message:
        return message, None
    if not ours or ours[0][2] != message["prevLogTerm"]:
        return message, None  # pysyncobj rejects it without touching the log
    extra = list(ours[1:])
    new = list(message.get("entries") or [])
    if not extra:
        return message, None  # nothing of ours after prevLogIdx: nothing to delete
    i = 0
    while i < len(new) and i < len(extra) and new[i][2] == extra[i][2]:
        i += 1
    prev_idx = int(message["prevLogIdx"])
    if i < len(new):
        # new[i] conflicts with extra[i], or extends past our end: start there.
        if i == 0:
            return message, None
        return {
            **message,
            "prevLogIdx": prev_idx + i,
            "prevLogTerm": extra[i - 1][2],
            "entries": new[i:],
        }, None
    last = extra[-1]
    keep_all = {**message, "prevLogIdx": last[1], "prevLogTerm": last[2], "entries": []}
    rest = extra[len(new) :]
    if all(e[2] == message["term"] for e in rest):
        return keep_all, None
    # Entries past the message's range from older terms: keep, do not claim.
    confirmed = prev_idx + len(new)
    commit = min(int(message.get("commit_index", 0)), confirmed)
    return {**keep_all, "commit_index": commit}, confirmed


__all__ = ["trim"]
