"""Unordered delivery on the reliable link: what may overtake what, and why a
reordered stale AppendEntries is harmless to Raft.

Rules under test (raftstate/transport/outgoing.py, reassembly.py):

* every message is delivered exactly once, lost or duplicated or not;
* an *ordered* message is delivered after every message sent before it;
* an *unordered* message is delivered after every *ordered* message sent
  before it (its barrier), but may overtake unordered ones under repair.

All deterministic on the simulated network (seeded ``random.Random``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.appendguard import trim
from raftstate.transport import LinkConfig, LinkProfile, SimLinkHost, SimNetwork
from raftstate.transport.frames import (
    Frame,
    FrameError,
    StreamChunk,
    decode_frame,
    encode_frame,
    encode_varint,
)
from raftstate.transport.reassembly import Reassembler, StreamOverflow
from raftstate.transport.wirecodec import UNORDERED_KINDS, decode, encode


def _host_pair(
    seed: int, profile: LinkProfile
) -> tuple[SimNetwork, SimLinkHost, SimLinkHost, list[bytes]]:
    net = SimNetwork(random.Random(seed), default=profile)
    got: list[bytes] = []
    a = SimLinkHost(net, "a", lambda _p, _m: None, config=LinkConfig())
    b = SimLinkHost(net, "b", lambda _p, m: got.append(m), config=LinkConfig())
    return net, a, b, got


def _check_order(sent: Sequence[tuple[bytes, bool]], got: list[bytes]) -> None:
    """Exactly once; ordered ones after everything before them; unordered
    ones after every earlier ordered one."""
    assert sorted(got) == sorted(m for m, _ in sent)
    position = {m: i for i, m in enumerate(got)}
    for i, (message, ordered) in enumerate(sent):
        for earlier, earlier_ordered in sent[:i]:
            if ordered or earlier_ordered:
                assert position[earlier] < position[message], (i, ordered)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kinds=st.lists(st.booleans(), min_size=1, max_size=120),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=120),
    loss=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_unordered_messages_overtake_only_unordered_ones_and_arrive_once(
    seed: int, kinds: list[bool], sizes: list[int], loss: float
) -> None:
    profile = LinkProfile(
        delay=0.02, jitter=0.01, loss=loss, loss_correlation=0.3, duplicate=0.05,
        reorder=0.1, reorder_delay=0.03,
    )  # fmt: skip
    net, a, _, got = _host_pair(seed, profile)
    rng = random.Random(seed)
    sent = []
    for i, ordered in enumerate(kinds):
        size = sizes[i % len(sizes)]
        message = i.to_bytes(4, "big") + rng.randbytes(size)
        sent.append((message, ordered))
        net.call_at(i * 0.003, lambda m=message, o=ordered: a.send("b", m, ordered=o))
    net.run_until(60.0)
    _check_order(sent, got)


@pytest.mark.parametrize(("ordered", "expect_first"), [(False, 1), (True, 0)])
def test_a_lost_unordered_message_does_not_hold_back_later_ones(
    ordered: bool, expect_first: int
) -> None:
    """The datagram carrying message 0 is lost: messages 1..9 (unordered)
    are delivered at once, and 0 after its repair; with ordered delivery
    they all wait for it (the test fails if ordering is not relaxed)."""
    net, a, _, got = _host_pair(7, LinkProfile(delay=0.03))
    dropped: list[bytes] = []

    def drop(src: str, dst: str, payload: bytes) -> bool:
        if src == "a" and not dropped and b"m0" in payload:
            dropped.append(payload)
            return True
        return False

    net.set_drop_filter(drop)
    for i in range(10):
        net.call_at(i * 0.004, lambda i=i: a.send("b", b"m%d" % i, ordered=ordered))
    net.run_until(5.0)
    assert dropped
    assert got[0] == b"m%d" % expect_first
    assert sorted(got) == sorted(b"m%d" % i for i in range(10))


def test_an_unordered_message_never_overtakes_an_earlier_ordered_one() -> None:
    """o (ordered) is lost; u (unordered, sent after it) must wait for it."""
    net, a, _, got = _host_pair(3, LinkProfile(delay=0.03))
    state = {"dropped": False}

    def drop(src: str, dst: str, payload: bytes) -> bool:
        if src == "a" and not state["dropped"] and b"ordered!" in payload:
            state["dropped"] = True
            return True
        return False

    net.set_drop_filter(drop)
    net.call_at(0.0, lambda: a.send("b", b"ordered!"))
    net.call_at(0.004, lambda: a.send("b", b"u1", ordered=False))
    net.call_at(0.008, lambda: a.send("b", b"u2", ordered=False))
    net.run_until(5.0)
    assert state["dropped"]
    assert got == [b"ordered!", b"u1", b"u2"] or got == [b"ordered!", b"u2", b"u1"]


# ------------------------------------------------------------- codec, reassembler


@settings(deadline=None)  # one example decodes every prefix: slow on a loaded box
@given(
    st.lists(
        st.tuples(st.integers(0, 2**40), st.binary(min_size=1, max_size=300), st.booleans()),
        max_size=8,
    )
)
def test_tagged_frames_round_trip_and_no_strict_prefix_parses(
    raw: list[tuple[int, bytes, bool]],
) -> None:
    chunks = tuple(
        StreamChunk(off, data, off // 2 if unordered else -1) for off, data, unordered in raw
    )
    frame = Frame(number=9, floor=3, chunks=chunks)
    wire = encode_frame(frame)
    assert decode_frame(wire) == frame
    for cut in range(len(wire)):
        with pytest.raises(FrameError):
            decode_frame(wire[:cut])


def _whole(*messages: bytes) -> bytes:
    return b"".join(encode_varint(len(m)) + m for m in messages)


def test_reassembler_delivers_an_unordered_chunk_once_and_skips_it_in_order() -> None:
    r = Reassembler(1000)
    first = _whole(b"one")
    second = _whole(b"two", b"three")
    assert r.add_unordered(len(first), second, barrier=0) == [b"two", b"three"]
    assert r.add_unordered(len(first), second, barrier=0) == []  # a copy
    r.add(0, first)
    assert r.messages() == [b"one"]  # not two/three again
    r.add(len(first) + len(second), _whole(b"four"))
    assert r.messages() == [b"four"]


def test_reassembler_holds_an_unordered_chunk_until_its_barrier_is_delivered() -> None:
    r = Reassembler(1000)
    first = _whole(b"ordered")
    assert r.add_unordered(len(first), _whole(b"u"), barrier=len(first)) is None


def test_a_misaligned_unordered_chunk_is_a_protocol_error() -> None:
    r = Reassembler(1000)
    with pytest.raises(StreamOverflow):
        r.add_unordered(0, _whole(b"abc")[:-1], barrier=0)
    r = Reassembler(1000)
    assert r.add_unordered(2, _whole(b"xy"), barrier=0) == [b"xy"]
    r.add(0, b"\x05a")  # a 5-byte ordered message that would span the chunk
    r.add(5, b"b")
    with pytest.raises(StreamOverflow):
        r.messages()


# ------------------------------------------------------------- Raft: stale AppendEntries


def _follower_apply(log: list[Any], message: dict[str, Any], guard: bool) -> dict[str, Any]:
    """pysyncobj 0.3.17's follower log rule for an AppendEntries (entries
    form), optionally behind raftstate's append guard; ``log`` holds
    (command, index, term) from index 1 (a sentinel at 0). Returns the reply."""
    cap = None
    if guard:
        message, cap = trim(message, log[message["prevLogIdx"] :])
    prev = message["prevLogIdx"]
    if prev >= len(log) or log[prev][2] != message["prevLogTerm"]:
        return {"type": "next_node_idx", "next_node_idx": len(log), "reset": True,
                "success": False}  # fmt: skip
    del log[prev + 1 :]
    log.extend(tuple(e) for e in message["entries"])
    next_idx = message["entries"][-1][1] + 1 if message["entries"] else prev + 1
    if cap is not None:
        next_idx = min(next_idx, cap + 1)
    return {"type": "next_node_idx", "next_node_idx": next_idx, "reset": False, "success": True}


def _append(prev: int, first: int, last: int) -> dict[str, Any]:
    return {
        "type": "append_entries", "term": 2, "commit_index": 0, "prevLogIdx": prev,
        "prevLogTerm": 0 if prev == 0 else 2,
        "entries": [(b"c%d" % i, i, 2) for i in range(first, last + 1)],
    }  # fmt: skip


def _reorder_run(guard: bool) -> tuple[list[int], list[Any], int]:
    """Leader sends AE(prev 0, entries 1-2) then AE(prev 0, entries 1-4)
    (a resend after a nextIndex reset) over the link, unordered (the
    follower's replies go as production sends them), and the
    datagram of the first is lost: the second is delivered first and the
    first, repaired, arrives stale. Returns the order of the entry counts
    delivered, the follower's log, and the leader's matchIndex (raised only
    on success, as in pysyncobj)."""
    net = SimNetwork(random.Random(1), default=LinkProfile(delay=0.03))
    log: list[Any] = [(b"", 0, 0)]
    delivered: list[int] = []
    match_index = 0

    def at_leader(_peer: str, data: bytes) -> None:
        nonlocal match_index
        reply = decode(data)
        if reply["success"]:
            match_index = max(match_index, reply["next_node_idx"] - 1)

    def at_follower(_peer: str, data: bytes) -> None:
        message = decode(data)
        delivered.append(len(message["entries"]))
        reply = _follower_apply(log, message, guard)
        follower.send("leader", encode(reply), ordered=data[1] not in UNORDERED_KINDS)

    leader = SimLinkHost(net, "leader", at_leader)
    follower = SimLinkHost(net, "follower", at_follower)
    # Sent unordered on purpose: production keeps AppendEntries ordered (an
    # *early* one is refused, see wirecodec.UNORDERED_KINDS); this shows a
    # reordered *stale* one is harmless all the same.
    first, second = encode(_append(0, 1, 2)), encode(_append(0, 1, 4))
    state = {"dropped": False}

    def drop(src: str, dst: str, payload: bytes) -> bool:
        if src == "leader" and not state["dropped"] and b"c2" in payload and b"c3" not in payload:
            state["dropped"] = True
            return True
        return False

    net.set_drop_filter(drop)
    send: Callable[[bytes], bool] = lambda m: leader.send("follower", m, ordered=False)  # noqa: E731
    net.call_at(0.0, lambda: send(first))
    net.call_at(0.004, lambda: send(second))
    net.run_until(5.0)
    assert state["dropped"]
    return delivered, log, match_index


def test_a_reordered_stale_append_entries_keeps_acknowledged_entries() -> None:
    delivered, log, match_index = _reorder_run(guard=True)
    assert delivered == [4, 2]  # the link did reorder: the stale one came last
    assert [e[1] for e in log[1:]] == [1, 2, 3, 4]
    assert match_index == 4  # acknowledged, and still on the follower


def test_without_the_append_guard_the_same_reorder_loses_acknowledged_entries() -> None:
    """The harm the guard prevents (shows the previous test can fail)."""
    delivered, log, match_index = _reorder_run(guard=False)
    assert delivered == [4, 2]
    assert match_index == 4 and len(log) - 1 < 4


def test_reordered_next_index_replies_never_lower_the_leaders_match_index() -> None:
    """Replies sent unordered (``ordered=False``): the one for entries
    1-4 overtakes the lost one for 1-2; the leader, which like pysyncobj
    raises matchIndex only upward, ends at 4 and never goes back."""
    replies = [
        {"type": "next_node_idx", "next_node_idx": n, "reset": False, "success": True}
        for n in (3, 5)
    ]
    wire = [encode(r) for r in replies]
    net, follower, _, got = _host_pair(5, LinkProfile(delay=0.03))
    state = {"dropped": False}

    def drop(src: str, dst: str, payload: bytes) -> bool:
        if src == "a" and not state["dropped"]:
            state["dropped"] = True
            return True
        return False

    net.set_drop_filter(drop)
    for i, w in enumerate(wire):
        net.call_at(i * 0.004, lambda w=w: follower.send("b", w, ordered=False))
    net.run_until(5.0)
    seen = [decode(m)["next_node_idx"] - 1 for m in got]
    assert seen == [4, 2]  # reordered by the link
    match = 0
    history = []
    for index in seen:
        match = max(match, index)
        history.append(match)
    assert history == [4, 4]


def test_an_unordered_message_too_big_for_the_frame_goes_ordered_and_is_not_stuck() -> None:
    """A frame whose room is smaller than an unordered message (a large ACK
    block) sends it as ordered bytes rather than never."""
    from raftstate.transport.outgoing import OutgoingStream

    out = OutgoingStream()
    out.push(b"x" * 900, ordered=False)
    assert out.cut(500) is None
    chunk = out.cut(500, force=True)
    assert chunk is not None and chunk.barrier == -1 and len(chunk.data) == 500


# ------------------------------------------------------- Raft: a reordered reset reply


def _leader_after_replies(monkeypatch: pytest.MonkeyPatch, use_rule: bool) -> tuple[list[str], int]:
    """A follower answers a gapped AppendEntries with a *reset* (its log ends
    at 2) and then, once the leader resent, with a *success* through 8. Both
    go with ``next_node_idx`` unordered; the datagram carrying the reset is
    lost, so the success can overtake it. ``use_rule``: the transport's rule
    (:func:`wirecodec.travels_ordered`: resets stay ordered); otherwise every
    ``next_node_idx`` goes unordered (the rule before). The leader applies
    them through the real ``RaftNode._filter_next_index`` and pysyncobj's
    success rule. Returns the order the kinds arrived in and the final
    matchIndex."""
    from types import SimpleNamespace

    from raftstate import raftnode
    from raftstate.nextindex import ResetGuard
    from raftstate.transport import wirecodec

    monkeypatch.setattr(wirecodec, "UNORDERED_KINDS", frozenset({5, 6, 7, 8, 9}))
    class _Node:
        id = "f"

    node = _Node()
    matches = {node: 0}
    leader = SimpleNamespace(
        _isLeader=lambda: True, _SyncObj__raftMatchIndex=matches,
        _reset_guard=ResetGuard(), raftCurrentTerm=2,
    )  # fmt: skip
    leader._forget_lost_entries = raftnode.RaftNode._forget_lost_entries.__get__(leader)
    arrived: list[str] = []

    def at_leader(_peer: str, data: bytes) -> None:
        message = raftnode.RaftNode._filter_next_index(leader, node, decode(data))
        arrived.append("reset" if decode(data)["reset"] else "success")
        if message["success"] and matches[node] < message["next_node_idx"] - 1:
            matches[node] = message["next_node_idx"] - 1  # pysyncobj's leader

    net = SimNetwork(random.Random(3), default=LinkProfile(delay=0.03))
    SimLinkHost(net, "leader", at_leader)
    follower = SimLinkHost(net, "follower", lambda _p, _m: None)
    state = {"dropped": False}

    def drop(src: str, dst: str, payload: bytes) -> bool:
        if src == "follower" and not state["dropped"]:
            state["dropped"] = True  # the reset's first transmission
            return True
        return False

    net.set_drop_filter(drop)
    replies = [
        {"type": "next_node_idx", "next_node_idx": 3, "reset": True, "success": False},
        {"type": "next_node_idx", "next_node_idx": 9, "reset": False, "success": True},
    ]
    for i, reply in enumerate(replies):
        data = encode(reply)
        ordered = wirecodec.travels_ordered(data) if use_rule else False
        net.call_at(i * 0.004, lambda d=data, o=ordered: follower.send("leader", d, ordered=o))
    net.run_until(5.0)
    assert state["dropped"]
    return arrived, matches[node]


def test_a_reset_reply_is_never_overtaken_so_the_leader_keeps_its_match_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrived, match = _leader_after_replies(monkeypatch, use_rule=True)
    assert arrived == ["reset", "success"]
    assert match == 8


def test_an_overtaken_reset_reply_lowers_the_leaders_match_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What stalled the leader's site with unordered replies on: the success
    overtakes the lost reset, which then reads as "the follower lost entries
    it had acknowledged" and takes matchIndex from 8 back to 2."""
    arrived, match = _leader_after_replies(monkeypatch, use_rule=False)
    assert arrived == ["success", "reset"]
    assert match == 2


def test_only_success_replies_of_the_unordered_kinds_travel_unordered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from raftstate.transport import wirecodec

    monkeypatch.setattr(wirecodec, "UNORDERED_KINDS", frozenset({5}))
    reset = encode({"type": "next_node_idx", "next_node_idx": 3, "reset": True, "success": False})
    ok = encode({"type": "next_node_idx", "next_node_idx": 3, "reset": False, "success": True})
    vote = encode({"type": "request_vote", "term": 3, "last_log_index": 1, "last_log_term": 1})
    assert wirecodec.travels_ordered(reset)
    assert not wirecodec.travels_ordered(ok)
    assert wirecodec.travels_ordered(vote)
    monkeypatch.setattr(wirecodec, "UNORDERED_KINDS", frozenset())
    assert wirecodec.travels_ordered(ok)
