"""Batch entry format 2: applies exactly like format 1, and a damaged entry
changes nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate import batchentry, devicerecord
from raftstate.admission import Quota, state_bytes
from raftstate.errors import DecodeError
from raftstate.model import DEVICE_ID_MAX, validate_heartbeat
from raftstate.statemachine import DeviceTable, encode_batch, encode_batch_v1

device_ids = st.text(alphabet="abXY09._:-", min_size=1, max_size=DEVICE_ID_MAX)
reported = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=30), max_size=6)


@st.composite
def heartbeats(draw: st.DrawFn) -> list:  # type: ignore[type-arg]
    ids = draw(st.lists(device_ids, min_size=1, max_size=5))
    return [
        validate_heartbeat(
            draw(st.sampled_from(ids)),
            draw(st.integers(1, 2**64 - 1)),
            draw(reported),
            draw(st.integers(0, 3600)),
        )
        for _ in range(draw(st.integers(0, 12)))
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(heartbeats(), max_size=8), st.integers(0, 3), st.integers(0, 400))
def test_format_2_applies_exactly_like_format_1(
    batches: list,
    max_devices: int,
    max_state_bytes: int,  # type: ignore[type-arg]
) -> None:
    quota = Quota(max_devices, max_state_bytes)
    v1, v2 = DeviceTable(), DeviceTable()
    for n, hbs in enumerate(batches):
        r1 = v1.apply(encode_batch_v1(hbs, 1000 + n, quota))
        r2 = v2.apply(encode_batch(hbs, 1000 + n, quota))
        assert r1 == r2
    assert v1.digest() == v2.digest()
    assert v1.state_bytes == v2.state_bytes
    assert v2.state_bytes == sum(
        state_bytes(d.device_id, d.reported) for d in (v2.get(i) for i in v2._recs) if d is not None
    )


@given(heartbeats())
def test_records_decode_what_encode_wrote(hbs: list) -> None:  # type: ignore[type-arg]
    entry = batchentry.encode(hbs, 77, Quota(5, 6))
    now, quota, count = batchentry.decode_head(entry)
    assert (now, quota, count) == (77, Quota(5, 6), len(hbs))
    got = list(batchentry.records(entry, count))
    assert [(g[0], g[1], g[2]) for g in got] == [(h.device_id, h.seq, h.ttl_s) for h in hbs]
    assert [g[3] for g in got] == [state_bytes(h.device_id, h.reported) for h in hbs]


def test_every_cut_or_extension_of_an_entry_is_refused_and_changes_nothing() -> None:
    rng = random.Random(4)
    hbs = [validate_heartbeat(f"d{i}", i + 1, {"k": "v" * rng.randrange(50)}, 0) for i in range(8)]
    entry = encode_batch(hbs, 5)
    for cut in range(1, len(entry)):
        t = DeviceTable()
        with pytest.raises(DecodeError):
            t.apply(entry[:cut])
        assert len(t) == 0 and t.revision == 0
    t = DeviceTable()
    with pytest.raises(DecodeError):
        t.apply(entry + b"\0")
    assert len(t) == 0


def test_the_longest_device_id_round_trips() -> None:
    """128 characters need a two-byte length in the record."""
    long_id = "x" * DEVICE_ID_MAX
    t = DeviceTable()
    t.apply(encode_batch([validate_heartbeat(long_id, 3, {"a": "b"}, 0)], 1))
    d = t.get(long_id)
    assert d is not None and d.seq == 3 and d.reported == {"a": "b"}
    assert batchentry.id_at(t._recs[long_id], devicerecord.HEAD_SIZE) == long_id
