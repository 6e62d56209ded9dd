"""Watch wire encoding (raftstate/watchwire.py): the hand-written Event bytes
parse to exactly the message the protobuf library builds, for records from
the whole allowed range, and responses concatenate into a WatchResponse."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from watchfakes import Ev

from raftstate import devicerecord
from raftstate.internal.v1 import storage_pb2
from raftstate.model import DEVICE_ID_MAX, REPORTED_MAX_BYTES, REPORTED_MAX_ENTRIES
from raftstate.v1 import device_pb2
from raftstate.watchwire import encode_event, event_pb, response

I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
ids = st.text("abcXYZ019._:-", min_size=1, max_size=DEVICE_ID_MAX)
reported = st.dictionaries(
    st.text(min_size=1, max_size=16), st.text(max_size=200), max_size=REPORTED_MAX_ENTRIES
).filter(
    lambda m: sum(len(k.encode()) + len(v.encode()) for k, v in m.items()) <= REPORTED_MAX_BYTES
)


@st.composite
def records(draw: st.DrawFn, device_id: str) -> bytes:
    seq = draw(U64)
    body = storage_pb2.HeartbeatRecord(
        device_id=device_id, seq=seq, reported=draw(reported), ttl_s=draw(st.integers(0, 2**32 - 1))
    ).SerializeToString()
    return devicerecord.pack(
        seq, draw(U64), draw(I64), draw(I64), draw(U64), draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)), body, draw(I64), draw(st.sampled_from([0, 1])),
    )  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> Ev:
    device_id = draw(ids)
    after = draw(st.none() | records(device_id))
    before = draw(st.none() | records(device_id))
    return Ev(draw(U64), device_id, draw(st.integers(0, 63)), after, before, 0, draw(I64))


@settings(max_examples=300, deadline=None)
@given(ev=events(), prev=st.booleans())
def test_hand_encoded_events_parse_to_the_reference_message(ev: Ev, prev: bool) -> None:
    data = encode_event(ev, prev)
    assert data[0] == 0x0A
    wrapped = device_pb2.WatchResponse.FromString(response([data], 7))
    assert wrapped.revision == 7
    [got] = wrapped.events
    assert got == event_pb(ev, prev)


def test_the_largest_reported_state_round_trips() -> None:
    big = {f"k{i:02d}": "v" * (REPORTED_MAX_BYTES // REPORTED_MAX_ENTRIES - 3) for i in range(64)}
    body = storage_pb2.HeartbeatRecord(device_id="d" * DEVICE_ID_MAX, seq=1, reported=big)
    rec = devicerecord.pack(1, 5, 1, 2, 1, 30, 0, body.SerializeToString(), 2, 0)
    ev = Ev(5, "d" * DEVICE_ID_MAX, 2 | 4, rec, None, 0, 2)
    [got] = device_pb2.WatchResponse.FromString(encode_event(ev, True)).events
    assert dict(got.device.reported) == big and got.device.online
