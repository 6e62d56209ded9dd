"""Sans-IO bounds: gates, quotas in the state machine, page fitting, and the
rate-limited log's memory and line budget."""

from __future__ import annotations

import random

import pytest

from raftstate import snapshotfile
from raftstate.admission import Gate, Quota, fit_page, quota_refusal, state_bytes
from raftstate.errors import QuotaExceeded, ResourceExhausted, from_status
from raftstate.model import Heartbeat
from raftstate.ratelog import LogThrottle
from raftstate.statemachine import DeviceTable, encode_batch


def test_a_gate_refuses_past_its_limit_naming_the_field_and_frees_on_leave() -> None:
    gate = Gate("max_streams", 2, "open streams")
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    err = gate.refusal()
    assert isinstance(err, ResourceExhausted) and err.message.startswith("max_streams: ")
    assert "max_streams = 2" in err.message
    gate.leave()
    assert gate.try_enter() and gate.open == 2 and gate.refused == 1


def _hb(device_id: str, seq: int, value: str = "") -> Heartbeat:
    reported = {"v": value} if value else {}
    return Heartbeat(device_id, seq, reported, 0, sum(len(k) + len(v) for k, v in reported.items()))


def _apply(table: DeviceTable, quota: Quota, *hbs: Heartbeat) -> list[str]:
    return [r.rejected for r in table.apply(encode_batch(hbs, 1000, quota))]


def test_the_device_quota_refuses_new_devices_but_not_updates() -> None:
    table = DeviceTable()
    quota = Quota(max_devices=2)
    assert _apply(table, quota, _hb("a", 1), _hb("b", 1), _hb("c", 1)) == ["", "", "max_devices"]
    assert table.get("c") is None and len(table) == 2
    revision = table.revision
    assert _apply(table, quota, _hb("a", 2, "x" * 100)) == [""]  # existing: still updatable
    assert table.revision == revision + 1


def test_the_byte_quota_refuses_growth_but_accepts_shrinking_at_the_quota() -> None:
    table = DeviceTable()
    quota = Quota(max_state_bytes=100)
    # "a" + "v" + 48 = 50 bytes each
    assert _apply(table, quota, _hb("a", 1, "x" * 48), _hb("b", 1, "y" * 48)) == ["", ""]
    assert table.state_bytes == 100
    assert _apply(table, quota, _hb("c", 1), _hb("a", 2, "x" * 49)) == [
        "max_state_bytes",
        "max_state_bytes",
    ]
    assert table.get("a").seq == 1  # type: ignore[union-attr]
    assert _apply(table, quota, _hb("a", 3, "x" * 10)) == [""]  # shrinks: accepted
    assert table.state_bytes == 62
    assert _apply(table, Quota(max_state_bytes=10), _hb("b", 2, "y" * 20)) == [""]  # over, shrinks


def test_entries_without_quota_fields_are_unlimited() -> None:
    table = DeviceTable()
    results = table.apply(encode_batch([_hb(f"d{i}", 1) for i in range(50)], 1))
    assert not any(r.rejected for r in results) and len(table) == 50


def test_quota_decisions_are_the_same_on_every_replica_and_after_restore() -> None:
    """Replicas that apply the same entries (one restored from a snapshot
    midway) refuse the same heartbeats and end with the same table."""
    rng = random.Random(7)
    entries = []
    for n in range(200):
        hbs = [
            _hb(f"dev-{rng.randrange(40)}", n + 1, "z" * rng.randrange(0, 200)) for _ in range(5)
        ]
        quota = Quota(max_devices=rng.choice([0, 25, 30]), max_state_bytes=rng.choice([0, 3000]))
        entries.append(encode_batch(hbs, n, quota))
    a, b = DeviceTable(), DeviceTable()
    ra = [r for e in entries for r in a.apply(e)]
    rb = [r for e in entries[:100] for r in b.apply(e)]
    c = DeviceTable()
    c.install(snapshotfile.copy_table(b))
    rb += [r for e in entries[100:] for r in c.apply(e)]
    assert ra == rb
    assert any(r.rejected == "max_devices" for r in ra)
    assert any(r.rejected == "max_state_bytes" for r in ra)
    assert a.digest() == c.digest() and a.state_bytes == c.state_bytes
    assert a.state_bytes == sum(state_bytes(d, a.get(d).reported) for d in a._recs)  # type: ignore[union-attr]


def test_quota_refusal_is_none_when_there_is_no_limit() -> None:
    assert quota_refusal(Quota(), 10**9, 10**12, True, 0, 10**6) is None


def test_a_quota_status_maps_back_to_a_non_retriable_quota_error() -> None:
    import grpc

    err = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_devices: the cluster holds ...")
    assert isinstance(err, QuotaExceeded) and err.quota == "max_devices" and not err.retriable
    other = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "max_streams: this node ...")
    assert not isinstance(other, QuotaExceeded) and other.retriable


@pytest.mark.parametrize(
    ("sizes", "budget", "n"),
    [([], 10, 0), ([50], 10, 1), ([4, 4, 4], 10, 2), ([5, 5], 10, 2), ([3] * 10, 100, 10)],
)
def test_fit_page_takes_what_fits_and_at_least_one(sizes: list[int], budget: int, n: int) -> None:
    assert fit_page(sizes, budget) == n


def test_the_log_throttle_logs_once_per_key_and_interval_and_counts_the_rest() -> None:
    t = LogThrottle(10.0)
    assert t.admit("k", 0.0) == 0
    assert all(t.admit("k", 0.1 * i) is None for i in range(1, 50))
    assert t.admit("other", 1.0) == 0
    assert t.admit("k", 10.0) == 49


def test_the_log_throttle_stays_bounded_and_within_its_line_budget_under_spoofing() -> None:
    t = LogThrottle(10.0, max_keys=1024, max_lines=20)
    logged = sum(t.admit(("10.0.0.1", port), 0.001 * port) is not None for port in range(84_000))
    assert len(t) <= 1024
    assert logged <= 20 * (84 // 10 + 1)
    # What was held back is reported, not lost: the next line carries the tally.
    held = t.admit("fresh", 1000.0)
    assert held is not None and held > 0
