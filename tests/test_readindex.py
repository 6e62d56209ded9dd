"""Unit tests for the sans-IO ReadIndex tracker (Raft thesis §6.4)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from raftstate.readindex import Grant, Output, Probe, ReadIndexTracker, should_ack

FAR = 1e9  # a deadline that never passes


def tracker(size: int = 3, resend_after: float = 0.5) -> ReadIndexTracker[str]:
    return ReadIndexTracker("n1", [f"n{i}" for i in range(2, size + 1)], resend_after=resend_after)


def leading(
    size: int = 3, term: int = 1, commit_index: int = 0, resend_after: float = 0.5
) -> ReadIndexTracker[str]:
    t = tracker(size, resend_after)
    t.on_become_leader(term)
    t.on_leader_ready(term, commit_index=commit_index, now=0.0)
    return t


def read(
    t: ReadIndexTracker[str],
    rid: str,
    *,
    commit_index: int = 0,
    now: float = 0.0,
    deadline: float = FAR,
) -> Output[str]:
    term = t.term if t.term is not None else 1
    return t.start_read(rid, commit_index=commit_index, term=term, now=now, deadline=deadline)


def granted(out: Output[str]) -> list[str]:
    return [g.read_id for g in out.grants]


# -- quorum confirmation --------------------------------------------------


def test_read_is_granted_only_after_quorum_acks_a_round_started_after_it() -> None:
    t = leading(size=3, commit_index=7)
    out = read(t, "a", commit_index=7)
    assert out.probes == (Probe(term=1, round=1, peers=("n2", "n3")),)
    assert out.grants == ()
    assert t.waiting == 1
    out = t.on_ack("n2", 1, 1, now=0.1)
    assert out.grants == (Grant("a", 7),)
    assert t.waiting == 0
    assert t.round_in_flight is None


def test_ack_of_a_round_started_before_the_read_arrived_never_confirms_it() -> None:
    t = leading(size=5)
    read(t, "a")  # round 1
    t.on_ack("n2", 1, 1, now=0.1)
    out = read(t, "b", now=0.2)  # arrives mid-round 1: needs round 2
    assert out.probes == ()
    out = t.on_ack("n3", 1, 1, now=0.3)  # round 1 reaches quorum
    assert granted(out) == ["a"]
    assert out.probes == (Probe(1, 2, ("n2", "n3", "n4", "n5")),)
    # Late and replayed acks of round 1 from everyone: still no quorum for "b".
    for peer in ("n2", "n3", "n4", "n5", "n4"):
        assert t.on_ack(peer, 1, 1, now=0.4).grants == ()
    assert t.waiting == 1
    t.on_ack("n4", 1, 2, now=0.5)
    assert granted(t.on_ack("n5", 1, 2, now=0.6)) == ["b"]


def test_stale_ack_after_a_completed_round_does_not_confirm_a_new_read() -> None:
    t = leading(size=3)
    read(t, "a")
    assert granted(t.on_ack("n2", 1, 1, now=0.1)) == ["a"]
    out = read(t, "b", now=0.2)
    assert out.probes == (Probe(1, 2, ("n2", "n3")),)
    assert t.on_ack("n3", 1, 1, now=0.3).grants == ()  # delayed ack of round 1
    assert t.on_ack("n2", 1, 1, now=0.3).grants == ()  # duplicate of round 1
    assert granted(t.on_ack("n3", 1, 2, now=0.4)) == ["b"]


def test_ack_for_a_round_later_than_the_one_in_flight_at_arrival_confirms_the_read() -> None:
    t = leading(size=3)
    read(t, "a")  # round 1 in flight
    read(t, "b", now=0.1)  # needs round >= 2
    t.on_ack("n2", 1, 1, now=0.2)  # a granted, round 2 starts
    assert t.round_in_flight == 2
    assert granted(t.on_ack("n3", 1, 2, now=0.3)) == ["b"]


def test_an_older_ack_never_lowers_what_a_peer_has_confirmed() -> None:
    t = leading(size=5)
    read(t, "a")
    t.on_ack("n2", 1, 1, now=0.1)
    read(t, "b", now=0.2)
    t.on_ack("n3", 1, 1, now=0.3)  # a granted, round 2 starts
    t.on_ack("n2", 1, 2, now=0.4)
    t.on_ack("n2", 1, 1, now=0.5)  # reordered older ack from n2
    assert granted(t.on_ack("n3", 1, 2, now=0.6)) == ["b"]


def test_duplicate_acks_from_one_peer_count_once() -> None:
    t = leading(size=5)
    read(t, "a")
    for _ in range(4):
        assert t.on_ack("n2", 1, 1, now=0.1).grants == ()
    assert granted(t.on_ack("n3", 1, 1, now=0.2)) == ["a"]


def test_acks_from_unknown_peers_or_self_are_ignored() -> None:
    t = leading(size=3)
    read(t, "a")
    for peer in ("n9", "n1", ""):
        assert t.on_ack(peer, 1, 1, now=0.1).grants == ()
    assert t.waiting == 1


def test_acks_for_rounds_not_yet_started_are_ignored() -> None:
    t = leading(size=3)
    read(t, "a")  # round 1
    read(t, "b", now=0.1)  # queued for round 2
    assert t.on_ack("n2", 1, 2, now=0.2).grants == ()  # round 2 not started: forged
    assert t.on_ack("n2", 1, 0, now=0.2).grants == ()
    assert t.waiting == 2
    assert granted(t.on_ack("n2", 1, 1, now=0.3)) == ["a"]  # now round 2 starts
    assert t.waiting == 1  # the earlier "round 2" ack was not remembered


@pytest.mark.parametrize(("size", "peer_acks"), [(2, 1), (3, 1), (4, 2), (5, 2), (7, 3)])
def test_quorum_counts_the_leader_itself(size: int, peer_acks: int) -> None:
    t = leading(size=size)
    read(t, "a")
    peers = [f"n{i}" for i in range(2, size + 1)]
    for peer in peers[: peer_acks - 1]:
        assert t.on_ack(peer, 1, 1, now=0.1).grants == ()
    assert granted(t.on_ack(peers[peer_acks - 1], 1, 1, now=0.1)) == ["a"]


def test_single_node_cluster_grants_immediately_once_ready() -> None:
    t = tracker(size=1)
    t.on_become_leader(3)
    held = t.start_read("held", commit_index=4, term=3, now=0.0, deadline=FAR)
    assert held.grants == () and held.probes == ()
    out = t.on_leader_ready(3, commit_index=5, now=0.1)
    assert out == Output(grants=(Grant("held", 5),))
    out = t.start_read("x", commit_index=6, term=3, now=0.2, deadline=FAR)
    assert out == Output(grants=(Grant("x", 6),))
    assert t.waiting == 0


# -- leader readiness and read_index --------------------------------------


def test_reads_wait_for_leader_ready_and_take_the_ready_commit_index() -> None:
    t = tracker(size=3)
    t.on_become_leader(2)
    out = t.start_read("a", commit_index=3, term=2, now=0.0, deadline=FAR)
    assert out == Output()  # held: no round before an own-term commit
    assert t.on_ack("n2", 2, 1, now=0.1) == Output()
    assert t.rounds_started == 0
    out = t.on_leader_ready(2, commit_index=9, now=0.2)
    assert out.probes == (Probe(2, 1, ("n2", "n3")),)
    # The commit index at arrival may predate entries the old leader committed.
    assert t.on_ack("n3", 2, 1, now=0.3).grants == (Grant("a", 9),)


def test_leader_ready_for_another_term_is_ignored() -> None:
    t = tracker(size=3)
    t.on_become_leader(2)
    read(t, "a")
    assert t.on_leader_ready(1, commit_index=5, now=0.1) == Output()
    assert not t.ready


def test_read_index_is_the_commit_index_at_arrival() -> None:
    t = leading(size=3, commit_index=10)
    read(t, "a", commit_index=10)
    read(t, "b", commit_index=12, now=0.1)
    read(t, "c", commit_index=15, now=0.2)
    out = t.on_ack("n2", 1, 1, now=0.3)
    assert out.grants == (Grant("a", 10),)
    out = t.on_ack("n2", 1, 2, now=0.4)
    assert out.grants == (Grant("b", 12), Grant("c", 15))


# -- sharing rounds ---------------------------------------------------------


def test_reads_arriving_mid_round_share_the_next_round() -> None:
    t = leading(size=3)
    read(t, "r0")
    for i in range(1, 10):
        assert read(t, f"r{i}", now=0.01 * i).probes == ()
    assert t.rounds_started == 1
    out = t.on_ack("n2", 1, 1, now=0.2)
    assert granted(out) == ["r0"]
    assert out.probes == (Probe(1, 2, ("n2", "n3")),)
    out = t.on_ack("n3", 1, 2, now=0.3)
    assert granted(out) == [f"r{i}" for i in range(1, 10)]
    assert t.rounds_started == 2
    assert t.round_in_flight is None


def test_read_arriving_with_no_round_in_flight_starts_one_immediately() -> None:
    t = leading(size=3)
    read(t, "a")
    t.on_ack("n2", 1, 1, now=0.1)
    assert t.round_in_flight is None
    assert read(t, "b", now=0.2).probes == (Probe(1, 2, ("n2", "n3")),)


# -- term change and step-down ----------------------------------------------


def test_term_change_mid_round_fails_waiting_reads_and_ignores_old_term_acks() -> None:
    t = leading(size=3, term=1)
    read(t, "a")
    read(t, "b", now=0.1)
    out = t.on_become_leader(2)
    assert set(out.failed) == {"a", "b"}
    t.on_leader_ready(2, commit_index=0, now=0.2)
    out = read(t, "c", now=0.3)
    (probe,) = out.probes
    assert probe.term == 2
    assert t.on_ack("n2", 1, 1, now=0.4) == Output()  # old term, old round
    assert t.on_ack("n2", 1, probe.round, now=0.4) == Output()  # old term, same number
    assert granted(t.on_ack("n2", 2, probe.round, now=0.5)) == ["c"]


def test_step_down_fails_every_read_including_held_ones() -> None:
    t = tracker(size=3)
    t.on_become_leader(1)
    read(t, "held")
    t.on_leader_ready(1, commit_index=0, now=0.0)
    read(t, "queued", now=0.1)
    out = t.on_step_down()
    assert set(out.failed) == {"held", "queued"}
    assert t.term is None and t.waiting == 0 and t.round_in_flight is None
    assert t.on_ack("n2", 1, 1, now=0.2) == Output()
    assert t.on_tick(10.0) == Output()


def test_read_when_not_leader_or_in_a_stale_term_fails_immediately() -> None:
    t = tracker(size=3)
    out = t.start_read("a", commit_index=0, term=1, now=0.0, deadline=FAR)
    assert out.failed == ("a",)
    t.on_become_leader(2)
    t.on_leader_ready(2, commit_index=0, now=0.0)
    out = t.start_read("b", commit_index=0, term=1, now=0.0, deadline=FAR)
    assert out.failed == ("b",)
    assert t.term == 2


def test_read_in_a_newer_term_fails_all_reads_as_a_missed_step_down() -> None:
    t = leading(size=3, term=2)
    read(t, "a")
    out = t.start_read("b", commit_index=0, term=3, now=0.1, deadline=FAR)
    assert out.failed == ("a", "b")
    assert t.term is None


def test_become_leader_rejects_an_older_term_and_repeats_are_no_ops() -> None:
    t = leading(size=3, term=5)
    read(t, "a")
    assert t.on_become_leader(5) == Output()
    assert t.waiting == 1
    with pytest.raises(ValueError):
        t.on_become_leader(4)


# -- retransmission, deadlines, cancel --------------------------------------


def test_resend_goes_only_to_peers_that_have_not_acked_paced_by_resend_after() -> None:
    t = leading(size=5, resend_after=0.5)
    read(t, "a", now=1.0)
    t.on_ack("n3", 1, 1, now=1.1)
    assert t.next_tick_at() == 1.5
    assert t.on_tick(1.4).probes == ()
    assert t.on_tick(1.5).probes == (Probe(1, 1, ("n2", "n4", "n5")),)
    assert t.on_tick(1.9).probes == ()
    assert t.on_tick(2.0).probes == (Probe(1, 1, ("n2", "n4", "n5")),)
    out = t.on_ack("n5", 1, 1, now=2.1)
    assert granted(out) == ["a"]
    assert t.on_tick(5.0) == Output()
    assert t.next_tick_at() is None


def test_expired_read_fails_on_tick_and_is_never_granted() -> None:
    t = tracker(size=3)
    t.on_become_leader(1)
    read(t, "a", now=0.0, deadline=1.0)
    read(t, "b", now=0.0, deadline=5.0)
    t.on_leader_ready(1, commit_index=0, now=0.0)  # one round for both held reads
    assert t.next_tick_at() == 0.5  # the first resend comes before the first deadline
    out = t.on_tick(1.0)
    assert out.failed == ("a",)
    assert t.on_tick(2.0).failed == ()  # reported once
    out = t.on_ack("n2", 1, 1, now=2.1)
    assert granted(out) == ["b"] and out.failed == ()


def test_read_whose_deadline_passed_before_the_quorum_ack_fails_instead() -> None:
    t = leading(size=3)
    read(t, "a", now=0.0, deadline=1.0)
    out = t.on_ack("n2", 1, 1, now=1.0)  # no tick in between
    assert out.grants == () and out.failed == ("a",)


def test_read_arriving_past_its_deadline_fails_at_once() -> None:
    t = leading(size=3)
    out = read(t, "a", now=2.0, deadline=2.0)
    assert out == Output(failed=("a",))
    assert t.rounds_started == 0


def test_round_whose_reads_all_expired_fails_and_queued_reads_start_the_next() -> None:
    t = leading(size=3)
    read(t, "a", now=0.0, deadline=1.0)  # round 1
    read(t, "b", now=0.1, deadline=FAR)  # queued for round 2
    out = t.on_tick(1.0)
    assert out.failed == ("a",)
    assert out.probes == (Probe(1, 2, ("n2", "n3")),)
    assert t.on_ack("n2", 1, 1, now=1.1).grants == ()  # the failed round's ack
    assert granted(t.on_ack("n2", 1, 2, now=1.2)) == ["b"]


def test_cancelled_read_is_never_granted() -> None:
    t = tracker(size=3)
    t.on_become_leader(1)
    read(t, "a")
    read(t, "b")
    t.on_leader_ready(1, commit_index=0, now=0.0)  # one round for both held reads
    assert t.cancel("a") is True
    assert t.cancel("a") is False
    assert t.cancel("zzz") is False
    out = t.on_ack("n2", 1, 1, now=0.1)
    assert granted(out) == ["b"] and out.failed == ()


def test_cancelling_every_read_of_a_round_lets_queued_reads_start_a_new_round() -> None:
    t = leading(size=3)
    read(t, "a")
    read(t, "b", now=0.1)
    t.cancel("a")
    out = t.on_tick(0.2)
    assert out.probes == (Probe(1, 2, ("n2", "n3")),)
    assert t.on_ack("n2", 1, 1, now=0.3).grants == ()
    assert granted(t.on_ack("n2", 1, 2, now=0.3)) == ["b"]


def test_duplicate_read_id_is_rejected() -> None:
    t = leading(size=3)
    read(t, "a")
    with pytest.raises(ValueError):
        read(t, "a")


def test_constructor_rejects_self_in_peers_and_nonpositive_resend() -> None:
    with pytest.raises(ValueError):
        ReadIndexTracker[str]("n1", ["n1", "n2"], resend_after=1.0)
    with pytest.raises(ValueError):
        ReadIndexTracker[str]("n1", ["n2"], resend_after=0.0)


def test_read_ids_are_opaque_hashables_such_as_follower_request_tuples() -> None:
    t: ReadIndexTracker[tuple[str, int]] = ReadIndexTracker("n1", ["n2"], resend_after=1.0)
    t.on_become_leader(1)
    t.on_leader_ready(1, commit_index=3, now=0.0)
    t.start_read(("n2", 17), commit_index=3, term=1, now=0.0, deadline=FAR)
    assert t.on_ack("n2", 1, 1, now=0.1).grants == (Grant(("n2", 17), 3),)


# -- follower side ------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe_term", "my_term", "my_leader", "sender", "expected"),
    [
        (4, 4, "n1", "n1", True),
        (3, 4, "n1", "n1", False),  # probe from an older term
        (5, 4, "n1", "n1", False),  # we have not caught up with the newer term
        (4, 4, "n2", "n1", False),  # we follow someone else
        (4, 4, None, "n1", False),  # we follow no one
    ],
)
def test_follower_acks_only_its_own_term_and_its_own_leader(
    probe_term: int, my_term: int, my_leader: str | None, sender: str, expected: bool
) -> None:
    assert should_ack(probe_term, my_term, my_leader, sender) is expected


# -- property: random interleavings -------------------------------------------


@dataclass
class _ReadRecord:
    arrival_seq: int
    term: int
    epoch: int
    read_index: int
    deadline: float
    held: bool
    outcome: str | None = None


@dataclass
class _Sim:
    """Drives one tracker through a random history and checks every output."""

    rng: random.Random
    size: int
    t: ReadIndexTracker[int] = field(init=False)
    peers: list[str] = field(init=False)
    now: float = 0.0
    seq: int = 0
    raft_term: int = 0
    commit_index: int = 0
    epoch: int = 0  # bumped on every leadership change
    next_id: int = 0
    reads: dict[int, _ReadRecord] = field(default_factory=dict)
    round_start: dict[tuple[int, int], int] = field(default_factory=dict)
    probes: list[tuple[str, int, int]] = field(default_factory=list)  # in the network
    acks: list[tuple[str, int, int]] = field(default_factory=list)  # in the network
    delivered: list[tuple[int, str, int, int]] = field(default_factory=list)  # seq, ack

    def __post_init__(self) -> None:
        self.peers = [f"p{i}" for i in range(1, self.size)]
        self.t = ReadIndexTracker("leader", self.peers, resend_after=0.3)

    def call_seq(self) -> int:
        self.seq += 1
        return self.seq

    def check(self, out: Output[int]) -> None:
        for probe in out.probes:
            assert self.t.term == probe.term and self.t.ready
            assert probe.peers and set(probe.peers) <= set(self.peers)
            self.round_start.setdefault((probe.term, probe.round), self.seq)
            self.probes += [(p, probe.term, probe.round) for p in probe.peers]
        for rid in out.failed:
            rec = self.reads[rid]
            assert rec.outcome is None, f"read {rid} ended twice"
            rec.outcome = "failed"
        for grant in out.grants:
            self.check_grant(grant)

    def check_grant(self, grant: Grant[int]) -> None:
        rec = self.reads[grant.read_id]
        assert rec.outcome is None, f"read {grant.read_id} ended twice"
        rec.outcome = "granted"
        assert self.now < rec.deadline, "granted an expired read"
        assert rec.epoch == self.epoch and self.t.term == rec.term and self.t.ready
        assert grant.read_index == rec.read_index
        # Safety: a majority (leader included) acked rounds of this term that
        # started at or after the read arrived.
        confirming = {
            peer
            for _, peer, term, rnd in self.delivered
            if term == rec.term and self.round_start.get((term, rnd), -1) >= rec.arrival_seq
        }
        assert len(confirming) + 1 >= self.size // 2 + 1, (grant, confirming)

    def start_read(self, term: int | None = None, deadline: float | None = None) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        if term is None:  # mostly current; sometimes a stale or a newer term
            term = self.raft_term + self.rng.choices([0, -1, 1], [90, 7, 3])[0]
        if deadline is None:
            deadline = self.now + self.rng.uniform(0.0, 6.0)
        seq = self.call_seq()
        if self.t.term is not None and term > self.t.term:
            self.raft_term = term  # the tracker must treat this as a missed step-down
            self.epoch += 1
        self.reads[rid] = _ReadRecord(
            seq, term, self.epoch, self.commit_index, deadline, held=not self.t.ready
        )
        self.check(
            self.t.start_read(
                rid, commit_index=self.commit_index, term=term, now=self.now, deadline=deadline
            )
        )

    def drop_probe(self) -> None:
        if self.probes:
            self.probes.pop(self.rng.randrange(len(self.probes)))

    def deliver_probe(self) -> None:
        if self.probes:
            msg = self.probes.pop(self.rng.randrange(len(self.probes)))
            self.acks.append(msg)  # the peer acks (term, round) as received

    def deliver_ack(self, keep: bool) -> None:
        if not self.acks:
            return
        i = self.rng.randrange(len(self.acks))
        peer, term, rnd = self.acks[i] if keep else self.acks.pop(i)
        self.send_ack(peer, term, rnd)

    def send_ack(self, peer: str, term: int, rnd: int) -> None:
        seq = self.call_seq()
        if peer in self.peers and (term, rnd) in self.round_start:
            self.delivered.append((seq, peer, term, rnd))
        self.check(self.t.on_ack(peer, term, rnd, self.now))

    def bogus_ack(self) -> None:
        peer = self.rng.choice([*self.peers, "stranger", "leader"])
        term = self.raft_term + self.rng.choice([-1, 0, 0, 1])
        rnd = self.t.rounds_started + self.rng.choice([-2, -1, 0, 1, 2])
        if self.delivered and self.rng.random() < 0.5:
            _, peer, term, rnd = self.rng.choice(self.delivered)  # replay an old ack
        self.send_ack(peer, term, rnd)

    def become_leader(self) -> None:
        self.raft_term += 1
        self.epoch += 1
        self.call_seq()
        self.check(self.t.on_become_leader(self.raft_term))

    def leader_ready(self) -> None:
        if self.t.term is None or self.t.ready:
            return
        self.call_seq()
        for rec in self.reads.values():
            if rec.outcome is None and rec.held:
                rec.read_index = max(rec.read_index, self.commit_index)
        out = self.t.on_leader_ready(self.raft_term, commit_index=self.commit_index, now=self.now)
        self.check(out)

    def step_down(self) -> None:
        self.epoch += 1
        self.call_seq()
        self.check(self.t.on_step_down())

    def cancel(self) -> None:
        waiting = [rid for rid, rec in self.reads.items() if rec.outcome is None]
        if waiting:
            rid = self.rng.choice(waiting)
            assert self.t.cancel(rid)
            self.reads[rid].outcome = "cancelled"

    def tick(self) -> None:
        self.now += self.rng.choice([0.0, 0.05, 0.2, 0.5])
        self.call_seq()
        self.check(self.t.on_tick(self.now))

    def step(self) -> None:
        actions = [
            (self.start_read, 20),
            (self.deliver_probe, 20),
            (lambda: self.deliver_ack(keep=False), 20),
            (lambda: self.deliver_ack(keep=True), 5),
            (self.bogus_ack, 8),
            (self.drop_probe, 4),
            (self.tick, 15),
            (self.cancel, 2),
            (self.become_leader, 1 if self.t.term is not None else 10),
            (self.leader_ready, 4),
            (self.step_down, 1 if self.t.term is not None else 0),
            (self.advance_commit, 5),
        ]
        self.rng.choices([a for a, _ in actions], [w for _, w in actions])[0]()

    def advance_commit(self) -> None:
        self.commit_index += self.rng.randint(0, 3)

    def settle(self) -> None:
        """Reliable network until quiet: a fresh read must then be granted."""
        if self.t.term is None:
            self.become_leader()
        self.leader_ready()
        rid = self.next_id
        self.start_read(term=self.raft_term, deadline=FAR)
        for _ in range(1000):
            if self.reads[rid].outcome is not None:
                break
            while self.probes:
                self.deliver_probe()
            while self.acks:
                self.deliver_ack(keep=False)
            self.tick()
        assert self.reads[rid].outcome == "granted"
        self.now = FAR
        self.tick()
        assert self.t.waiting == 0
        assert all(rec.outcome is not None for rec in self.reads.values())


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_random_interleavings_only_grant_after_a_quorum_round_started_after_arrival(
    size: int,
) -> None:
    grants = 0
    for seed in range(40):
        sim = _Sim(random.Random(seed * 10 + size), size)
        for _ in range(400):
            sim.step()
        sim.settle()
        grants += sum(rec.outcome == "granted" for rec in sim.reads.values())
    assert grants > 500  # the history really exercised grants, not just failures
