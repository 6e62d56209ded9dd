"""Per-node static keys: a process with the cluster secret but not n2's
private key cannot pose as n2; key configuration is validated."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path

import pytest

from cluster.local import LocalCluster, wait_until
from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError
from raftstate.nodekeys import (
    decode_key,
    generate_key_pair,
    load_identity,
    read_key_file,
    write_key_file,
)
from raftstate.sdk import DeviceClient
from raftstate.secretcheck import generate_secret

MEMBERS = tuple(
    Member(f"n{i}", f"127.0.0.1:{7100 + i}", f"127.0.0.1:{7000 + i}") for i in (1, 2, 3)
)


def _keyed(tmp_path: Path, **kw: object) -> NodeConfig:
    private, public = generate_key_pair()
    path = tmp_path / "n1.key"
    write_key_file(path, private)
    others = {m.id: generate_key_pair()[1] for m in MEMBERS[1:]}
    return NodeConfig.for_tests(
        node_id="n1",
        members=MEMBERS,
        cluster_secret=generate_secret(),
        node_key_file=str(path),
        peer_keys={"n1": public, **others},
        **kw,
    )


def test_a_keyed_config_validates_loads_and_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = _keyed(tmp_path)
    cfg.validate()
    identity = load_identity(cfg)
    assert identity is not None and set(identity.peer_public_keys) == {"n2", "n3"}
    toml = tmp_path / "c.toml"
    toml.write_text(cfg.to_toml())
    assert NodeConfig.load(toml, environ={}) == cfg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"peer_keys": {"n2": "A" * 43}}, "peer_keys"),  # n3 missing
        ({"peer_keys": {"n2": "short", "n3": "A" * 43}}, "peer_keys[n2]"),
        ({"peer_keys": {"n2": "A" * 43, "n3": "A" * 43, "n9": "A" * 43}}, "peer_keys"),
        ({"node_key_file": ""}, "node_key_file"),
        ({"transport": "tcp"}, "node_key_file"),
    ],
)
def test_bad_key_configuration_names_the_field(
    tmp_path: Path, change: dict[str, object], field: str
) -> None:
    cfg = dataclasses.replace(_keyed(tmp_path), **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^" + re.escape(field)):
        cfg.validate()


def test_own_public_key_must_match_the_key_file(tmp_path: Path) -> None:
    cfg = _keyed(tmp_path)
    cfg = dataclasses.replace(cfg, peer_keys={**cfg.peer_keys, "n1": generate_key_pair()[1]})
    with pytest.raises(ConfigError, match=r"peer_keys\[n1\]: does not match"):
        load_identity(cfg)


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    cfg = _keyed(tmp_path)
    os.chmod(cfg.node_key_file, 0o644)
    with pytest.raises(ConfigError, match="node_key_file: .* chmod 600"):
        read_key_file(cfg.node_key_file)


def test_key_file_is_private_from_creation_even_with_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private, _ = generate_key_pair()
        write_key_file(tmp_path / "k", private)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert read_key_file(tmp_path / "k") == decode_key("k", private)


def test_a_node_with_the_secret_but_not_n2s_key_cannot_pose_as_n2(tmp_path: Path) -> None:
    """n1 and n3 are real; the process claiming to be n2 has the cluster
    secret and every public key, but a private key of its own. Its HELLOs
    fail the pair MAC at n1 and n3 (``bad_mac``) and it never joins."""
    cluster = LocalCluster(tmp_path, 3, base_config=NodeConfig.for_tests(transport="udp"))
    impostor = cluster.nodes["n2"]
    real = impostor.config
    assert real.node_key_file and set(real.peer_keys) == {"n1", "n2", "n3"}
    fake_private, _ = generate_key_pair()
    write_key_file(tmp_path / "impostor.key", fake_private)
    impostor.config = dataclasses.replace(
        real,
        node_key_file=str(tmp_path / "impostor.key"),
        peer_keys={k: v for k, v in real.peer_keys.items() if k != "n2"},
        data_dir=str(tmp_path / "impostor"),
    )
    try:
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        cluster.wait_for_leader(30, among=["n1", "n3"])
        with DeviceClient([cluster.nodes[n].endpoint for n in ("n1", "n3")]) as client:
            client.heartbeat("keyed-1", {"x": "1"})

        def bad_mac_counted() -> bool:
            for node_id in ("n1", "n3"):
                st = cluster.status(node_id)
                if st is None or st.transport_drops.get("bad_mac", 0) < 1:
                    return False
            return True

        wait_until(bad_mac_counted, 15, "n1 and n3 to count the impostor's HELLOs as bad_mac")
        st = cluster.status("n2")
        assert st is not None and st.commit_index <= 1 and not st.leader_id
        for node_id in ("n1", "n3"):
            text = cluster.nodes[node_id].log_path.read_text()
            assert "bad MAC on HELLO from 'n2'" in text
        assert impostor.running()
    finally:
        cluster.stop()
