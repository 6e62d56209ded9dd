"""Leader-side bookkeeping of pysyncobj's nextIndex (sans-IO): which
``next_node_idx`` resets to apply (:class:`ResetGuard`), and how many log
entries were sent more than once (:class:`SendLedger`).

Why: pysyncobj 0.3.17's leader applies every ``reset`` reply as-is
(``nextIndex[node] = reply.next_node_idx``). A follower whose log diverged
(an old leader's uncommitted entries) must be walked back one entry per round
trip, but the leader keeps sending AppendEntries after every new command and
apply, each starting past the follower's log; their rejections all answer
"my last index + 1" and move nextIndex back up before the step-back can land.
Under steady load the walk-back never finishes and the follower stays behind
in the same term (measured: stuck for the rest of a run in 3 of 22 heal
rounds; a simulation of unmodified pysyncobj stuck in 6 of 8 seeds).

The filter keeps, per peer and term, the lowest reset it honoured. A reset
(raised to at least matchIndex + 1) is honoured when there is none yet, when
it is at or below that one (the walk-back progressing), or when that one is
older than ``resend_after_s`` (a lost reply must not wedge the peer). Other
resets are ignored: the leader only notes that the peer answered. Progress
(matchIndex raised by a success) forgets the stored value. Safety is
untouched: nextIndex only chooses what the leader sends; the follower's log
check still decides.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Honoured:
    term: int
    index: int
    at: float


class ResetGuard:
    """Decides which ``next_node_idx`` resets a leader applies. Not thread-safe
    (pysyncobj's tick thread)."""

    def __init__(self, resend_after_s: float = 1.0) -> None:
        if resend_after_s <= 0:
            raise ValueError("resend_after_s must be positive")
        self._resend_after = resend_after_s
        self._honoured: dict[str, _Honoured] = {}

    def on_reset(self, peer: str, term: int, match_index: int, hint: int, now: float) -> int | None:
        """A reset reply from ``peer`` suggesting next index ``hint``. Returns
        the next index to apply, or ``None`` to ignore the reset."""
        index = max(match_index + 1, hint)
        prev = self._honoured.get(peer)
        if (
            prev is None
            or prev.term != term
            or index <= prev.index
            or now - prev.at >= self._resend_after
        ):
            self._honoured[peer] = _Honoured(term, index, now)
            return index
        return None

    def on_progress(self, peer: str) -> None:
        """``peer`` acknowledged new entries: its walk-back is over."""
        self._honoured.pop(peer, None)


@dataclass(slots=True)
class _Sent:
    term: int
    high: int  # highest index sent this term
    sent: int
    resent: int


class SendLedger:
    """Per peer, in the leader's current term: log entries sent in
    AppendEntries, and how many of them had been sent before (a resend after a
    rejection, or waste). On a clean link with in-order delivery the resent
    count stays at zero; it is what showed pysyncobj's nextIndex rewinds.
    Written on the tick thread; :meth:`counts` may be read from any thread."""

    def __init__(self) -> None:
        self._peers: dict[str, _Sent] = {}

    def on_append(self, peer: str, term: int, first: int, last: int) -> None:
        """An AppendEntries to ``peer`` in ``term`` carrying ``first..last``."""
        if last < first:
            return
        cur = self._peers.get(peer)
        if cur is None or cur.term != term:
            cur = _Sent(term, 0, 0, 0)
        again = max(0, min(last, cur.high) - first + 1)
        self._peers[peer] = _Sent(
            term, max(cur.high, last), cur.sent + last - first + 1, cur.resent + again
        )

    def counts(self, term: int) -> dict[str, tuple[int, int]]:
        """``peer -> (sent, resent)`` for ``term`` (peers of other terms omitted)."""
        return {p: (s.sent, s.resent) for p, s in list(self._peers.items()) if s.term == term}


__all__ = ["ResetGuard", "SendLedger"]
