"""The wire codec (raftstate/transport/wirecodec.py), the TCP frame bodies
(tcpframe.py) and the log command format (logcommand.py): exact round trips,
strict rejection, and no pickle anywhere on the receive path."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysyncobj.node import TCPNode

from raftstate import logcommand
from raftstate.errors import DecodeError, EncodeError
from raftstate.transport import tcpframe, wirecodec
from raftstate.transport.udp import UdpTransport
from raftstate.transport.udpconfig import settings_for

I64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
SMALL_BYTES = st.binary(max_size=64)


def _field(code: str) -> st.SearchStrategy[Any]:
    if code == "q":
        return I64
    if code == "b":
        return st.booleans()
    if code == "d":
        return st.floats(allow_nan=False, allow_infinity=False)
    if code == "n":
        return st.none() | I64
    if code == "y":
        return st.binary(max_size=256)
    if code == "E":
        return st.lists(st.tuples(SMALL_BYTES, I64, I64), max_size=20)
    assert code == "S"
    return st.none() | st.tuples(st.binary(max_size=256), st.booleans(), st.booleans())


def _message(schema: wirecodec.Schema) -> st.SearchStrategy[dict[str, Any]]:
    fields = {name: _field(code) for name, code in schema.fields}
    return st.fixed_dictionaries({"type": st.just(schema.type), **fields})


ANY_MESSAGE = st.one_of(*(_message(s) for s in wirecodec.SCHEMAS))
ALLOWED = (type(None), bool, int, float, str, bytes, list, tuple, dict)


def same_shape(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types all the way down (``==`` alone
    treats ``True == 1`` and ignores nothing else we care about)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_shape(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_shape(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def only_allowed_types(value: Any) -> bool:
    if type(value) not in ALLOWED:
        return False
    if isinstance(value, dict):
        return all(type(k) is str and only_allowed_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(only_allowed_types(v) for v in value)
    return True


# ---- round trips -----------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(ANY_MESSAGE)
def test_every_schema_round_trips_with_exact_types(message: dict[str, Any]) -> None:
    decoded = wirecodec.decode(wirecodec.encode(message))
    assert same_shape(decoded, message)


@pytest.mark.parametrize(
    "message",
    [
        # pysyncobj's shapes, written out as syncobj.py builds them
        {"type": "request_vote", "term": 7, "last_log_index": 0, "last_log_term": 0},
        {"type": "response_vote", "term": 7},
        {"type": "append_entries", "term": 3, "commit_index": 10, "entries": [],
         "prevLogIdx": None, "prevLogTerm": None},
        {"type": "append_entries", "term": 3, "commit_index": 10,
         "entries": [(b"\x01", 11, 3), (b"\x00RSB\x01" + b"x" * 2048, 12, 3)],
         "prevLogIdx": 10, "prevLogTerm": 2},
        {"type": "append_entries", "term": 3, "commit_index": 10, "serialized": None},
        {"type": "append_entries", "term": 3, "commit_index": 10,
         "serialized": (b"snap", True, False)},
        {"type": "append_entries", "term": 3, "commit_index": 10,
         "serialized": (b"", False, True)},
        {"type": "next_node_idx", "next_node_idx": 12, "reset": False, "success": True},
        {"type": "apply_command", "command": b"\x00RSB\x01batch"},
        {"type": "apply_command", "command": b"\x00RSB\x01batch", "request_id": 4},
        {"type": "apply_command_response", "request_id": 4, "error": 3},
        {"type": "apply_command_response", "request_id": 4, "log_idx": 9, "log_term": 2},
        {"type": "timeout_now", "term": 5},
        # raftstate's own
        {"type": "rs_ri_probe", "term": 5, "round": 1},
        {"type": "rs_ri_ack", "term": 5, "round": 1},
        {"type": "rs_ri_req", "id": 1, "timeout": 0.25},
        {"type": "rs_ri_grant", "id": 1, "read_index": 40},
        {"type": "rs_ri_fail", "id": 1},
        {"type": "rs_prevote", "term": 6, "last_log_index": 40, "last_log_term": 5},
        {"type": "rs_prevote_resp", "term": 6, "granted": True},
        # edge values
        {"type": "request_vote", "term": (1 << 63) - 1, "last_log_index": -(1 << 63),
         "last_log_term": 0},
    ],
)  # fmt: skip
def test_each_message_pysyncobj_and_raftstate_send_round_trips(message: dict[str, Any]) -> None:
    assert same_shape(wirecodec.decode(wirecodec.encode(message)), message)


def test_entries_decode_as_a_list_of_bytes_int_int_tuples_as_pysyncobj_indexes_them() -> None:
    msg = {"type": "append_entries", "term": 1, "commit_index": 0,
           "entries": [(b"a", 1, 1), (b"b", 2, 1)], "prevLogIdx": 0, "prevLogTerm": 0}  # fmt: skip
    out = wirecodec.decode(wirecodec.encode(msg))
    entries = out["entries"]
    assert type(entries) is list and all(type(e) is tuple for e in entries)
    assert entries[-1][1] + 1 == 3  # pysyncobj: nextNodeIdx = newEntries[-1][1] + 1
    command, idx, term = entries[0]
    assert (type(command), type(idx), type(term)) == (bytes, int, int)


def test_largest_message_round_trips_and_one_byte_more_is_refused() -> None:
    head = len(wirecodec.encode({"type": "apply_command", "command": b""}))
    room = wirecodec.MAX_MESSAGE_BYTES - head
    big = {"type": "apply_command", "command": b"z" * room}
    data = wirecodec.encode(big)
    assert len(data) == wirecodec.MAX_MESSAGE_BYTES
    assert wirecodec.decode(data) == big
    with pytest.raises(EncodeError, match="exceeds"):
        wirecodec.encode({"type": "apply_command", "command": b"z" * (room + 1)})
    with pytest.raises(DecodeError, match="exceeds"):
        wirecodec.decode(data + b"\x00")


# ---- strict encoding ---------------------------------------------------------------


def test_chunked_transmission_append_entries_is_not_encodable() -> None:
    msg = {"type": "append_entries", "transmission": "start", "data": b"\x80\x02...",
           "term": 3, "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 1}  # fmt: skip
    with pytest.raises(EncodeError, match="transmission"):
        wirecodec.encode(msg)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "no_such_type", "term": 1},
        {"type": "response_vote"},  # missing key
        {"type": "response_vote", "term": 1, "extra": 2},  # extra key
        {"type": "response_vote", "term": True},  # bool is not an int here
        {"type": "response_vote", "term": 1 << 63},  # out of range
        {"type": "response_vote", "term": 1.0},
        {"type": "next_node_idx", "next_node_idx": 1, "reset": 0, "success": True},
        {"type": "rs_ri_req", "id": 1, "timeout": float("nan")},
        {"type": "rs_ri_req", "id": 1, "timeout": 10**400},
        {"type": "apply_command", "command": "text"},
        {"type": "append_entries", "term": 1, "commit_index": 0, "entries": ((b"", 1, 1),),
         "prevLogIdx": 0, "prevLogTerm": 0},  # a tuple of entries, not a list
        {"type": "append_entries", "term": 1, "commit_index": 0, "entries": [[b"", 1, 1]],
         "prevLogIdx": 0, "prevLogTerm": 0},  # an entry that is a list
        {"type": "append_entries", "term": 1, "commit_index": 0, "serialized": False},
        {"type": "append_entries", "term": 1, "commit_index": 0, "serialized": (b"", 1, 0)},
        {"type": "rs_ri_probe", "term": 1, "round": 1, "node": TCPNode("127.0.0.1:1")},
    ],
)  # fmt: skip
def test_anything_off_schema_raises_encode_error(message: dict[str, Any]) -> None:
    with pytest.raises(EncodeError):
        wirecodec.encode(message)


def test_a_non_dict_raises_encode_error() -> None:
    with pytest.raises(EncodeError):
        wirecodec.encode(["status"])  # type: ignore[arg-type]


# ---- strict, total decoding ----------------------------------------------------------


def _decode_or_reject(data: bytes) -> None:
    try:
        out = wirecodec.decode(data)
    except DecodeError:
        return
    assert isinstance(out, dict) and only_allowed_types(out)
    assert out["type"] in {s.type for s in wirecodec.SCHEMAS}


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_only_raises_decode_error_or_yields_primitives(
    data: bytes,
) -> None:
    _decode_or_reject(data)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(ANY_MESSAGE, st.data())
def test_decoding_mutated_messages_only_raises_decode_error_or_yields_primitives(
    message: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(wirecodec.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
    _decode_or_reject(bytes(raw))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x02\x02" + bytes(8),  # unknown version
        b"\x01\xff",  # unknown kind
        wirecodec.encode({"type": "response_vote", "term": 1})[:-1],  # truncated
        wirecodec.encode({"type": "response_vote", "term": 1}) + b"\x00",  # trailing
        # bool byte 2
        wirecodec.encode({"type": "rs_prevote_resp", "term": 1, "granted": True})[:-1] + b"\x02",
        # an entry count far beyond the bytes that follow
        wirecodec.encode({"type": "append_entries", "term": 1, "commit_index": 0,
                          "entries": [], "prevLogIdx": 0, "prevLogTerm": 0})[:-4]
        + b"\xff\xff\xff\x7f",
        pickle.dumps({"type": "response_vote", "term": 1}),
    ],
)  # fmt: skip
def test_malformed_input_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wirecodec.decode(data)


# ---- TCP frame bodies ----------------------------------------------------------------

KEY = bytes(range(32))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(ANY_MESSAGE, st.binary(min_size=32, max_size=32), st.text(max_size=60)),
    st.none() | st.just(KEY),
)
def test_tcp_bodies_round_trip_messages_keys_and_addresses(value: Any, key: bytes | None) -> None:
    assert same_shape(tcpframe.decode_body(tcpframe.encode_body(value, key), key), value)


def test_tcp_body_must_carry_exactly_the_receivers_connection_key() -> None:
    body = tcpframe.encode_body({"type": "response_vote", "term": 1}, KEY)
    with pytest.raises(DecodeError, match="wrong connection key"):
        tcpframe.decode_body(body, bytes(32))
    with pytest.raises(DecodeError, match="wrong connection key"):
        tcpframe.decode_body(body, None)
    with pytest.raises(DecodeError, match="lacks"):
        tcpframe.decode_body(tcpframe.encode_body({"type": "response_vote", "term": 1}, None), KEY)


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=120), st.none() | st.just(KEY))
def test_tcp_body_decoding_only_raises_decode_error(data: bytes, key: bytes | None) -> None:
    try:
        out = tcpframe.decode_body(data, key)
    except DecodeError:
        return
    assert only_allowed_types(out)


def test_tcp_frame_length_is_refused_from_the_header_alone() -> None:
    assert tcpframe.frame_length(tcpframe.HEADER.pack(tcpframe.MAX_FRAME_BYTES)) > 0
    with pytest.raises(DecodeError, match="limit"):
        tcpframe.frame_length(tcpframe.HEADER.pack(2**31 - 1))
    with pytest.raises(DecodeError):
        tcpframe.frame_length(b"\x00\x00")


def test_tcp_values_outside_the_handshake_kinds_are_not_sendable() -> None:
    for value in (["status"], ("k", {}), 7, b"short-key"):
        with pytest.raises(EncodeError):
            tcpframe.encode_body(value, None)


# ---- log commands --------------------------------------------------------------------


def test_log_command_round_trips_a_batch_and_treats_no_op_as_none() -> None:
    assert logcommand.decode(logcommand.encode(b"batch-bytes")) == b"batch-bytes"
    assert logcommand.decode(logcommand.encode(b"")) == b""
    assert logcommand.decode(b"\x01") is None
    assert logcommand.is_batch(logcommand.encode(b"x"))


@pytest.mark.parametrize(
    "command",
    [
        b"\x00" + pickle.dumps((0, (b"batch",)), 2),  # pysyncobj's @replicated format
        b"\x02" + pickle.dumps(["add", "n4", None], 2),  # membership
        b"\x03" + pickle.dumps(2, 2),  # version
        b"",
        b"\x00RSB\x02batch",  # a future format version
    ],
)
def test_any_other_log_command_raises_decode_error(command: bytes) -> None:
    assert not logcommand.is_batch(command)
    with pytest.raises(DecodeError, match="not a raftstate command"):
        logcommand.decode(command)


# ---- no pickle on the UDP receive path -------------------------------------------------


class _Evil:
    """Unpickling this creates ``path``: the proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _FakeSyncObj:
    def addOnTickCallback(self, cb: Any) -> None:  # noqa: N802
        pass

    def removeOnTickCallback(self, cb: Any) -> None:  # noqa: N802
        pass


