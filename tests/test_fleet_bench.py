"""``raftstate bench --fleet``: the pure pieces (pre-encoded requests, the
latency histogram, the gateways' walk over devices, phase plans, verdicts)."""

from __future__ import annotations

import argparse
import math

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fleet import fleet_specs
from bench.fleetdrive import ETCD_MAX_TXN_OPS, FleetSpec, _Cursor, shape
from bench.fleetstats import (
    FleetPhaseResult,
    LatencyHistogram,
    fleet_verdicts,
    merged,
)
from bench.fleetwatch import Checkpoint, NodeState, between
from bench.fleetwire import FleetDevices, fleet_device_id, varint
from bench.run import add_bench_arguments
from bench.stats import percentile
from raftstate.v1 import device_pb2

SEQS = st.integers(min_value=1, max_value=2**64 - 1)
REPORTED = st.dictionaries(
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12),
    st.text(max_size=40),
    max_size=6,
)


# ---- pre-encoded requests --------------------------------------------------


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_decodes_back_to_the_number(n: int) -> None:
    msg = device_pb2.HeartbeatRequest.FromString(b"\x10" + varint(n))
    assert msg.seq == n


def test_varint_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


@settings(max_examples=60, deadline=None)
@given(
    first=st.integers(min_value=0, max_value=9_999_000),
    count=st.integers(min_value=1, max_value=40),
    seq=SEQS,
    reported=REPORTED,
    data=st.data(),
)
def test_heartbeat_batch_bytes_parse_as_the_batch_of_those_devices(
    first: int, count: int, seq: int, reported: dict[str, str], data: st.DataObject
) -> None:
    devs = FleetDevices.make(first, count, reported)
    idx = data.draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=count, unique=True))
    batch = device_pb2.HeartbeatBatchRequest.FromString(devs.heartbeat_batch(idx, seq))
    assert [h.device_id for h in batch.heartbeats] == [fleet_device_id(first + i) for i in idx]
    assert all(h.seq == seq and dict(h.reported) == reported for h in batch.heartbeats)
    one = device_pb2.HeartbeatRequest.FromString(devs.heartbeat(idx[0], seq))
    assert one == batch.heartbeats[0]


def _etcd_txn_class() -> type:
    """etcd's TxnRequest / RequestOp / PutRequest (the fields used), built
    from a descriptor here, independently of the hand encoder."""
    f = descriptor_pb2.FileDescriptorProto(name="fleet_etcd_test.proto", package="t")
    put = f.message_type.add(name="PutRequest")
    put.field.add(name="key", number=1, type=12, label=1)
    put.field.add(name="value", number=2, type=12, label=1)
    op = f.message_type.add(name="RequestOp")
    op.field.add(name="request_put", number=2, type=11, label=1, type_name=".t.PutRequest")
    txn = f.message_type.add(name="TxnRequest")
    txn.field.add(name="success", number=2, type=11, label=3, type_name=".t.RequestOp")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    cls: type = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.TxnRequest"))
    return cls


def test_etcd_txn_bytes_are_one_put_per_device_with_the_seq_in_its_json() -> None:
    import json

    devs = FleetDevices.make(5, ETCD_MAX_TXN_OPS)
    txn = _etcd_txn_class().FromString(devs.etcd_txn(range(ETCD_MAX_TXN_OPS), 1234567))
    assert len(txn.success) == ETCD_MAX_TXN_OPS
    first = txn.success[0].request_put
    assert first.key == b"/devices/" + fleet_device_id(5).encode()
    assert json.loads(first.value) == {"seq": 1234567, "temp_c": "21.5", "battery_pct": "87"}
    assert len({op.request_put.key for op in txn.success}) == ETCD_MAX_TXN_OPS


# ---- histogram -----------------------------------------------------------


@given(st.lists(st.floats(min_value=0.01, max_value=60_000), min_size=1, max_size=400))
def test_histogram_percentiles_are_within_one_percent_of_the_exact_ones(xs: list[float]) -> None:
    h = LatencyHistogram()
    for x in xs:
        h.add(x)
    exact = sorted(xs)
    for q in (50, 99, 99.9, 100):
        assert h.percentile(q) == pytest.approx(percentile(exact, q), rel=0.0101)
    assert h.count == len(xs) and h.max_ms == max(xs)


@given(
    st.lists(st.tuples(st.floats(0.01, 1000), st.integers(1, 50)), max_size=30),
    st.lists(st.tuples(st.floats(0.01, 1000), st.integers(1, 50)), max_size=30),
)
def test_merged_histograms_equal_one_histogram_of_all_samples(
    a: list[tuple[float, int]], b: list[tuple[float, int]]
) -> None:
    ha, hb, hall = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for ms, n in a:
        ha.add(ms, n)
        hall.add(ms, n)
    for ms, n in b:
        hb.add(ms, n)
        hall.add(ms, n)
    m = merged([ha, hb])
    assert m.buckets == hall.buckets and m.count == hall.count
    assert m.summary() == hall.summary()


def test_empty_histogram_has_no_percentiles() -> None:
    assert math.isnan(LatencyHistogram().percentile(50))


# ---- a gateway's walk over its devices --------------------------------------


@given(
    members=st.integers(1, 300),
    caps=st.lists(st.integers(1, 400), min_size=1, max_size=50),
)
def test_cursor_batches_hold_distinct_devices_and_a_device_s_seq_only_grows(
    members: int, caps: list[int]
) -> None:
    cursor = _Cursor(range(0, members * 3, 3), seq0=1000)
    last: dict[int, int] = {}
    for cap in caps:
        chunk, seq = cursor.take(cap)
        assert 1 <= len(chunk) <= cap
        assert len(set(chunk)) == len(chunk)
        for i in chunk:
            assert seq > last.get(i, 0)
            last[i] = seq


