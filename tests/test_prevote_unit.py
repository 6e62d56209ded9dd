"""PreVote's decisions (raftstate/prevote.py), in milliseconds, without a cluster."""

from __future__ import annotations

import pytest

from raftstate.prevote import (
    PREVOTE,
    PREVOTE_RESP,
    LocalState,
    PreVoter,
    Request,
    Response,
    decide,
    log_up_to_date,
    majority,
)

LEASE = 0.4


def local(term: int = 5, index: int = 10, log_term: int = 5, leader: bool = False) -> LocalState:
    return LocalState(term=term, last_log_index=index, last_log_term=log_term, is_leader=leader)


# ---- the responder ----------------------------------------------------------


def test_grants_a_later_term_with_an_equal_log_and_no_leader() -> None:
    resp = decide(Request(6, 10, 5), local(), None, now=100.0, lease=LEASE)
    assert resp == Response(term=6, granted=True)


def test_refuses_while_a_leader_was_heard_within_the_lease() -> None:
    assert not decide(Request(6, 10, 5), local(), 99.7, now=100.0, lease=LEASE).granted
    # Just past the lease the same request is granted.
    assert decide(Request(6, 10, 5), local(), 99.6, now=100.0, lease=LEASE).granted


def test_the_leader_itself_refuses() -> None:
    resp = decide(Request(6, 10, 5), local(leader=True), None, now=100.0, lease=LEASE)
    assert resp == Response(term=5, granted=False)


@pytest.mark.parametrize(
    ("cand_term", "cand_index", "granted"),
    [(5, 9, False), (4, 50, False), (5, 10, True), (5, 11, True), (6, 1, True)],
)
def test_grants_only_a_log_at_least_as_up_to_date(
    cand_term: int, cand_index: int, granted: bool
) -> None:
    resp = decide(Request(6, cand_index, cand_term), local(), None, now=100.0, lease=LEASE)
    assert resp.granted is granted
    assert log_up_to_date(cand_term, cand_index, 5, 10) is granted


@pytest.mark.parametrize("term", [4, 5])
def test_refuses_a_term_not_above_its_own_and_tells_its_term(term: int) -> None:
    resp = decide(Request(term, 99, 5), local(term=5), None, now=100.0, lease=LEASE)
    assert resp == Response(term=5, granted=False)


def test_answering_changes_nothing_on_the_responder() -> None:
    voter = PreVoter("b", 3, LEASE)
    voter.on_leader_contact(1.0)
    before = (voter.round, voter.last_leader_contact, voter.last_stale_leader)
    for req in (Request(9, 99, 9), Request(2, 0, 0)):
        voter.on_request(req, local(), now=100.0)
    assert (voter.round, voter.last_leader_contact, voter.last_stale_leader) == before


def test_messages_match_the_shared_schema() -> None:
    assert Request(6, 10, 5).to_message() == {
        "type": PREVOTE, "term": 6, "last_log_index": 10, "last_log_term": 5,
    }
    assert Response(6, True).to_message() == {"type": PREVOTE_RESP, "term": 6, "granted": True}


# ---- the candidate ------------------------------------------------------------


def test_an_expired_deadline_starts_a_round_for_term_plus_one_without_electing() -> None:
    voter = PreVoter("a", 3, LEASE)
    d = voter.on_deadline(local(term=5), now=10.0, retry_after=0.15)
    assert not d.elect
    assert d.request == Request(6, 10, 5)
    assert d.hold_until == pytest.approx(10.15)
    # Still within the round: hold, nothing new to send.
    again = voter.on_deadline(local(term=5), now=10.1, retry_after=0.15)
    assert (again.elect, again.request, again.hold_until) == (False, None, pytest.approx(10.15))


def test_one_grant_is_a_majority_of_three_and_releases_the_election() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_deadline(local(), now=10.0, retry_after=0.15)
    assert voter.on_response("b", Response(6, True), local()).release
    assert voter.on_deadline(local(), now=10.01, retry_after=0.15).elect
    assert voter.round is None


def test_five_voters_need_two_distinct_grants() -> None:
    voter = PreVoter("a", 5, LEASE)
    voter.on_deadline(local(), now=10.0, retry_after=0.15)
    assert not voter.on_response("b", Response(6, True), local()).release
    assert not voter.on_response("b", Response(6, True), local()).release  # a duplicate
    assert not voter.on_response("a", Response(6, True), local()).release  # never itself
    assert not voter.on_deadline(local(), now=10.01, retry_after=0.15).elect
    assert voter.on_response("c", Response(6, True), local()).release
    assert voter.on_deadline(local(), now=10.02, retry_after=0.15).elect


def test_majority_counts_the_node_itself() -> None:
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_a_single_voter_elects_at_once() -> None:
    d = PreVoter("a", 1, LEASE).on_deadline(local(), now=10.0, retry_after=0.15)
    assert d.elect and d.request is None