def test_udp_transport_never_unpickles_an_authenticated_payload(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps({"type": "response_vote", "term": _Evil(str(sentinel))}, 2)
    peer = TCPNode("127.0.0.1:9")
    settings_ = settings_for(
        "n1", "127.0.0.1:0", [("n1", "127.0.0.1:0"), ("n2", peer.address)],
        "an-authenticated-cluster-secret", dead_after=5.0,
    )  # fmt: skip
    transport = UdpTransport(_FakeSyncObj(), TCPNode("127.0.0.1:0"), [peer], settings=settings_)
    try:
        transport.waitReady()
        got: list[tuple[Any, Any]] = []
        transport.setOnMessageReceivedCallback(lambda node, msg: got.append((node, msg)))
        good = {"type": "rs_ri_probe", "term": 3, "round": 1}
        # What the channel + link hand the tick thread after authentication.
        transport._inbox.append(("msg", "n2", evil))
        transport._inbox.append(("msg", "n2", wirecodec.encode(good)))
        transport._drain()  # must not raise into pysyncobj's tick
        assert not sentinel.exists()
        assert got == [(peer, good)]
        deadline = time.monotonic() + 5
        while transport.drop_counts().get("undecodable") != 1:
            assert time.monotonic() < deadline, transport.drop_counts()
            time.sleep(0.01)
    finally:
        transport.destroy()
    assert not os.path.exists(sentinel)
