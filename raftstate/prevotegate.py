"""PreVote wired into pysyncobj (the decisions are in :mod:`raftstate.prevote`).

Theory of operation
-------------------
pysyncobj has no hook before an election; its ``_onTick`` starts one when
``_SyncObj__raftElectionDeadline`` has passed (on a follower or candidate
connected to anyone). :class:`PreVoteGate` wraps pysyncobj's ``_onTick`` on
the tick thread (``RaftNode._onTick`` runs it inside :meth:`PreVoteGate.tick`):

* deadline passed and no majority has granted yet: push the deadline to the
  end of the current round (so pysyncobj does nothing this tick) and send a
  new round's ``rs_prevote`` to every peer;
* a majority granted (or there is a reason to bypass, see the sans-IO
  module): leave the deadline in the past; pysyncobj runs its election in
  the same tick, exactly as it would without PreVote;
* in every other tick pysyncobj sees a deadline of "never" (the real one is
  restored after the tick), so it cannot elect on its own.

``rs_prevote``/``rs_prevote_resp`` arrive through ``RaftNode``'s ``rs_*``
side door (:meth:`on_message`); every ``append_entries`` is reported to
:meth:`on_append_entries` before pysyncobj sees it. All methods: tick thread
only. Only pysyncobj's private (name-mangled) fields are touched, never its
code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from typing import Any

from raftstate.prevote import (
    PREVOTE,
    PREVOTE_RESP,
    LocalState,
    PreVoter,
    Request,
    Response,
)

log = logging.getLogger("raftstate.prevote")

_FOLLOWER, _CANDIDATE, _LEADER = 0, 1, 2
_NEVER = math.inf


class PreVoteGate:
    """Holds pysyncobj's elections back until a pre-vote round succeeds."""

    def __init__(self, raft: Any, voters: int, min_timeout: float) -> None:
        """``raft``: the ``RaftNode`` (a SyncObj); ``voters``: cluster size;
        ``min_timeout``: the minimum election timeout in seconds (the lease)."""
        self._raft = raft
        self._nodes: dict[str, Any] = {str(n.id): n for n in raft.otherNodes}
        self._min_timeout = min_timeout
        self.voter = PreVoter(str(raft.selfNode.id), voters, lease=min_timeout)
        self._rng = random.Random()

    def set_min_timeout(self, seconds: float) -> None:
        """The minimum election timeout changed (raftstate/linktiming.py):
        it is the lease and sets the pre-vote retry interval."""
        self._min_timeout = seconds
        self.voter.lease = seconds

    def _local(self) -> LocalState:
        r = self._raft
        return LocalState(
            term=int(r._SyncObj__raftCurrentTerm),
            last_log_index=int(r._SyncObj__getCurrentLogIndex()),
            last_log_term=int(r._SyncObj__getCurrentLogTerm()),
            is_leader=r._SyncObj__raftState == _LEADER,
        )

    @contextlib.contextmanager
    def tick(self) -> Iterator[None]:
        """Wrap one pysyncobj ``_onTick``. Unless this tick may start an
        election (:meth:`_gate` says so), pysyncobj sees a deadline of
        "never" for the whole tick and the real one is put back afterwards,
        unless pysyncobj itself set a new one meanwhile (a leader's message,
        a vote, ``timeout_now``). Comparing the deadline here with one clock
        reading and letting pysyncobj compare it again later would leave a
        window (its once-a-second journal write lies between) in which it
        elects without a pre-vote."""
        if self._gate():
            yield
            return
        r = self._raft
        real = r._SyncObj__raftElectionDeadline
        r._SyncObj__raftElectionDeadline = _NEVER
        try:
            yield
        finally:
            if r._SyncObj__raftElectionDeadline == _NEVER:
                r._SyncObj__raftElectionDeadline = real

    def _gate(self) -> bool:
        """True iff pysyncobj may start an election in this tick."""
        r = self._raft
        if r._SyncObj__raftState not in (_FOLLOWER, _CANDIDATE) or r._SyncObj__selfNode is None:
            return False
        now = time.monotonic()
        if r._SyncObj__raftElectionDeadline >= now or not r._SyncObj__connectedToAnyone():
            return False
        if not getattr(r._SyncObj__transport, "ready", True):
            return False
        local = self._local()
        # A round may wait up to half the minimum election timeout: pre-votes
        # consume no votes, so retrying sooner than elections do is harmless.
        retry = self._min_timeout * self._rng.uniform(0.25, 0.5)
        decision = self.voter.on_deadline(
            local, now, retry, transfer=bool(r._SyncObj__transferInProgress)
        )
        if decision.elect:
            log.info("pre-vote: election for term %d (%s)", local.term + 1, decision.reason)
            return True
        r._SyncObj__raftElectionDeadline = decision.hold_until
        if decision.request is not None:
            msg = decision.request.to_message()
            for node in self._nodes.values():
                r.send_raw(node, msg)
        return False

    def on_append_entries(self, term: int) -> None:
        """An ``append_entries`` at ``term`` is about to reach pysyncobj."""
        now = time.monotonic()
        if term >= int(self._raft._SyncObj__raftCurrentTerm):
            self.voter.on_leader_contact(now)
        else:
            self.voter.on_stale_leader(now)

    def on_message(self, node: Any, msg: dict[str, Any]) -> None:
        """An ``rs_prevote`` or ``rs_prevote_resp`` from ``node``. Malformed
        messages are dropped (the sender retries)."""
        kind = msg.get("type")
        try:
            if kind == PREVOTE:
                request = Request(
                    int(msg["term"]), int(msg["last_log_index"]), int(msg["last_log_term"])
                )
                now = time.monotonic()
                response = self.voter.on_request(request, self._local(), now, str(node.id))
                if response.granted:
                    heard = self.voter.last_leader_contact
                    log.info(
                        "pre-vote: granted to %s for term %d (leader last heard %s)",
                        node.id,
                        request.term,
                        "never" if heard is None else f"{(now - heard) * 1000:.0f} ms ago",
                    )
                self._raft.send_raw(node, response.to_message())
            elif kind == PREVOTE_RESP:
                response = Response(int(msg["term"]), bool(msg["granted"]))
                self._on_response(str(node.id), response)
        except (KeyError, TypeError, ValueError):
            log.debug("pre-vote: malformed %s from %s dropped", kind, getattr(node, "id", node))

    def _on_response(self, sender: str, response: Response) -> None:
        r = self._raft
        if r._SyncObj__raftState == _LEADER:
            return
        reaction = self.voter.on_response(sender, response, self._local())
        if reaction.adopt_term is not None:
            log.info("pre-vote: refused at term %d; following that term", reaction.adopt_term)
            r._SyncObj__setCurrentTerm(reaction.adopt_term, None)
            r._SyncObj__setState(_FOLLOWER)
            r._SyncObj__raftLeader = None
        elif reaction.release:
            r._SyncObj__raftElectionDeadline = 0.0  # elect on the next tick
