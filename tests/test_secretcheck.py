"""Secrets are generated from 32 random bytes; weak ones are refused by
estimated entropy, not only by length."""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys

import pytest

from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError
from raftstate.secretcheck import MIN_BITS, check_secret, estimate_bits, generate_secret

WEAK = [
    "s" * 64,  # long but one character
    "abcdefghijklmnopqrstuvwxyz0123456789",  # sequences
    "qwertyuiopasdfghjklzxcvbnm1234567890",  # keyboard walks
    "correct horse battery staple",  # a passphrase of common words
    "password-secret-cluster-raftstate-admin-root",  # dictionary words
    "Xk9#Xk9#Xk9#Xk9#Xk9#Xk9#Xk9#Xk9#Xk9#",  # one short pattern repeated
    "rendezvous-test-secret-0123456789",
]


@pytest.mark.parametrize("secret", WEAK)
def test_weak_secrets_are_refused_with_how_to_generate_one(secret: str) -> None:
    assert estimate_bits(secret) < MIN_BITS
    with pytest.raises(ConfigError) as err:
        check_secret("cluster_secret", secret)
    assert err.value.message.startswith("cluster_secret: too weak")
    assert "raftstate secret" in err.value.message and "token_urlsafe(32)" in err.value.message


def test_generated_secrets_are_32_random_bytes_and_always_pass() -> None:
    for _ in range(500):
        s = generate_secret()
        assert len(s) == 43  # 32 bytes, URL-safe base64 without padding
        check_secret("cluster_secret", s)
    for _ in range(200):
        check_secret("x", secrets.token_hex(32))


def test_config_refuses_a_weak_cluster_or_rendezvous_secret() -> None:
    members = (Member("n1", "127.0.0.1:7101", "127.0.0.1:7001"),)
    good = NodeConfig.for_tests(node_id="n1", members=members, cluster_secret=generate_secret())
    good.validate()
    with pytest.raises(ConfigError, match="^cluster_secret: too weak"):
        dataclasses.replace(good, cluster_secret="x" * 40).validate()
    ice = dataclasses.replace(
        good, reach="ice", rendezvous="127.0.0.1:9000", stun_server="127.0.0.1:3478"
    )
    with pytest.raises(ConfigError, match="^rendezvous_secret: required"):
        ice.validate()
    with pytest.raises(ConfigError, match="^rendezvous_secret: must differ"):
        dataclasses.replace(ice, rendezvous_secret=good.cluster_secret).validate()
    with pytest.raises(ConfigError, match="^rendezvous_secret: too weak"):
        dataclasses.replace(ice, rendezvous_secret="rendezvous" * 4).validate()
    dataclasses.replace(ice, rendezvous_secret=generate_secret()).validate()


def test_raftstate_secret_prints_a_strong_secret() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "raftstate", "secret"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(out) == 43
    check_secret("cluster_secret", out)


def test_listen_without_a_host_binds_loopback() -> None:
    members = (Member("n1", "127.0.0.1:7101", "127.0.0.1:7001"),)
    cfg = NodeConfig.for_tests(
        node_id="n1",
        members=members,
        cluster_secret=generate_secret(),
        grpc_listen=":7001",
        raft_listen=":7101",
    )
    cfg.validate()
    assert (cfg.grpc_bind, cfg.raft_bind) == ("127.0.0.1:7001", "127.0.0.1:7101")
    wide = dataclasses.replace(cfg, grpc_listen="0.0.0.0:7001")
    assert wide.grpc_bind == "0.0.0.0:7001"
