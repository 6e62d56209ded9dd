"""Transport security layer: key schedule, handshake, DATA AEAD, replay window.

All sans-IO: randomness is a seeded ``random.Random``, time is a number.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.errors import ConfigError
from raftstate.transport import (
    HELLO_SIZE,
    MAX_PAYLOAD,
    OVERHEAD,
    Delivered,
    Dropped,
    DropReason,
    HandshakeEvent,
    NodeIdentity,
    NoSession,
    Received,
    ReplayWindow,
    SecureChannel,
    SessionExhausted,
    UnknownPeer,
    crypto,
)
from raftstate.transport.crypto import derive_pair_key, derive_psk, encode_node_id

SECRET = "correct horse battery staple"
IDS = ("n1", "n2", "n3")


def rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def make(
    node: str, *, secret: str = SECRET, now: float = 1000.0, seed: int | None = None, **kw: object
) -> SecureChannel:
    peers = [p for p in IDS if p != node]
    seed = seed if seed is not None else IDS.index(node) + 1
    return SecureChannel(node, peers, secret, now=now, random_bytes=rng(seed), **kw)  # type: ignore[arg-type]


def run(
    nodes: dict[str, SecureChannel],
    queue: list[tuple[str, bytes]],
    r: random.Random | None = None,
    loss: float = 0.0,
    dup: float = 0.0,
) -> list[tuple[str, Received]]:
    """Deliver ``(destination, datagram)`` until quiet, sending every reply
    back; with ``r``, in random order with loss and duplication."""
    seen: list[tuple[str, Received]] = []
    steps = 0
    while queue:
        steps += 1
        assert steps < 10_000, "handshake did not quiesce"
        dst, datagram = queue.pop(r.randrange(len(queue)) if r else 0)
        if r and r.random() < loss:
            continue
        if r and r.random() < dup:
            queue.append((dst, datagram))
        event = nodes[dst].receive(datagram)
        seen.append((dst, event))
        if isinstance(event, HandshakeEvent) and event.reply is not None:
            queue.append((event.peer_id, event.reply))
    return seen


def connect(*nodes: SecureChannel) -> dict[str, SecureChannel]:
    by_id = {n.node_id: n for n in nodes}
    queue = [(p, h) for n in nodes for p, h in n.hellos_due() if p in by_id]
    run(by_id, queue)
    return by_id


def assert_paired(a: SecureChannel, b: SecureChannel) -> None:
    sa, sb = a.session(b.node_id), b.session(a.node_id)
    assert sa is not None and sb is not None
    assert (sa.send_tag, sa.recv_tag) == (sb.recv_tag, sb.send_tag)
    assert a.handshake(b.node_id).confirmed and b.handshake(a.node_id).confirmed
    assert b.receive(a.seal(b.node_id, b"ping")) == Delivered(a.node_id, b"ping")
    assert a.receive(b.seal(a.node_id, b"pong")) == Delivered(b.node_id, b"pong")


def test_round_trip_both_directions() -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    for i in range(50):
        payload = bytes([i]) * (i * 20)
        assert n2.receive(n1.seal("n2", payload)) == Delivered("n1", payload)
        assert n1.receive(n2.seal("n1", payload)) == Delivered("n2", payload)
    assert n1.metrics().delivered == 50 and n1.metrics().sealed == 50
    assert [p for p, _ in n1.hellos_due()] == ["n3"]  # n3 was never contacted


def test_handshake_takes_three_hellos_and_then_stops() -> None:
    n1, n2 = make("n1"), make("n2")
    seen = run({"n1": n1, "n2": n2}, [("n2", n1.hello("n2"))])
    assert [type(e) for _, e in seen] == [HandshakeEvent] * 3
    assert len(n1.hello("n2")) == HELLO_SIZE == 220
    assert_paired(n1, n2)
    assert [p for p, _ in n1.hellos_due()] == ["n3"]


def test_overhead_leaves_room_for_payload_in_1200_byte_datagram() -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    assert OVERHEAD == 34 and MAX_PAYLOAD == 1166 == SecureChannel.max_payload()
    datagram = n1.seal("n2", bytes(MAX_PAYLOAD))
    assert len(datagram) == 1200
    assert n2.receive(datagram) == Delivered("n1", bytes(MAX_PAYLOAD))
    assert n2.receive(n1.seal("n2", b"")) == Delivered("n1", b"")


def test_wrong_cluster_secret_fails_handshake_with_reason() -> None:
    n1, n2 = make("n1"), make("n2", secret="a different secret!")
    event = n2.receive(n1.hello("n2"))
    assert isinstance(event, Dropped) and event.reason is DropReason.BAD_MAC
    assert "wrong cluster_secret" in event.detail and "'n1'" in event.detail
    run({"n1": n1, "n2": n2}, [("n1", n2.hello("n1"))])
    assert n1.session("n2") is None and n2.session("n1") is None
    assert n1.metrics().dropped_unauthenticated == 1
    with pytest.raises(NoSession):
        n1.seal("n2", b"x")


def test_short_secret_and_bad_ids_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cluster_secret"):
        SecureChannel("n1", ["n2"], "short", now=1.0)
    with pytest.raises(ConfigError, match="node_id"):
        SecureChannel("n1", ["bad id"], SECRET, now=1.0)
    with pytest.raises(ConfigError, match="peers"):
        SecureChannel("n1", ["n2", "n1"], SECRET, now=1.0)
    with pytest.raises(UnknownPeer):
        make("n1").seal("n9", b"x")


def test_tampering_with_any_byte_is_dropped_and_counted() -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    datagram = n1.seal("n2", b"heartbeat" * 10)
    reasons = {}
    for i in range(len(datagram)):
        bad = bytearray(datagram)
        bad[i] ^= 0x01
        event = n2.receive(bytes(bad))
        assert isinstance(event, Dropped)
        reasons[i] = event.reason
    assert {reasons[0], reasons[1]} == {DropReason.MALFORMED}  # version, type
    assert {reasons[i] for i in range(2, 10)} == {DropReason.UNKNOWN_SESSION}  # tag
    header_pn_body_tag = {reasons[i] for i in range(10, len(datagram))}
    assert header_pn_body_tag == {DropReason.BAD_TAG}
    drops = n2.metrics().drops
    assert drops[DropReason.BAD_TAG] == len(datagram) - 10
    assert n2.metrics().dropped_unauthenticated == len(datagram)
    assert n2.receive(datagram) == Delivered("n1", b"heartbeat" * 10)  # window unmoved


def test_replayed_datagram_is_dropped() -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    datagram = n1.seal("n2", b"once")
    assert n2.receive(datagram) == Delivered("n1", b"once")
    assert n2.receive(datagram) == Dropped(DropReason.REPLAY, "n1")
    assert n2.metrics().drops[DropReason.REPLAY] == 1


def test_datagram_reflected_or_misdelivered_is_unknown_session() -> None:
    n1, n2, n3 = make("n1"), make("n2"), make("n3")
    connect(n1, n2, n3)
    datagram = n1.seal("n2", b"for n2")
    assert n1.receive(datagram).reason is DropReason.UNKNOWN_SESSION  # type: ignore[union-attr]
    assert n3.receive(datagram).reason is DropReason.UNKNOWN_SESSION  # type: ignore[union-attr]


def test_session_reordering_within_window_accepted_older_rejected() -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    s1, s2 = n1.session("n2"), n2.session("n1")
    assert s1 is not None and s2 is not None
    sent = [s1.seal(i.to_bytes(2, "big")) for i in range(1100)]
    assert s2.open(sent[1099]) == (1099).to_bytes(2, "big")
    assert s2.open(sent[500]) == (500).to_bytes(2, "big")  # reordered, in window
    assert s2.open(sent[76]) is not None  # 1099 - 76 = 1023 < 1024
    assert s2.open(sent[75]) is None  # 1099 - 75 = 1024: below the window
    assert s2.open(sent[500]) is None
    assert s2.drops == {DropReason.TOO_OLD: 1, DropReason.REPLAY: 1}


def test_packet_numbers_strictly_increase_and_stop_before_2_62(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    s1 = n1.session("n2")
    assert s1 is not None
    pns = [struct.unpack(">Q", s1.seal(b"same")[10:18])[0] for _ in range(100)]
    assert pns == list(range(100))
    assert len({s1.seal(b"same")[18:] for _ in range(100)}) == 100  # fresh nonce each time
    monkeypatch.setattr(crypto, "MAX_PACKET_NUMBER", 201)
    s1.seal(b"last")
    with pytest.raises(SessionExhausted):
        s1.seal(b"one too many")
    assert s1.next_packet_number == 201


def test_replay_window_accepts_each_number_once() -> None:
    w = ReplayWindow(8)
    assert all(w.accept(pn) for pn in (5, 3, 4, 9, 6))
    assert [w.check(pn) for pn in (5, 9, 1, 2, 7, 10)] == [
        DropReason.REPLAY, DropReason.REPLAY, DropReason.TOO_OLD,
        None, None, None,
    ]  # fmt: skip
    assert not w.accept(9) and w.highest == 9


def test_replay_window_check_has_no_side_effects_and_jumps_clear_it() -> None:
    w = ReplayWindow(1024)
    assert w.check(0) is None and w.check(0) is None and w.highest == -1
    assert w.accept(0) and w.accept(5000)
    assert w.check(0) is DropReason.TOO_OLD
    assert w.check(5000 - 1023) is None and w.check(5000 - 1024) is DropReason.TOO_OLD
    assert w.check(-1) is DropReason.MALFORMED
    assert w.check(crypto.MAX_PACKET_NUMBER) is DropReason.MALFORMED


def test_replay_window_matches_a_set_model() -> None:
    r = random.Random(7)
    w, seen, highest = ReplayWindow(64), set(), -1
    for _ in range(5000):
        pn = max(0, highest + r.randint(-80, 5))
        fresh = pn not in seen and pn > highest - 64
        assert w.accept(pn) is fresh
        if fresh:
            seen.add(pn)
            highest = max(highest, pn)


def test_simultaneous_open_converges_to_one_session() -> None:
    n1, n2 = make("n1"), make("n2")
    seen = run({"n1": n1, "n2": n2}, [("n2", n1.hello("n2")), ("n1", n2.hello("n1"))])
    established = [e for _, e in seen if isinstance(e, HandshakeEvent) and e.established]
    assert len(established) == 2  # one session install per side, no replacements
    assert n1.metrics().sessions_replaced == n2.metrics().sessions_replaced == 0
    assert_paired(n1, n2)


@pytest.mark.parametrize("seed", range(30))
def test_any_interleaving_with_loss_and_duplicates_converges(seed: int) -> None:
    r = random.Random(seed)
    nodes = {n: make(n, seed=seed * 10 + i) for i, n in enumerate(IDS)}
    for _ in range(200):  # the driver's resend loop
        queue = [(p, h) for n in nodes.values() for p, h in n.hellos_due()]
        if not queue:
            break
        run(nodes, queue, r, loss=0.3, dup=0.2)
    assert not any(n.hellos_due() for n in nodes.values())
    for a in IDS:
        for b in IDS:
            if a < b:
                assert_paired(nodes[a], nodes[b])
    assert all(n.metrics().sessions_replaced == 0 for n in nodes.values())


def test_resent_hello_is_idempotent() -> None:
    n1, n2 = make("n1"), make("n2")
    hello = n1.hello("n2")
    assert n1.hello("n2") == hello
    first = n2.receive(hello)
    again = n2.receive(hello)
    assert isinstance(first, HandshakeEvent) and first.established
    assert again == HandshakeEvent("n1", first.reply, established=False, replaced=False)
    assert n2.metrics().sessions_established == 1


def test_peer_restart_replaces_session_and_old_datagrams_drop() -> None:
    n1, n2 = make("n1"), make("n2", now=1000.0)
    connect(n1, n2)
    old_hello = n2.hello("n1")
    in_flight = n2.seal("n1", b"from the old process")
    n2b = make("n2", now=1005.0, seed=99)  # restarted process
    seen = run({"n1": n1, "n2": n2b}, [("n1", n2b.hello("n1"))])
    assert any(isinstance(e, HandshakeEvent) and e.replaced for _, e in seen)
    assert n1.metrics().sessions_replaced == 1
    assert_paired(n1, n2b)
    assert n1.receive(in_flight) == Dropped(DropReason.UNKNOWN_SESSION)
    stale = n1.receive(old_hello)  # a replayed HELLO of the dead process
    assert isinstance(stale, Dropped) and stale.reason is DropReason.STALE_HELLO
    assert stale.peer_id == "n2"  # authentic, so attributed
    assert "replay" in stale.detail
    assert_paired(n1, n2b)


@pytest.mark.parametrize("seed", range(20))
def test_restart_amid_stale_traffic_loss_and_duplicates_converges(seed: int) -> None:
    r = random.Random(seed)
    n1, n2 = make("n1", seed=seed), make("n2", seed=seed + 100)
    connect(n1, n2)
    stale = [("n1", n2.hello("n1")), ("n1", n2.seal("n1", b"old")), ("n1", n2.seal("n1", b"old"))]
    n2b = make("n2", now=1001.0, seed=seed + 200)
    nodes = {"n1": n1, "n2": n2b}
    replaced = False
    for i in range(200):
        queue = [(p, h) for n in nodes.values() for p, h in n.hellos_due() if p in nodes]
        if not queue and i > 0:
            break
        for _, event in run(nodes, queue + (stale if i == 0 else []), r, loss=0.3, dup=0.3):
            replaced = replaced or isinstance(event, HandshakeEvent) and event.replaced
            # Old-process datagrams are authentic until n1 learns of the restart.
            assert not (replaced and isinstance(event, Delivered) and event.payload == b"old")
    assert_paired(n1, n2b)
    assert n1.metrics().sessions_replaced == 1  # exactly the one real restart
    for dst, datagram in stale:
        assert isinstance(nodes[dst].receive(datagram), Dropped)


def test_unknown_or_misaddressed_peer_is_rejected() -> None:
    n1 = make("n1")
    n9 = SecureChannel("n9", ["n1"], SECRET, now=1.0, random_bytes=rng(9))
    event = n1.receive(n9.hello("n1"))
    assert isinstance(event, Dropped) and event.reason is DropReason.UNKNOWN_PEER
    assert "b'n9'" in event.detail
    n2 = make("n2")
    misaddressed = n2.receive(make("n3").hello("n1"))  # sent to n2's address by mistake
    assert isinstance(misaddressed, Dropped) and misaddressed.reason is DropReason.UNKNOWN_PEER
    assert "stale peer address" in misaddressed.detail
    assert n1.session("n2") is None and n1.metrics().dropped_unauthenticated == 1


def test_node_identity_stops_an_insider_impersonating_a_peer() -> None:
    keys = {n: random.Random(n).randbytes(32) for n in IDS}
    pubs = {n: NodeIdentity.public_key_of(k) for n, k in keys.items()}

    def ident(n: str, key: bytes | None = None) -> NodeIdentity:
        return NodeIdentity(key or keys[n], {p: pubs[p] for p in IDS if p != n})

    n1, n2 = make("n1", identity=ident("n1")), make("n2", identity=ident("n2"))
    connect(n1, n2)
    assert_paired(n1, n2)
    # n3 knows the cluster secret but not n2's key, and claims to be n2.
    fake_n2 = make("n2", identity=ident("n2", keys["n3"]), now=2000.0, seed=5)
    event = n1.receive(fake_n2.hello("n1"))
    assert isinstance(event, Dropped) and event.reason is DropReason.BAD_MAC
    with pytest.raises(ConfigError, match="peer_public_keys"):
        make("n1", identity=NodeIdentity(keys["n1"], {"n2": pubs["n2"]}))


def forge_hello(sender: str, receiver: str, public_key: bytes, sid: bytes, stamp: int) -> bytes:
    """A correctly MACed HELLO with arbitrary fields, as an insider could make."""
    import hashlib
    import hmac

    s, r = encode_node_id(sender), encode_node_id(receiver)
    key = derive_pair_key(derive_psk(SECRET), s, r)
    body = struct.pack(">BBBB64s64s8sQ8s32s", 1, 1, 1, 0, s, r, sid, stamp, bytes(8), public_key)
    return body + hmac.digest(key, body, hashlib.sha256)


def test_authentic_hello_with_low_order_key_or_reused_id_is_rejected() -> None:
    n1 = make("n1")
    event = n1.receive(forge_hello("n2", "n1", bytes(32), b"\x01" * 8, 5))
    assert isinstance(event, Dropped) and event.reason is DropReason.BAD_HELLO
    n2 = make("n2")
    connect(n1, n2)
    sid = n2.handshake("n1").offer.session_id
    event = n1.receive(forge_hello("n2", "n1", b"\x09" * 32, sid, 10**12 * 2))
    assert isinstance(event, Dropped) and event.reason is DropReason.BAD_HELLO
    assert n1.metrics().dropped_unauthenticated == 0
    assert_paired(n1, n2)


def _mutate(r: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = r.randrange(5)
    if kind == 0:
        for _ in range(r.randint(1, 4)):
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    elif kind == 1:
        del b[r.randrange(len(b)) :]
    elif kind == 2:
        b += r.randbytes(r.randint(1, 40))
    elif kind == 3:
        i = r.randrange(len(b))
        b[i : i + 8] = r.randbytes(8)
    else:
        b[r.randrange(len(b))] = r.randrange(256)
    return bytes(b)


def test_fuzz_random_and_mutated_datagrams_never_raise_or_pass() -> None:
    r = random.Random(1234)
    n1, n2 = make("n1"), make("n2")
    connect(n1, n2)
    valid = [n1.seal("n2", r.randbytes(r.randint(0, 1100))) for _ in range(50)]
    valid += [n1.hello("n2"), make("n3").hello("n2")]
    prefixes = [b"", b"\x01\x01", b"\x01\x02", b"\x01\x02" + valid[0][2:10]]
    for i in range(20_000):
        if i % 2:
            original = r.choice(valid)
            datagram = _mutate(r, original)
            if datagram == original:
                continue
        else:
            datagram = r.choice(prefixes) + r.randbytes(r.choice([0, 1, 33, 200, 218, 1300]))
        event = n2.receive(datagram)
        assert isinstance(event, Dropped), (i, datagram)
    assert n2.metrics().delivered == 0 and n2.metrics().sessions_established == 1
    assert n2.metrics().dropped_unauthenticated == sum(n2.metrics().drops.values())
    for datagram in valid[:50]:  # forgeries never moved the replay window
        assert isinstance(n2.receive(datagram), Delivered)
    assert_paired(n1, n2)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.binary(max_size=1300))
def test_arbitrary_bytes_are_dropped(datagram: bytes) -> None:
    n2 = make("n2")
    assert isinstance(n2.receive(datagram), Dropped)
    assert isinstance(n2.receive(b"\x01\x01" + datagram), Dropped)
    assert isinstance(n2.receive(b"\x01\x02" + datagram), Dropped)