def test_stream_and_txn_paths_get_their_own_request_shapes() -> None:
    base = FleetSpec("raftstate", "batch", ("a",), 0, 10, 0, 1, "hold", 1, 0.0, batch_max=1000)
    assert shape(base) == (1000, 2)
    # etcd: 128 Puts per Txn, and as many heartbeats in flight (8 x 128 >= 2 x 500).
    assert shape(FleetSpec(**{**_fields(base), "path": "txn", "batch_max": 500})) == (
        ETCD_MAX_TXN_OPS,
        8,
    )
    cap, flight = shape(FleetSpec(**{**_fields(base), "path": "stream"}))
    assert cap < 1000 and flight > 2


def _fields(spec: FleetSpec) -> dict[str, object]:
    return {f: getattr(spec, f) for f in FleetSpec.__dataclass_fields__}


# ---- phase plans -----------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(["--fleet", *argv])


@given(
    devices=st.integers(1, 2_000_000),
    gateways=st.integers(1, 64),
    procs=st.integers(1, 8),
    rate=st.floats(1, 100_000),
)
def test_fleet_specs_deal_out_every_device_gateway_and_the_whole_rate(
    devices: int, gateways: int, procs: int, rate: float
) -> None:
    args = _args(
        "--fleet-devices", str(devices), "--fleet-gateways", str(gateways),
        "--procs", str(procs), "--fleet-rate", repr(rate),
    )  # fmt: skip
    specs = fleet_specs("raftstate", "batch", ["a", "b", "c"], "hold", args, 0.0, 1)
    assert sum(s.devices for s in specs) == devices
    assert sum(s.gateways for s in specs) == gateways
    assert sum(s.rate_per_s for s in specs) == pytest.approx(rate)
    firsts = [s.first_device for s in specs]
    assert firsts == sorted(firsts) and firsts[0] == 0
    assert [s.first_gateway for s in specs] == [
        sum(x.gateways for x in specs[:i]) for i in range(len(specs))
    ]


@pytest.mark.parametrize("bad", ["0", "-5", "x"])
def test_fleet_options_refuse_non_positive_sizes(bad: str) -> None:
    with pytest.raises(SystemExit):
        _args("--fleet-devices", bad)


# ---- verdicts and the watch's arithmetic ------------------------------------


def _row(system: str, phase: str, **kw: object) -> FleetPhaseResult:
    base: dict[str, object] = dict(
        seconds=1.0, offered_per_s=100.0, acked_per_s=100.0, acked=100, errors=0,
        latency_ms={"p50": 1.0, "p99": 10.0, "p999": 20.0}, server_cpu_s={},
        server_cpu_us_per_ack=50.0, load_cpu_s=0.0, load_cpu_us_per_ack=0.0,
    )  # fmt: skip
    base.update(kw)
    return FleetPhaseResult(system, phase, **base)  # type: ignore[arg-type]


def test_verdicts_miss_a_hold_with_an_election_or_a_slow_p99_and_meet_a_clean_one() -> None:
    clean = fleet_verdicts([_row("raftstate", "hold")], 100.0)
    assert all(v.endswith("met") for v in clean), clean
    slow = fleet_verdicts([_row("raftstate", "hold", latency_ms={"p99": 51.0})], 100.0)
    assert any("MISSED" in v and "p99" in v for v in slow)
    elected = fleet_verdicts([_row("raftstate", "hold", term_changes=1)], 100.0)
    assert any("MISSED" in v and "leader change" in v for v in elected)


def test_verdicts_compare_saturation_and_cpu_with_etcd_and_never_pass_zero_acks() -> None:
    rows = [
        _row("raftstate", "saturate", acked_per_s=0.0, acked=0, server_cpu_us_per_ack=0.0),
        _row("etcd", "saturate", acked_per_s=20_000.0, server_cpu_us_per_ack=30.0),
    ]
    assert all("MISSED" in v for v in fleet_verdicts(rows, 100.0))
    rows[0] = _row("raftstate", "saturate", acked_per_s=25_000.0, server_cpu_us_per_ack=55.0)
    assert all(v.endswith("met") for v in fleet_verdicts(rows, 100.0))


def _cp(term: int, leaders: int, compactions: int, stalls: int) -> Checkpoint:
    return Checkpoint(
        at=0.0, max_term=term, leader_changes=leaders, compactions={"n1": compactions},
        nodes={"n1": NodeState(term=term, tick_stalls=stalls, max_tick_ms=12.5)},
        rss_kib={"n1": 2048}, hwm_kib={"n1": 4096}, polls=1,
    )  # fmt: skip


def test_a_phase_is_the_difference_of_two_checkpoints() -> None:
    w = between(_cp(3, 1, 2, 5), _cp(5, 2, 6, 7))
    assert (w.term_changes, w.leader_changes) == (2, 1)
    assert w.compactions == {"n1": 4} and w.tick_stalls == {"n1": 2}
    assert w.rss_mib == {"n1": 2.0} and w.peak_rss_mib == {"n1": 4.0}
    # A restarted node's counters start again from zero: never negative.
    assert between(_cp(5, 2, 6, 7), _cp(5, 2, 6, 1)).tick_stalls == {"n1": 0}