def test_refusals_never_release_and_the_round_is_retried_after_it_expires() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_deadline(local(), now=10.0, retry_after=0.15)
    assert voter.on_response("b", Response(5, False), local()) == voter.on_response(
        "c", Response(4, False), local()
    )
    assert not voter.on_deadline(local(), now=10.1, retry_after=0.15).elect
    retry = voter.on_deadline(local(), now=10.2, retry_after=0.15)
    assert not retry.elect and retry.request == Request(6, 10, 5)
    assert voter.rounds_started == 2


def test_grants_for_an_older_round_or_term_do_not_count() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_deadline(local(term=5), now=10.0, retry_after=0.15)
    assert not voter.on_response("b", Response(5, True), local(term=5)).release
    # Our term moved on (pysyncobj adopted 6 from a leader): the round is stale.
    assert not voter.on_response("b", Response(6, True), local(term=6)).release
    d = voter.on_deadline(local(term=6), now=10.05, retry_after=0.15)
    assert not d.elect and d.request is not None and d.request.term == 7


def test_a_refusal_with_a_higher_term_is_adopted() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_deadline(local(term=5), now=10.0, retry_after=0.15)
    assert voter.on_response("b", Response(8, False), local(term=5)).adopt_term == 8
    assert voter.round is None


def test_hearing_from_a_leader_cancels_the_round() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_deadline(local(), now=10.0, retry_after=0.15)
    voter.on_leader_contact(10.05)
    assert not voter.on_response("b", Response(6, True), local()).release
    assert voter.round is None


def test_a_live_leader_of_a_lower_term_bypasses_the_pre_vote_once() -> None:
    voter = PreVoter("a", 3, LEASE)
    voter.on_stale_leader(10.0)
    assert voter.on_deadline(local(), now=10.2, retry_after=0.15).elect
    assert not voter.on_deadline(local(), now=10.3, retry_after=0.15).elect


def test_a_leadership_transfer_bypasses_the_pre_vote() -> None:
    voter = PreVoter("a", 3, LEASE)
    assert voter.on_deadline(local(), now=10.0, retry_after=0.15, transfer=True).elect


# ---- two pre-candidates at once -------------------------------------------------


@pytest.mark.parametrize(
    ("a_log", "b_log"),
    [((10, 5), (10, 5)), ((11, 5), (10, 5)), ((10, 5), (12, 5)), ((30, 4), (10, 5))],
)
def test_two_simultaneous_pre_candidates_grant_exactly_one_of_them(
    a_log: tuple[int, int], b_log: tuple[int, int]
) -> None:
    """Both followers' timers fire together after the leader died: each
    opens a round for term 6 and asks the other. Granting both would let
    both elect in term 6 and split the vote."""
    voters = {"n1": PreVoter("n1", 3, LEASE), "n2": PreVoter("n2", 3, LEASE)}
    logs = {"n1": a_log, "n2": b_log}
    states = {n: local(index=logs[n][0], log_term=logs[n][1]) for n in voters}
    requests = {}
    for n, voter in voters.items():
        decision = voter.on_deadline(states[n], now=100.0, retry_after=0.1)
        assert decision.request is not None
        requests[n] = decision.request
    a_grants_b = voters["n1"].on_request(requests["n2"], states["n1"], 100.0, "n2").granted
    b_grants_a = voters["n2"].on_request(requests["n1"], states["n2"], 100.0, "n1").granted
    assert a_grants_b != b_grants_a
    winner = "n2" if a_grants_b else "n1"
    def up_to_date(n: str) -> tuple[int, int]:
        return logs[n][1], logs[n][0]  # (last log term, last log index)

    assert up_to_date(winner) == max(map(up_to_date, logs))  # never the shorter log
    if logs["n1"] == logs["n2"]:
        assert winner == "n1"  # equal logs: the lower id


def test_a_pre_candidate_still_grants_a_round_for_another_term() -> None:
    voter = PreVoter("n2", 3, LEASE)
    voter.on_deadline(local(), now=100.0, retry_after=0.1)  # round for term 6
    assert voter.on_request(Request(7, 10, 5), local(), 100.0, "n3").granted


def test_a_pre_candidate_whose_round_failed_no_longer_blocks_a_lower_ranked_one() -> None:
    """5 voters, two of them down, the n1-n3 link cut: n2 reaches n1 and n3
    and is the only node that can win (it needs both grants). n1 ranks above
    n2 (equal logs, lower id) but can never gather a majority itself; its
    rounds renew one after another, so if every round blocked n2, no leader
    would ever be elected. Only the first round at a term may block."""
    n1 = PreVoter("n1", 5, LEASE)
    first = n1.on_deadline(local(), now=100.0, retry_after=0.1)
    assert first.request is not None
    # While n1's first round is out, it refuses the lower-ranked n2 (tie-break).
    assert not n1.on_request(Request(6, 10, 5), local(), 100.05, "n2").granted
    # The round expires with only n2's grant (2 of 5); n1 starts another.
    n1.on_response("n2", Response(6, True), local())
    again = n1.on_deadline(local(), now=100.11, retry_after=0.1)
    assert not again.elect and again.request is not None
    # Now n2's pre-vote must be granted, or no node can ever win.
    assert n1.on_request(Request(6, 10, 5), local(), 100.15, "n2").granted
