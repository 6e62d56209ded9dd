"""Config validation and loading; request validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError, InvalidArgument
from raftstate.model import validate_consistency, validate_heartbeat, validate_page_size
from raftstate.secretcheck import generate_secret

SECRET = generate_secret()

MEMBERS = (
    Member("n1", "127.0.0.1:7101", "127.0.0.1:7001"),
    Member("n2", "127.0.0.1:7102", "127.0.0.1:7002"),
    Member("n3", "127.0.0.1:7103", "127.0.0.1:7003"),
)


SECURE = {"tls_cert_file": "n1.pem", "tls_key_file": "n1.key", "token_key_file": "token.key"}


def good(**kw: object) -> NodeConfig:
    values: dict[str, object] = {
        "node_id": "n1",
        "members": MEMBERS,
        "cluster_secret": SECRET,
        **SECURE,
    }
    values.update(kw)
    return dataclasses.replace(NodeConfig.default(), **values)  # type: ignore[arg-type]


OFF_LOOPBACK = tuple(Member(m.id, m.raft, m.grpc.replace("127.0.0.1", "10.0.0.1")) for m in MEMBERS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tls_cert_file": ""}, "tls_cert_file"),
        ({"tls_key_file": ""}, "tls_cert_file"),
        ({"auth": "maybe"}, "auth"),
        ({"token_key_file": ""}, "auth"),
        ({"grpc_mtls_listen": "127.0.0.1:7051"}, "client_ca_file"),
        ({"insecure_grpc": True, "members": OFF_LOOPBACK}, "insecure_grpc"),
        ({"auth": "off", "members": OFF_LOOPBACK}, "auth"),
        ({"insecure_grpc": True, "grpc_listen": "0.0.0.0:7001"}, "insecure_grpc"),
        (
            {"insecure_grpc": True, "grpc_mtls_listen": "127.0.0.1:7051", "client_ca_file": "c"},
            "grpc_mtls_listen",
        ),
    ],
)
def test_grpc_is_secure_unless_insecure_is_chosen_on_loopback(
    change: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        good(**change).validate()
    assert exc.value.message.startswith(field + ":"), exc.value.message


def test_the_default_config_refuses_to_run_without_certificates() -> None:
    cfg = dataclasses.replace(
        NodeConfig.default(), node_id="n1", members=MEMBERS, cluster_secret=SECRET
    )
    with pytest.raises(ConfigError, match="tls_cert_file"):
        cfg.validate()
    # ... and runs plaintext, without auth, only when told so, on loopback.
    dataclasses.replace(cfg, insecure_grpc=True, auth="off").validate()
    good(insecure_grpc=True).validate()  # tokens over loopback plaintext
    good(grpc_mtls_listen="127.0.0.1:7051", client_ca_file="ca.pem", token_key_file="").validate()


def test_defaults_and_test_timers_validate() -> None:
    good().validate()
    dataclasses.replace(
        NodeConfig.for_tests(), node_id="n1", members=MEMBERS, cluster_secret=SECRET
    ).validate()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"election_timeout_min_ms": 100, "heartbeat_ms": 50}, "election_timeout_min_ms"),
        ({"election_timeout_max_ms": 500}, "election_timeout_max_ms"),
        ({"node_id": "n9"}, "node_id"),
        ({"cluster_secret": ""}, "cluster_secret"),
        ({"cluster_secret": "short"}, "cluster_secret"),
        ({"durability": "maybe"}, "durability"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"leader_step_down_ms": 60}, "leader_step_down_ms"),
        ({"tick_ms": 500}, "tick_ms"),
        ({"gil_switch_interval_us": 99}, "gil_switch_interval_us"),
        ({"gil_switch_interval_us": 50_001}, "gil_switch_interval_us"),
        ({"grpc_listen": "nohost"}, "grpc_listen"),
        ({"transport": "tcp", "peer_raft": {"n2": "127.0.0.1:9002"}}, "peer_raft"),
        ({"transport": "udp", "peer_raft": {"n1": "127.0.0.1:9001"}}, "peer_raft"),
        ({"transport": "udp", "peer_raft": {"n9": "127.0.0.1:9009"}}, "peer_raft"),
        ({"transport": "udp", "peer_raft": {"n2": "nohost"}}, "peer_raft[n2]"),
        ({"reach": "carrier-pigeon"}, "reach"),
        ({"reach": "ice", "transport": "tcp"}, "reach"),
        ({"reach": "ice", "stun_server": "10.0.0.1:3478"}, "rendezvous"),
        ({"reach": "ice", "rendezvous": "10.0.0.1:7400"}, "stun_server"),
        ({"reach": "ice", "rendezvous": "x", "stun_server": "10.0.0.1:3478"}, "rendezvous"),
        (
            {
                "reach": "ice",
                "rendezvous": "10.0.0.1:7400",
                "stun_server": "10.0.0.1:3478",
                "turn_server": "10.0.0.1:3478",
            },
            "turn_username",
        ),
        (
            {
                "reach": "ice",
                "rendezvous": "10.0.0.1:7400",
                "stun_server": "10.0.0.1:3478",
                "peer_raft": {"n2": "127.0.0.1:9002"},
            },
            "peer_raft",
        ),
    ],
)
def test_validate_names_the_broken_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        good(**change).validate()
    assert exc.value.message.startswith(field + ":")


def test_load_precedence_file_then_flags_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "n1.toml"
    path.write_text(good(heartbeat_ms=30, election_timeout_min_ms=300).to_toml())
    cfg = NodeConfig.load(path)
    assert cfg.heartbeat_ms == 30 and cfg.members == MEMBERS
    cfg = NodeConfig.load(path, flags={"heartbeat_ms": "40"})
    assert cfg.heartbeat_ms == 40
    cfg = NodeConfig.load(
        path, flags={"heartbeat_ms": "40"}, environ={"RAFTSTATE_HEARTBEAT_MS": "45"}
    )
    assert cfg.heartbeat_ms == 45


def test_peer_raft_round_trips_through_toml_flags_and_environment(tmp_path: Path) -> None:
    cfg = good(transport="udp", peer_raft={"n2": "127.0.0.1:9002", "n3": "[::1]:9003"})
    cfg.validate()
    path = tmp_path / "n1.toml"
    path.write_text(cfg.to_toml())
    assert "[peer_raft]" in path.read_text()
    assert NodeConfig.load(path) == cfg
    assert NodeConfig.load(path, flags={"peer_raft": "n2=127.0.0.1:9102"}).peer_raft == {
        "n2": "127.0.0.1:9102"
    }
    env = {"RAFTSTATE_PEER_RAFT": "n3=127.0.0.1:9103"}
    assert NodeConfig.load(path, environ=env).peer_raft == {"n3": "127.0.0.1:9103"}
    path.write_text(good(transport="udp").to_toml() + "\n[peer_raft]\nn2 = 7\n")
    with pytest.raises(ConfigError, match="peer_raft: must be a table"):
        NodeConfig.load(path)


def test_load_rejects_unknown_keys_and_bad_types(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("bogus = 1\n" + good().to_toml())
    with pytest.raises(ConfigError, match="bogus: unknown setting"):
        NodeConfig.load(path)
    path.write_text(good().to_toml().replace("heartbeat_ms = 50", 'heartbeat_ms = "fast"'))
    with pytest.raises(ConfigError, match="heartbeat_ms: must be an integer"):
        NodeConfig.load(path)
    with pytest.raises(ConfigError, match="heartbeat_ms: 'x' is not a number"):
        NodeConfig.load(None, environ={"RAFTSTATE_HEARTBEAT_MS": "x"})


def test_malformed_config_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('node_id = "n1"\nmembers = [\n')
    proc = subprocess.run(
        [sys.executable, "-m", "raftstate", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid TOML" in lines[0]
    path.write_text(good(election_timeout_min_ms=10).to_toml())
    proc = subprocess.run(
        [sys.executable, "-m", "raftstate", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "raftstate node: election_timeout_min_ms: must exceed 3 × heartbeat_ms"
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("", 1, {}, 0), "device_id"),
        (("x" * 129, 1, {}, 0), "device_id"),
        (("bad id", 1, {}, 0), "device_id"),
        (("dev/1", 1, {}, 0), "device_id"),
        (("d", 0, {}, 0), "seq"),
        (("d", 1, {f"k{i}": "v" for i in range(65)}, 0), "reported"),
        (("d", 1, {"k": "v" * 8200}, 0), "reported"),
        (("d", 1, {"": "v"}, 0), "reported"),
        (("d", 1, {}, 10**7), "ttl_s"),
    ],
)
def test_bad_heartbeats_are_rejected_naming_the_field(args: tuple, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_heartbeat(*args)
    assert exc.value.field == field


def test_limits_are_inclusive() -> None:
    validate_heartbeat("A" * 128, 2**64 - 1, {f"k{i}": "v" for i in range(64)}, 0)
    validate_heartbeat("a.b_c:d-e", 1, {"k": "v" * (8192 - 1)}, 0)


def test_enum_and_page_size_validation() -> None:
    with pytest.raises(InvalidArgument, match="consistency: unknown value 7"):
        validate_consistency(7)
    with pytest.raises(InvalidArgument, match="page_size"):
        validate_page_size(1001)
    assert validate_page_size(0) == 100


def test_validation_records_reported_size_in_utf8_bytes() -> None:
    hb = validate_heartbeat("d", 1, {"k": "é", "ab": "c"}, 0)
    assert hb.reported_bytes == 1 + 2 + 3  # "é" is two bytes in UTF-8
