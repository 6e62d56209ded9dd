"""PreVote (Raft thesis §9.6): a node that lost its leader asks first.

Theory of operation
-------------------
pysyncobj starts an election as soon as a follower's election deadline
passes: term + 1, then ``request_vote``. A follower that was cut off and
comes back therefore arrives with a higher term, every node that hears its
``request_vote`` (the healthy leader included) adopts that term, and the
leader steps down. PreVote removes that disruption, and this module holds
its decisions; :mod:`raftstate.prevotegate` feeds it from pysyncobj.

1. When the election deadline passes, :meth:`PreVoter.on_deadline` does not
   let the election start. It opens a **round**: an :class:`Request` for
   ``term + 1`` (the term the election *would* use) with this node's last log
   position, to be sent to every peer (``rs_prevote``). Nothing local changes:
   no term, no vote. The election deadline is held back until the round
   expires (``retry_after``), when a fresh round starts.
2. A peer answers with :func:`decide` (``rs_prevote_resp``). It grants iff
   the request's term is above its own, the candidate's log is at least as
   up to date as its own, it is not the leader, and it has not heard from a
   leader within the minimum election timeout (the **lease**: as long as a
   healthy leader reaches a majority, that majority refuses, so a rejoining
   node cannot win a pre-vote). Granting changes nothing on the peer.
3. A grant echoes the request's term (it identifies the round); a refusal
   carries the responder's term. Once a majority, this node included, has
   granted the current round, :meth:`PreVoter.on_response` says ``release``
   and the next :meth:`PreVoter.on_deadline` answers ``elect``: pysyncobj runs
   its ordinary election. A single-node cluster is its own majority, so it
   elects at once.
4. A refusal whose term is above ours (etcd: a response with a higher term
   makes the node a follower at that term) is adopted: the caller sets that
   term with no vote. The node was behind; the next round proposes a term
   the others can grant, and a leader of that term is now followed.
5. Two pre-candidates at once (both followers' timers fired within one
   round trip of each other: likely with the short timeouts of a fast link,
   raftstate/linktiming.py) would grant each other, both elect in the same
   term, split the vote and wait a whole timeout more. A node with a round of
   its own for the requested term therefore grants only a candidate that
   ranks above it (:func:`ranks_above`: a more up-to-date log, or the same
   log and a lower node id); ranks are total, so exactly one of the two
   wins, and the other's round fails and is overtaken by the winner's
   ``request_vote``. Only a node's *first* round at a term refuses this way:
   a higher-ranked node that cannot reach a majority (a cut link) renews its
   round forever, and blocking in every round would leave no node able to
   win (5 voters, 2 down, the n1-n3 link cut: only n2 can win, and only
   with n1's grant).
6. Hearing from a leader of our term or a later one (``append_entries``)
   cancels the round. Hearing from a leader of a **lower** term means this
   node's term is stale-high (a failed election, or a peer without PreVote):
   that leader's messages are ignored by pysyncobj, and the lease makes every
   pre-vote fail, so the node could never rejoin. etcd answers such a leader
   with its higher term so that it steps down; here the equivalent is to
   skip the pre-vote once and let pysyncobj's ``request_vote`` carry the
   term. The same bypass applies to a leadership transfer (``timeout_now``),
   whose target must win although every peer still has a leader.

Everything here is synchronous and clock-free: ``now`` (monotonic seconds)
and the random round length are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Message types carried through raftstate's ``rs_*`` side door.
PREVOTE = "rs_prevote"
PREVOTE_RESP = "rs_prevote_resp"
MESSAGE_TYPES = frozenset({PREVOTE, PREVOTE_RESP})


@dataclass(frozen=True, slots=True)
class LocalState:
    """This node's Raft state, read on the tick thread."""

    term: int
    last_log_index: int
    last_log_term: int
    is_leader: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """``rs_prevote``: ``term`` is the term the sender's election would use."""

    term: int
    last_log_index: int
    last_log_term: int

    def to_message(self) -> dict[str, object]:
        return {
            "type": PREVOTE,
            "term": self.term,
            "last_log_index": self.last_log_index,
            "last_log_term": self.last_log_term,
        }


@dataclass(frozen=True, slots=True)
class Response:
    """``rs_prevote_resp``: a grant echoes the request's term; a refusal
    carries the responder's current term."""

    term: int
    granted: bool

    def to_message(self) -> dict[str, object]:
        return {"type": PREVOTE_RESP, "term": self.term, "granted": self.granted}


@dataclass(frozen=True, slots=True)
class Decision:
    """What the election gate does when pysyncobj's deadline has passed.
    ``elect``: let pysyncobj start the election now. Otherwise push the
    deadline to ``hold_until`` and send ``request`` (if any) to every peer."""

    elect: bool
    hold_until: float = 0.0
    request: Request | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reaction:
    """What the gate does with a response. ``release``: a majority granted,
    let the election start (set the deadline to the past). ``adopt_term``:
    become a follower at this higher term, with no vote."""

    release: bool = False
    adopt_term: int | None = None


def log_up_to_date(
    cand_last_term: int, cand_last_index: int, our_last_term: int, our_last_index: int
) -> bool:
    """Raft §5.4.1: the candidate's log is at least as up to date as ours."""
    return (cand_last_term, cand_last_index) >= (our_last_term, our_last_index)


