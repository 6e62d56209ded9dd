"""A three-node cluster across three real NATs, reaching each other over ICE.

Sites 1 and 2 sit behind endpoint-independent ("cone") NATs, site 3 behind a
symmetric one (a new external port per flow). coturn and the rendezvous run in
the public namespace. Expected paths: n1 <-> n2 hole-punched directly
(``srflx``), every pair with n3 through the TURN relay (``relay``): its
symmetric NAT defeats hole punching, and the routers drop unsolicited inbound
traffic. The harness reaches each node's gRPC port through a port forward on
its router.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import wait_caught_up

from chaos.verify import verify
from chaos.workload import Workload
from cluster.local import DEFAULT_GRPC_BASE, DEFAULT_RAFT_BASE, LocalCluster, wait_until
from cluster.natlab import NatLab, available
from raftstate.config import NodeConfig
from raftstate.sdk import DeviceClient
from raftstate.v1 import cluster_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RENDEZVOUS_PORT = 7400
GRPC_PORT = DEFAULT_GRPC_BASE  # LocalCluster's port on every host
EXPECTED = {
    frozenset({"n1", "n2"}): "srflx",
    frozenset({"n1", "n3"}): "relay",
    frozenset({"n2", "n3"}): "relay",
}


@dataclasses.dataclass
class IceLab:
    lab: NatLab
    cluster: LocalCluster
    rendezvous: subprocess.Popen[str]


@pytest.fixture(scope="module")
def ice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IceLab]:
    reason = available()
    if reason is not None:
        pytest.skip(f"NAT lab unavailable: {reason}")
    lab = NatLab(kinds=("cone", "cone", "symmetric"))
    lab.up()
    secret = secrets.token_urlsafe(32)
    rendezvous_secret = secrets.token_urlsafe(32)  # the rendezvous never gets the cluster's
    rendezvous = f"{lab.public_ip}:{RENDEZVOUS_PORT}"
    env = {**os.environ, "RAFTSTATE_RENDEZVOUS_SECRET": rendezvous_secret}
    log = open(tmp_path_factory.mktemp("rendezvous") / "rendezvous.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*lab.public_exec_prefix(), sys.executable, "-m", "raftstate", "rendezvous",
         "--listen", rendezvous],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    cluster: LocalCluster | None = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until it prints its address (or dies)
        assert str(RENDEZVOUS_PORT) in first, first
        for i in (1, 2, 3):
            lab.port_forward(i, "tcp", GRPC_PORT)
        base = NodeConfig.for_tests(
            reach="ice",
            rendezvous=rendezvous,
            stun_server=lab.stun_address,
            turn_server=lab.stun_address,
            turn_username=lab.turn_username,
            turn_password=lab.turn_password,
            ice_connect_timeout_ms=3000,
            rendezvous_secret=rendezvous_secret,
        )
        cluster = LocalCluster(
            tmp_path_factory.mktemp("ice"), 3, base_config=base, secret=secret,
            hosts=[lab.router_public_ip(i) for i in (1, 2, 3)],
            exec_prefix=lambda node_id: lab.exec_prefix(int(node_id[1:])),
            node_overrides={
                f"n{i}": {"grpc_listen": f"{lab.node_ip(i)}:{GRPC_PORT}",
                          "raft_listen": f"{lab.node_ip(i)}:{DEFAULT_RAFT_BASE}"}
                for i in (1, 2, 3)
            },
            tls_hosts=[lab.node_ip(i) for i in (1, 2, 3)],
            secure=True,  # off loopback gRPC is TLS with auth; clients read the env
        )  # fmt: skip
        cluster.start(timeout_s=60)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in cluster.client_env().items():
                mp.setenv(key, value)
            yield IceLab(lab, cluster, proc)
    finally:
        if cluster is not None:
            cluster.stop()
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        lab.down()


def links(cluster: LocalCluster) -> dict[tuple[str, str], cluster_pb2.Member]:
    """(from, to) -> the link as ``from`` reports it."""
    out = {}
    for node_id in cluster.nodes:
        st = cluster.status(node_id)
        if st is None:
            continue
        for m in st.members:
            if m.node_id != node_id:
                out[(node_id, m.node_id)] = m
    return out


def paths_as_expected(cluster: LocalCluster) -> bool:
    seen = links(cluster)
    if len(seen) != 6:
        return False
    return all(m.connected and m.path == EXPECTED[frozenset(pair)] for pair, m in seen.items())


def test_cluster_forms_across_three_nats_with_expected_paths(ice: IceLab) -> None:
    try:
        wait_until(lambda: paths_as_expected(ice.cluster), 60, "the expected ICE paths")
    finally:
        for pair, m in sorted(links(ice.cluster).items()):
            print(pair, m.path, m.connected, f"{m.rtt_ms:.2f} ms", m.retransmissions)
    with DeviceClient(ice.cluster.endpoints) as client:
        acks = [client.heartbeat(f"nat-{i}", {"i": str(i)}, seq=1) for i in range(20)]
        assert all(not a.duplicate for a in acks)
        for endpoint in ice.cluster.endpoints:  # every node has it, linearizably
            with DeviceClient([endpoint], prefer_leader=False) as one:
                assert one.get("nat-19").seq == 1


def path_builds(cluster: LocalCluster) -> dict[tuple[str, str], int]:
    return {pair: m.paths for pair, m in links(cluster).items()}


def test_nat_rebinding_resumes_replication_without_loss(ice: IceLab) -> None:
    """conntrack flushes under a recorded workload. On the symmetric router
    (site 3) n3's flows get new external ports, so each of n3's relay paths
    must be replaced: rebuilt through the rendezvous, or moved by the other
    end, which sees n3's authentic datagrams arrive from the new port and
    validates it (roaming; both count as a new path). On a cone router
    (site 1) the mapping comes back on the same port. Either way every node
    catches up, nothing acknowledged is lost and the history stays
    linearizable."""
    cluster, lab = ice.cluster, ice.lab
    wait_until(lambda: paths_as_expected(cluster), 60, "the expected ICE paths")
    with Workload(cluster.endpoints, cluster.endpoints, devices=8) as w:
        wait_until(lambda: w.completed >= 100, 30, "traffic before the rebinding")
        before = path_builds(cluster)
        lab.flush_conntrack(3)
        n3_pairs = [p for p in before if "n3" in p]

        def replaced() -> bool:
            now = path_builds(cluster)
            # Per pair, either end may be the one that got a new path.
            return all(
                now.get((a, b), 0) + now.get((b, a), 0) > before[(a, b)] + before[(b, a)]
                for a, b in n3_pairs
            )

        wait_until(replaced, 60, "n3's relay paths replaced after its NAT rebinds")
        wait_until(lambda: paths_as_expected(cluster), 30, "the expected paths again")
        wait_caught_up(cluster, timeout_s=30)
        lab.flush_conntrack(1)
        done = w.completed
        wait_until(lambda: w.completed >= done + 100, 60, "traffic after the cone flush")
        wait_until(lambda: paths_as_expected(cluster), 60, "paths up after the cone flush")
        wait_caught_up(cluster, timeout_s=30)
    verdict = verify(cluster.endpoints, w.acked, w.history)
    print(verdict.explain())
    assert verdict.ok, verdict.explain()
