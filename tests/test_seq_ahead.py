"""A seq implausibly far ahead of the node's clock is refused, so one bogus
heartbeat cannot make a device's later real heartbeats stale duplicates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from raftstate.config import NodeConfig
from raftstate.errors import ConfigError, InvalidArgument
from raftstate.model import SEQ_MAX, validate_heartbeat
from raftstate.sdk import DeviceClient

NOW_US = 1_750_000_000_000_000
DAY = 86_400


def test_a_seq_one_microsecond_past_the_limit_is_refused_naming_seq() -> None:
    limit = NOW_US + DAY * 1_000_000
    hb = validate_heartbeat("d", limit, {}, 0, now_us=NOW_US, max_seq_ahead_s=DAY)
    assert hb.seq == limit
    with pytest.raises(InvalidArgument) as err:
        validate_heartbeat("d", limit + 1, {}, 0, now_us=NOW_US, max_seq_ahead_s=DAY)
    assert err.value.field == "seq" and "max_seq_ahead_s" in err.value.problem


def test_counter_seqs_and_auto_seqs_stay_valid() -> None:
    for seq in (1, 2, 1000, NOW_US, NOW_US + 3_600_000_000):
        validate_heartbeat("d", seq, {}, 0, now_us=NOW_US, max_seq_ahead_s=DAY)


def test_the_largest_seq_is_refused_by_a_node_but_not_without_a_clock() -> None:
    with pytest.raises(InvalidArgument, match="^seq"):
        validate_heartbeat("d", SEQ_MAX, {}, 0, now_us=NOW_US, max_seq_ahead_s=DAY)
    validate_heartbeat("d", SEQ_MAX, {}, 0)  # the SDK's own check has no node clock


def test_max_seq_ahead_s_must_be_positive() -> None:
    cfg = NodeConfig.from_mapping(
        {
            "node_id": "n1",
            "members": [{"id": "n1", "raft": "127.0.0.1:7101", "grpc": "127.0.0.1:7001"}],
            "transport": "tcp",
            "allow_insecure_transport": True,
            "insecure_grpc": True,
            "auth": "off",
            "max_seq_ahead_s": 0,
        }
    )
    with pytest.raises(ConfigError, match="^max_seq_ahead_s"):
        cfg.validate()


def test_one_huge_seq_cannot_take_over_a_device(tmp_path: Path) -> None:
    """Regression: on the old main, seq = 2^64-1 was committed and every later
    real heartbeat of ``w-0`` was answered duplicate=true."""
    with LocalCluster(tmp_path, 3, base_config=NodeConfig.for_tests()) as cluster:
        with DeviceClient(cluster.endpoints) as device:
            first = device.heartbeat("w-0", {"temp": "20"})
            assert not first.duplicate
        with DeviceClient(cluster.endpoints) as attacker:
            with pytest.raises(InvalidArgument) as err:
                attacker.heartbeat("w-0", {"temp": "-999"}, seq=SEQ_MAX)
            assert err.value.field == "seq"
            # The refused seq does not stick in the client's own seq counter.
            assert not attacker.heartbeat("w-0", {"temp": "20.5"}).duplicate
        with DeviceClient(cluster.endpoints) as device:
            ack = device.heartbeat("w-0", {"temp": "21"})
            assert not ack.duplicate and ack.seq <= time.time_ns() // 1000 + 10**6
            got = device.get("w-0")
            assert got.seq == ack.seq and got.reported["temp"] == "21"