def in_lease(last_leader_contact: float | None, now: float, lease: float) -> bool:
    """True if a leader was heard from less than ``lease`` seconds ago."""
    return last_leader_contact is not None and now - last_leader_contact < lease


def ranks_above(request: Request, candidate_id: str, local: LocalState, self_id: str) -> bool:
    """Between two simultaneous pre-candidates: the candidate's log is more
    up to date than ours, or equal and its id sorts first."""
    theirs = (request.last_log_term, request.last_log_index)
    ours = (local.last_log_term, local.last_log_index)
    return theirs > ours or (theirs == ours and candidate_id < self_id)


def decide(
    request: Request, local: LocalState, last_leader_contact: float | None, now: float, lease: float
) -> Response:
    """A peer's answer to ``request``. Pure: the answering node's term and vote
    do not change whatever the answer."""
    granted = (
        request.term > local.term
        and not local.is_leader
        and not in_lease(last_leader_contact, now, lease)
        and log_up_to_date(
            request.last_log_term, request.last_log_index, local.last_log_term, local.last_log_index
        )
    )
    return Response(term=request.term if granted else local.term, granted=granted)


def majority(voters: int) -> int:
    """Votes needed among ``voters`` (this node included)."""
    return voters // 2 + 1


@dataclass(frozen=True, slots=True)
class Round:
    """One pre-vote round in flight."""

    term: int
    expires: float
    granted_by: frozenset[str]
    #: The first round at ``term``: only it refuses lower-ranked
    #: pre-candidates (a node whose round failed may be unable to win at
    #: all, and blocking others then could keep every node from winning).
    blocks: bool = True


class PreVoter:
    """The candidate side plus the leader-contact record both sides use.
    Owned by one thread (pysyncobj's tick thread)."""

    def __init__(self, self_id: str, voters: int, lease: float) -> None:
        """``voters``: cluster size including this node; ``lease``: the
        minimum election timeout in seconds."""
        if voters < 1:
            raise ValueError("voters: a cluster has at least one voter")
        self.self_id = self_id
        self.voters = voters
        self.lease = lease
        self.round: Round | None = None
        self.last_leader_contact: float | None = None
        self.last_stale_leader: float | None = None
        self.rounds_started = 0
        self.elections_released = 0

    # ---- what this node hears ------------------------------------------------

    def on_leader_contact(self, now: float) -> None:
        """An ``append_entries`` from a leader at our term or later: renew the
        lease and drop any round (there is a leader; no election needed)."""
        self.last_leader_contact = now
        self.round = None

    def on_stale_leader(self, now: float) -> None:
        """An ``append_entries`` from a leader at a term below ours."""
        self.last_stale_leader = now

    def on_request(
        self, request: Request, local: LocalState, now: float, sender: str | None = None
    ) -> Response:
        """A peer's (``sender``'s) ``rs_prevote``; see :func:`decide`. While
        this node runs a round for the same term, only a ``sender`` that
        :func:`ranks_above` it is granted (step 5 of the module doc)."""
        rnd = self.round
        if (
            sender is not None
            and rnd is not None
            and rnd.term == request.term
            and rnd.blocks
            and not ranks_above(request, sender, local, self.self_id)
        ):
            return Response(term=local.term, granted=False)
        return decide(request, local, self.last_leader_contact, now, self.lease)

    # ---- candidate side -------------------------------------------------------

    def on_deadline(
        self, local: LocalState, now: float, retry_after: float, transfer: bool = False
    ) -> Decision:
        """pysyncobj's election deadline has passed on a follower/candidate.
        ``retry_after``: how long a new round may wait for grants (randomised
        by the caller). ``transfer``: a leadership transfer asked for this
        election."""
        if transfer:
            self.round = None
            return self._elect("leadership transfer")
        if in_lease(self.last_stale_leader, now, self.lease):
            self.round = None
            self.last_stale_leader = None
            return self._elect("a leader of a lower term is alive; our term must reach it")
        rnd = self.round
        if rnd is not None and rnd.term == local.term + 1:
            if len(rnd.granted_by) + 1 >= majority(self.voters):
                self.round = None
                return self._elect("pre-vote granted by a majority")
            if now < rnd.expires:
                return Decision(elect=False, hold_until=rnd.expires)
        request = Request(local.term + 1, local.last_log_index, local.last_log_term)
        self.rounds_started += 1
        if majority(self.voters) <= 1:
            self.round = None
            return self._elect("single voter")
        first = rnd is None or rnd.term != request.term
        self.round = Round(request.term, now + retry_after, frozenset(), blocks=first)
        return Decision(elect=False, hold_until=now + retry_after, request=request)

    def on_response(self, sender: str, response: Response, local: LocalState) -> Reaction:
        """A peer's ``rs_prevote_resp``. Grants count once per sender and only
        for the current round."""
        rnd = self.round
        if rnd is None:
            return Reaction()
        if not response.granted:
            if response.term > local.term:
                self.round = None
                return Reaction(adopt_term=response.term)
            return Reaction()
        if response.term != rnd.term or rnd.term != local.term + 1 or sender == self.self_id:
            return Reaction()
        granted = rnd.granted_by | {sender}
        self.round = Round(rnd.term, rnd.expires, granted, rnd.blocks)
        return Reaction(release=len(granted) + 1 >= majority(self.voters))

    def _elect(self, reason: str) -> Decision:
        self.elections_released += 1
        return Decision(elect=True, reason=reason)
