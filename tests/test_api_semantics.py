"""What proto/raftstate/v1/device.proto promises about a heartbeat's fields,
checked on the state machine every node applies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from raftstate.model import TTL_MAX_S, Heartbeat
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete

MAPS = st.dictionaries(st.text("abc", min_size=1, max_size=3), st.text(max_size=3), max_size=5)


@given(first=MAPS, second=MAPS)
def test_reported_replaces_the_whole_map(first: dict[str, str], second: dict[str, str]) -> None:
    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("d", 1, first)], 1))
    t.apply(encode_batch([Heartbeat("d", 2, second)], 2))
    d = t.get("d")
    assert d is not None and dict(d.reported) == second


@given(default=st.integers(1, TTL_MAX_S), ttl=st.integers(1, TTL_MAX_S))
def test_ttl_zero_keeps_the_devices_ttl_and_means_the_default_only_for_a_new_device(
    default: int, ttl: int
) -> None:
    t = DeviceTable(default_ttl_s=default)
    t.apply(encode_batch([Heartbeat("d", 1, {})], 1))  # new device, ttl_s 0
    d = t.get("d")
    assert d is not None and d.ttl_s == default
    t.apply(encode_batch([Heartbeat("d", 2, {}, ttl_s=ttl)], 2))
    t.apply(encode_batch([Heartbeat("d", 3, {})], 3))  # 0: keep
    d = t.get("d")
    assert d is not None and d.ttl_s == ttl
    t.apply_control(encode_delete("d", 4))
    t.apply(encode_batch([Heartbeat("d", 1, {})], 5))  # recreated: the default again
    d = t.get("d")
    assert d is not None and d.ttl_s == default
