"""Partitions at the Raft transport, in network namespaces (needs root).

Each node runs in its own namespace behind one router; the test harness
reaches every node's gRPC port through the router, and ``NetnsLab.isolate``
drops the *forwarded* node-to-node packets there, which nodes see as silent
wire loss (no resets). The isolated node keeps answering clients, which is
exactly what makes a stale read possible.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from chaos.history import ReadResult, WriteResult
from chaos.verify import verify
from chaos.workload import Workload
from cluster.local import LocalCluster, wait_until
from cluster.netns import NetnsLab, available
from raftstate.config import NodeConfig
from raftstate.sdk import DeviceClient
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LabCluster = Callable[..., tuple[NetnsLab, LocalCluster]]


@pytest.fixture
def lab_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabCluster]:
    reason = available()
    if reason is not None:
        pytest.skip(f"network-namespace lab unavailable: {reason}")
    made: list[tuple[NetnsLab, LocalCluster]] = []

    def factory(**overrides: object) -> tuple[NetnsLab, LocalCluster]:
        lab = NetnsLab(3)
        lab.up()
        base = dataclasses.replace(NodeConfig.for_tests(), **overrides)  # type: ignore[arg-type]
        # Off loopback gRPC must be TLS with auth: clients (the workload,
        # the verifier, read_on) take the admin credentials from the environment.
        cluster = LocalCluster(
            tmp_path / f"c{len(made)}", 3, base_config=base,
            hosts=[lab.node_ip(i) for i in (1, 2, 3)],
            exec_prefix=lambda node_id: lab.exec_prefix(int(node_id[1:])),
            secure=True,
        )
        for key, value in cluster.client_env().items():
            monkeypatch.setenv(key, value)
        made.append((lab, cluster))
        cluster.start(timeout_s=60)
        return lab, cluster

    yield factory
    for lab, cluster in made:
        for node_id in cluster.nodes:
            cluster.signal_node(node_id, signal.SIGCONT)
        cluster.stop()
        lab.down()


def isolate_leader(lab: NetnsLab, cluster: LocalCluster) -> tuple[str, list[str]]:
    leader = cluster.wait_for_leader()
    lab.isolate(int(leader[1:]))
    others = [n for n in cluster.nodes if n != leader]

    def new_leader() -> str | None:
        found = cluster.leader(among=others)
        return found if found is not None and found != leader else None

    wait_until(new_leader, 30, "the majority side to elect a new leader")
    return leader, others


def read_on(endpoint: str, device_id: str, timeout: float = 1.0) -> device_pb2.Device:
    creds = Credentials.from_env()
    with creds.channel(endpoint) as ch:
        res = device_pb2_grpc.DeviceStateServiceStub(ch).GetDevice(
            device_pb2.GetDeviceRequest(device_id=device_id,
                                        consistency=device_pb2.CONSISTENCY_LINEARIZABLE),
            timeout=timeout, metadata=creds.metadata(),
        )
        return res.device


def test_isolated_leader_never_serves_a_stale_linearizable_read(lab_cluster: LabCluster) -> None:
    lab, cluster = lab_cluster()
    with Workload(cluster.endpoints, cluster.endpoints) as w:
        wait_until(lambda: w.completed >= 150, 30, "traffic before the partition")
        old, others = isolate_leader(lab, cluster)
        before = w.completed
        wait_until(lambda: w.completed >= before + 200, 30, "traffic on the majority side")
        # The old leader must refuse linearizable reads outright.
        with pytest.raises(grpc.RpcError) as exc:
            read_on(cluster.nodes[old].endpoint, "lin-000", timeout=2.0)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        lab.heal()
        cluster.wait_for_leader(30)
        before = w.completed
        wait_until(lambda: w.completed >= before + 100, 30, "traffic after healing")
    verdict = verify(cluster.endpoints, w.acked, w.history)
    print(verdict.explain())
    assert verdict.ok, verdict.explain()


def test_negative_control_local_reads_are_caught_as_stale(lab_cluster: LabCluster) -> None:
    """The same isolation with ReadIndex switched off (test-only
    ``unsafe_serve_local_reads``): the checker must report the stale read.
    This proves the linearizability tests above can fail."""
    lab, cluster = lab_cluster(unsafe_serve_local_reads=True)
    w = Workload(cluster.endpoints, cluster.endpoints, devices=4)
    with w:
        wait_until(lambda: w.completed >= 100, 30, "traffic before the partition")
        old, others = isolate_leader(lab, cluster)
        # A write acknowledged by the majority, then a read on the isolated node.
        with DeviceClient([cluster.nodes[n].endpoint for n in others]) as client:
            op = w.history.invoke_write("probe-w", "stale-probe", 1, {"v": "new"})
            ack = client.heartbeat("stale-probe", {"v": "new"}, seq=1)
            w.history.ok(op, WriteResult(ack.duplicate, ack.stored_seq, ack.revision))
        op = w.history.invoke_read("probe-r", "stale-probe")
        try:
            d = read_on(cluster.nodes[old].endpoint, "stale-probe")
            w.history.ok(op, ReadResult.found(d.seq, dict(d.reported)))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            w.history.ok(op, ReadResult.not_found())
        lab.heal()
    verdict = verify(cluster.endpoints, w.acked, w.history)
    print(verdict.explain())
    assert verdict.lin is not None and not verdict.lin.ok
    assert any(f.device_id == "stale-probe" for f in verdict.lin.failures)
