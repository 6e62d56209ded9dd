"""Roaming with path validation (raftstate.transport.roaming), sans-IO.

The validator is driven the way the UDP transport drives it: only datagrams
that :class:`SecureChannel` delivered (authentic, inside the replay window)
reach ``on_authentic``; a PATH_RESPONSE goes to ``on_response``. No sockets,
no clock: ``now`` is an input and nonces come from a seeded source.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.errors import ConfigError
from raftstate.transport.crypto import OVERHEAD, DropReason
from raftstate.transport.envelope import Delivered, Dropped, HandshakeEvent, SecureChannel
from raftstate.transport.reach import StaticReach
from raftstate.transport.roaming import (
    CHALLENGE_SIZE,
    PATH_CHALLENGE,
    PATH_RESPONSE,
    Challenge,
    Failed,
    PathValidator,
    RoamingConfig,
    Switch,
    is_path_payload,
    response_to,
)

SECRET = "correct horse battery staple"
OLD = ("198.51.100.7", 4000)
NEW = ("198.51.100.7", 20001)
ATTACKER = ("203.0.113.66", 666)
BIG = 200  # sealed bytes of an ordinary authentic datagram


def nonces(seed: int = 7) -> Any:
    return random.Random(seed).randbytes


def validator(**cfg: Any) -> PathValidator:
    return PathValidator(OLD, RoamingConfig(**cfg), random_bytes=nonces())


def answer(challenge: Challenge) -> bytes:
    reply = response_to(challenge.payload)
    assert reply is not None
    return reply


# --- the validator alone ---------------------------------------------------------


def test_an_address_the_path_moved_to_by_itself_needs_no_switch() -> None:
    """ICE may nominate another pair on its own (authenticated checks): the
    driver adopts that address; a validation of it still in flight then ends
    without a second move (the transport would count one path twice)."""
    v = validator()
    challenge = v.on_authentic(NEW, BIG, 0.0)
    assert challenge is not None and v.pending == NEW
    v.adopt(NEW)
    assert v.current == NEW and v.pending is None
    assert v.on_response(NEW, answer(challenge), 0.01) is None
    assert v.on_authentic(NEW, BIG, 0.02) is None  # the current address now
    assert v.counters.switches == 0


def test_adopting_another_address_keeps_the_pending_validation() -> None:
    v = validator()
    challenge = v.on_authentic(NEW, BIG, 0.0)
    assert challenge is not None
    v.adopt(("198.51.100.7", 30000))
    assert v.pending == NEW
    switch = v.on_response(NEW, answer(challenge), 0.01)
    assert switch == Switch(NEW, ("198.51.100.7", 30000))


def test_first_source_is_adopted_without_a_challenge() -> None:
    v = PathValidator(None, random_bytes=nonces())
    assert v.on_authentic(OLD, BIG, 0.0) is None
    assert v.current == OLD and v.pending is None


def test_datagrams_from_the_current_address_never_challenge() -> None:
    v = validator()
    assert all(v.on_authentic(OLD, BIG, t / 10) is None for t in range(100))
    assert v.counters.challenges == 0


def test_a_new_source_is_challenged_and_the_path_stays_until_the_echo_comes_back() -> None:
    v = validator()
    challenge = v.on_authentic(NEW, BIG, 1.0)
    assert isinstance(challenge, Challenge) and challenge.address == NEW
    assert challenge.payload[0] == PATH_CHALLENGE and len(challenge.payload) == CHALLENGE_SIZE
    assert v.current == OLD and v.pending == NEW  # still sending on the old path
    assert v.on_authentic(NEW, BIG, 1.01) is None  # more from NEW: no second challenge
    switch = v.on_response(NEW, answer(challenge), 1.05)
    assert switch == Switch(NEW, OLD)
    assert v.current == NEW and v.pending is None


def test_a_response_from_another_address_or_with_another_nonce_never_switches() -> None:
    v = validator()
    challenge = v.on_authentic(NEW, BIG, 1.0)
    assert challenge is not None
    good = answer(challenge)
    forged = bytes((PATH_RESPONSE,)) + bytes(a ^ 0xFF for a in good[1:])
    assert v.on_response(ATTACKER, good, 1.01) is None  # echoed, but from elsewhere
    assert v.on_response(NEW, forged, 1.01) is None  # from NEW, wrong nonce
    assert v.on_response(NEW, challenge.payload, 1.01) is None  # a challenge is no response
    assert v.current == OLD and v.counters.unmatched_responses == 3
    assert v.on_response(NEW, good, 1.02) == Switch(NEW, OLD)  # still pending, still valid


def test_a_late_response_does_not_switch_and_the_timeout_falls_back_to_a_rebuild() -> None:
    v = validator(timeout=0.5, resends=0)
    challenge = v.on_authentic(NEW, BIG, 1.0)
    assert challenge is not None
    assert v.next_timeout() == pytest.approx(1.5)
    assert v.poll(1.4) is None
    assert v.poll(1.5) == Failed(NEW)
    assert v.on_response(NEW, answer(challenge), 1.52) is None
    assert v.current == OLD and v.pending is None and v.counters.failures == 1
    assert v.poll(2.0) is None and v.next_timeout() is None


def test_a_lost_challenge_is_resent_with_the_same_nonce_a_bounded_number_of_times() -> None:
    v = validator(timeout=1.0, resends=3, resend_interval=0.1)
    first = v.on_authentic(NEW, BIG, 0.0)
    assert first is not None
    sent = [first]
    t = 0.0
    while (when := v.next_timeout()) is not None:
        t = when
        due = v.poll(t)
        if isinstance(due, Challenge):
            sent.append(due)
        elif due is not None:
            assert due == Failed(NEW)
    assert len(sent) == 4 and {c.payload for c in sent} == {first.payload}
    assert t == pytest.approx(1.0)


def test_a_newer_source_replaces_the_pending_validation() -> None:
    v = validator()
    first = v.on_authentic(NEW, BIG, 0.0)
    other = ("192.0.2.9", 7)
    second = v.on_authentic(other, BIG, 0.6)
    assert first is not None and second is not None and first.payload != second.payload
    assert v.on_response(NEW, answer(first), 0.61) is None  # the old nonce is void
    assert v.on_response(other, answer(second), 0.62) == Switch(other, OLD)


def test_a_datagram_smaller_than_a_challenge_never_triggers_one() -> None:
    limit = CHALLENGE_SIZE + OVERHEAD
    v = validator(min_trigger_size=limit)
    assert v.on_authentic(NEW, limit - 1, 0.0) is None
    assert v.counters.too_small == 1 and v.pending is None
    assert v.on_authentic(NEW, limit, 0.0) is not None


def test_a_hint_challenges_the_hinted_address_and_only_an_echo_from_there_switches() -> None:
    v = validator()
    challenge = v.hint(NEW, 0.0)
    assert challenge is not None and challenge.address == NEW
    assert v.hint(NEW, 0.01) is None and v.hint(OLD, 0.01) is None
    assert v.on_response(ATTACKER, answer(challenge), 0.02) is None
    assert v.on_response(NEW, answer(challenge), 0.03) == Switch(NEW, OLD)


def test_reset_forgets_a_pending_validation() -> None:
    v = validator()
    challenge = v.on_authentic(NEW, BIG, 0.0)
    assert challenge is not None
    v.reset(("192.0.2.1", 1))
    assert v.pending is None and v.on_response(NEW, answer(challenge), 0.01) is None


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 10),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=300),
)
def test_challenges_never_exceed_the_token_bucket(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """However fast new sources (or hints) come, challenges over any span of
    ``d`` seconds number at most ``burst + rate * d``."""
    v = PathValidator(OLD, RoamingConfig(challenges_per_s=rate, burst=burst, resends=0),
                      random_bytes=nonces())  # fmt: skip
    t, sent = 0.0, []
    for i, gap in enumerate(gaps):
        t += gap
        source = ("192.0.2.1", 1000 + i)  # a new address every time
        out = v.hint(source, t) if i % 3 == 0 else v.on_authentic(source, BIG, t)
        if out is not None:
            sent.append(t)
    for i, start in enumerate(sent):
        for j in range(i, len(sent)):
            assert j - i + 1 <= burst + rate * (sent[j] - start) + 1e-9
    assert v.counters.challenges == len(sent)
    assert v.counters.rate_limited == len(gaps) - len(sent)


def test_path_payloads_are_told_apart_from_link_frames_and_answers_never_amplify() -> None:
    challenge = bytes((PATH_CHALLENGE,)) + bytes(8)
    assert is_path_payload(challenge)
    reply = response_to(challenge)
    assert reply is not None and len(reply) == len(challenge) and is_path_payload(reply)
    assert response_to(reply) is None  # a response is never answered
    assert not is_path_payload(b"\x51" + bytes(8))  # a link frame's format nibble
    assert not is_path_payload(challenge + b"\x00")
    assert response_to(challenge[:-1]) is None


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match="roaming.timeout"):
        RoamingConfig(timeout=0).validate()
    with pytest.raises(ConfigError, match="roaming.burst"):
        PathValidator(OLD, RoamingConfig(burst=0))
    with pytest.raises(ConfigError, match="challenges_per_s"):
        RoamingConfig(challenges_per_s=0).validate()
    with pytest.raises(ConfigError, match="random_bytes"):
        PathValidator(OLD, random_bytes=lambda n: b"x").on_authentic(NEW, BIG, 0.0)


# --- driven through the secure channel, as the transport does --------------------


@dataclass
class Node:
    """One end: a SecureChannel plus the validator for its one peer."""

    channel: SecureChannel
    peer: str
    roam: PathValidator
    sent: list[tuple[bytes, Any]] = field(default_factory=list)

    def receive(self, datagram: bytes, source: Any, now: float) -> Delivered | Dropped | None:
        """What UdpTransport._on_datagram does for roaming."""
        event = self.channel.receive(datagram)
        if not isinstance(event, Delivered):
            return event if isinstance(event, Dropped) else None
        challenge = self.roam.on_authentic(source, len(datagram), now)
        if challenge is not None:
            self.sent.append((self.channel.seal(self.peer, challenge.payload), challenge.address))
        reply = response_to(event.payload)
        if reply is not None:
            self.sent.append((self.channel.seal(self.peer, reply), source))
        elif is_path_payload(event.payload):
            switch = self.roam.on_response(source, event.payload, now)
            if switch is not None:
                self.sent.append((b"", ("switched", switch.address)))
        return event


def pair() -> tuple[Node, Node]:
    a = SecureChannel("n1", ["n2"], SECRET, now=1000.0, random_bytes=nonces(1))
    b = SecureChannel("n2", ["n1"], SECRET, now=1000.0, random_bytes=nonces(2))
    queue = [("n2", a.hello("n2")), ("n1", b.hello("n1"))]
    by_id = {"n1": a, "n2": b}
    while queue:
        dst, datagram = queue.pop(0)
        event = by_id[dst].receive(datagram)
        if isinstance(event, HandshakeEvent) and event.reply is not None:
            queue.append((event.peer_id, event.reply))
    config = RoamingConfig(min_trigger_size=CHALLENGE_SIZE + OVERHEAD)
    return (
        Node(a, "n2", PathValidator(OLD, config, random_bytes=nonces(3))),
        Node(b, "n1", PathValidator(("192.0.2.1", 1), config, random_bytes=nonces(4))),
    )


def test_a_remapped_peer_is_followed_after_its_echo_through_the_channel() -> None:
    a, b = pair()
    data = b.channel.seal("n1", b"\x50" + bytes(100))  # any authentic datagram
    assert isinstance(a.receive(data, NEW, 0.0), Delivered)
    ((challenge, to),) = a.sent
    assert to == NEW and len(challenge) <= len(data)  # no amplification
    a.sent.clear()
    b.receive(challenge, ("192.0.2.1", 1), 0.03)  # b answers where it came from
    ((response, back_to),) = b.sent
    assert back_to == ("192.0.2.1", 1)
    a.receive(response, NEW, 0.06)
    assert a.sent == [(b"", ("switched", NEW))] and a.roam.current == NEW


def test_a_replayed_datagram_from_a_new_address_is_dropped_and_challenges_nothing() -> None:
    a, b = pair()
    data = b.channel.seal("n1", b"\x50" + bytes(100))
    assert isinstance(a.receive(data, OLD, 0.0), Delivered)
    replayed = a.receive(data, ATTACKER, 0.1)  # captured, resent from elsewhere
    assert isinstance(replayed, Dropped) and replayed.reason is DropReason.REPLAY
    assert a.sent == [] and a.roam.pending is None and a.roam.current == OLD


def test_a_spoofed_datagram_from_a_new_address_never_authenticates() -> None:
    a, b = pair()
    data = bytearray(b.channel.seal("n1", b"\x50" + bytes(100)))
    data[-1] ^= 1  # forged: the attacker lacks the session key
    event = a.receive(bytes(data), ATTACKER, 0.0)
    assert isinstance(event, Dropped) and event.reason is DropReason.BAD_TAG
    assert a.sent == [] and a.roam.current == OLD


def test_an_attacker_relaying_a_fresh_datagram_gets_a_challenge_it_cannot_answer() -> None:
    """An on-path attacker that swallows a fresh datagram and resends it from
    its own address triggers one challenge; without the session key it cannot
    echo the nonce, so the path never moves and the validation times out."""
    a, b = pair()
    fresh = b.channel.seal("n1", b"\x50" + bytes(100))
    a.receive(fresh, ATTACKER, 0.0)
    ((challenge, to),) = a.sent
    assert to == ATTACKER
    a.sent.clear()
    guess = b.channel.seal("n1", bytes((PATH_RESPONSE,)) + bytes(8))  # b's key, wrong nonce
    a.receive(guess, ATTACKER, 0.05)
    assert a.sent == [] and a.roam.current == OLD
    assert a.roam.poll(5.0) == Failed(ATTACKER)


def test_a_static_peer_moved_after_validation_counts_as_a_new_path() -> None:
    """``Member.paths`` counts moves as well as builds: a static peer's path
    count starts at one and each validated move adds one."""
    loop = asyncio.new_event_loop()
    try:
        reach = StaticReach(loop, "127.0.0.1:0", {"b": "198.51.100.7:4000"})
        assert reach.path_info("b") == ("static", 1)
        reach.move("b", NEW)
        assert reach.remote("b") == NEW and reach.path_info("b") == ("static", 2)
    finally:
        loop.close()
