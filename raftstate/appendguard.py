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
  follower's last entry and nothing is deleted. Further entries of older
  terms may conflict with the leader's log; then only they are dropped, as
  Raft allows for entries past a matching prefix that the leader has not
  confirmed.

The rewritten message makes pysyncobj reply with the right next index in
every case. Messages it would reject (no entry at ``prevLogIdx``, or a term
mismatch) and snapshot transmissions pass unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Entry = Sequence[Any]  # (command, index, term)


def trim(message: dict[str, Any], ours: Sequence[Entry]) -> dict[str, Any]:
    """``message``: a pysyncobj ``append_entries`` dict; ``ours``: the
    follower's entries from ``message['prevLogIdx']`` to its end (what
    pysyncobj's ``__getEntries(prevLogIdx)`` returns). Returns the message
    to hand to pysyncobj (``message`` itself when nothing changes)."""
    if "prevLogIdx" not in message or "transmission" in message:
        return message
    if not ours or ours[0][2] != message["prevLogTerm"]:
        return message  # pysyncobj rejects it without touching the log
    extra = list(ours[1:])
    new = list(message.get("entries") or [])
    if not extra:
        return message  # nothing of ours after prevLogIdx: nothing to delete
    i = 0
    while i < len(new) and i < len(extra) and new[i][2] == extra[i][2]:
        i += 1
    prev_idx = int(message["prevLogIdx"])
    if i < len(new):
        # new[i] conflicts with extra[i], or extends past our end: start there.
        if i == 0:
            return message
        return {
            **message,
            "prevLogIdx": prev_idx + i,
            "prevLogTerm": extra[i - 1][2],
            "entries": new[i:],
        }
    rest = extra[len(new) :]
    if all(e[2] == message["term"] for e in rest):
        last = extra[-1]
        return {**message, "prevLogIdx": last[1], "prevLogTerm": last[2], "entries": []}
    # Entries past the message's range from older terms: drop only those.
    last_idx = prev_idx + len(new)
    last_term = new[-1][2] if new else message["prevLogTerm"]
    return {**message, "prevLogIdx": last_idx, "prevLogTerm": last_term, "entries": []}


__all__ = ["trim"]
