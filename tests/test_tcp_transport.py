"""The TCP Raft transport on real node processes (loopback): it speaks the
schema codec, never runs a pickle a peer sends, caps a frame before buffering
it, and refuses to run without a secret off loopback."""

from __future__ import annotations

import dataclasses
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import node_devices, wait_caught_up

from cluster.local import LocalCluster, node_status
from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError
from raftstate.model import Consistency
from raftstate.sdk import DeviceClient
from raftstate.transport import tcpframe

pytestmark = pytest.mark.cluster


class _Evil:
    """Unpickling this creates ``path``: the proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _insecure_tcp_node(path: Path) -> LocalCluster:
    base = dataclasses.replace(
        NodeConfig.for_tests(), transport="tcp", allow_insecure_transport=True
    )
    return LocalCluster(path, 1, base_config=base, node_overrides={"n1": {"cluster_secret": ""}})


@pytest.fixture(scope="module")
def insecure_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = _insecure_tcp_node(tmp_path_factory.mktemp("insecure-tcp"))
    try:
        cluster.start(timeout_s=60)
        yield cluster
    finally:
        cluster.stop()


def _raft_port(cluster: LocalCluster) -> tuple[str, int]:
    host, port = cluster.raft_address("n1").rsplit(":", 1)
    return host, int(port)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _node_still_writes(cluster: LocalCluster, device: str) -> None:
    with DeviceClient(cluster.endpoints) as client:
        ack = client.heartbeat(device, {"k": "v"})
        dev = client.get(device, consistency=Consistency.LINEARIZABLE)
    assert dev.seq == ack.seq


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_pickled_frames_on_the_raft_port_never_run(
    insecure_node: LocalCluster, tmp_path: Path
) -> None:
    """An unauthenticated peer (no cluster secret) sends pickles in pysyncobj's
    own framing and in ours; none may run, and the node keeps working."""
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(sentinel)), 2)
    frames = [
        # pysyncobj 0.3.17: native int32 length | zlib(pickle)
        struct.pack("i", len(z := zlib.compress(evil, 3))) + z,
        # our framing, with a pickle where the message should be
        tcpframe.HEADER.pack(len(b := b"\x00\x03" + evil)) + b,
        tcpframe.HEADER.pack(len(evil)) + evil,
    ]
    closed = []
    for frame in frames:
        with socket.create_connection(_raft_port(insecure_node), timeout=5) as sock:
            sock.sendall(frame)
            closed.append(_closed_by_peer(sock, 5.0))
    assert not sentinel.exists(), "a pickle sent to the raft port ran on the node"
    assert all(closed), f"the node kept connections that sent garbage: {closed}"
    node = insecure_node.nodes["n1"]
    assert node.running()
    _node_still_writes(insecure_node, "after-pickle")
    st = node_status(node.endpoint)
    assert st is not None and sum(st.transport_drops.values()) >= len(frames)


@pytest.mark.parametrize(
    "header",
    [tcpframe.HEADER.pack(2**31 - 1), struct.pack("<i", 2**31 - 1)],
    ids=["ours", "pysyncobj-native"],
)
def test_a_huge_announced_frame_is_closed_without_buffering_it(
    insecure_node: LocalCluster, header: bytes
) -> None:
    node = insecure_node.nodes["n1"]
    assert node.pid is not None
    before = _rss_kib(node.pid)
    chunk = b"\x00" * (1 << 20)
    sent = 0
    with socket.create_connection(_raft_port(insecure_node), timeout=5) as sock:
        sock.sendall(header)
        try:
            while sent < 128 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
    grown_mib = (_rss_kib(node.pid) - before) / 1024
    assert sent < 32 << 20, f"the node accepted {sent >> 20} MiB of one frame"
    assert grown_mib < 32, f"RSS grew {grown_mib:.0f} MiB"
    _node_still_writes(insecure_node, "after-huge-frame")


def test_many_half_sent_frames_are_bounded_in_count_and_time(insecure_node: LocalCluster) -> None:
    """Connections that never finish the handshake: each holds one partly
    sent frame of the largest size. At most MAX_HANDSHAKING are kept, each
    for at most HANDSHAKE_TIMEOUT_S (before: 150 such connections took a
    node from 67 to 888 MB, and none was ever closed)."""
    from raftstate.transport.tcp import HANDSHAKE_TIMEOUT_S, MAX_HANDSHAKING

    node = insecure_node.nodes["n1"]
    assert node.pid is not None
    before = _rss_kib(node.pid)
    body = b"\x00" * (tcpframe.MAX_FRAME_BYTES - 1)
    socks = []
    try:
        for _ in range(3 * MAX_HANDSHAKING):
            sock = socket.create_connection(_raft_port(insecure_node), timeout=5)
            socks.append(sock)
            try:
                sock.sendall(tcpframe.HEADER.pack(tcpframe.MAX_FRAME_BYTES) + body)
            except OSError:
                pass  # closed by the node: what the cap is for
        grown_mib = (_rss_kib(node.pid) - before) / 1024
        limit = MAX_HANDSHAKING * tcpframe.MAX_FRAME_BYTES / (1 << 20) + 64
        assert grown_mib < limit, f"RSS grew {grown_mib:.0f} MiB for half-sent frames"
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + 10
        for sock in socks:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False
            assert closed, "a connection that never finished its handshake was kept open"
    finally:
        for sock in socks:
            sock.close()
    _node_still_writes(insecure_node, "after-half-frames")


def test_insecure_transport_is_refused_off_loopback() -> None:
    members = (
        Member("n1", "10.0.0.1:7001", "127.0.0.1:7101"),
        Member("n2", "127.0.0.1:7002", "127.0.0.1:7102"),
    )
    cfg = NodeConfig.for_tests(
        transport="tcp", node_id="n2", members=members, allow_insecure_transport=True
    )
    with pytest.raises(ConfigError, match=r"allow_insecure_transport.*members\[n1\]\.raft"):
        cfg.validate()
    loopback = tuple(dataclasses.replace(m, raft=m.raft.replace("10.0.0.1", "127.0.0.1"))
                     for m in members)  # fmt: skip
    dataclasses.replace(cfg, members=loopback).validate()
    with pytest.raises(ConfigError, match="raft_listen"):
        dataclasses.replace(cfg, members=loopback, raft_listen="0.0.0.0:7002").validate()


def test_insecure_node_warns_loudly(insecure_node: LocalCluster) -> None:
    text = insecure_node.nodes["n1"].log_path.read_text()
    assert "INSECURE" in text


def test_tcp_cluster_with_a_secret_replicates_and_serves_follower_reads(tmp_path: Path) -> None:
    """Every pysyncobj message, the handshake and the ``rs_*`` ReadIndex
    messages travel through the codec over Fernet."""
    base = dataclasses.replace(NodeConfig.for_tests(), transport="tcp")
    with LocalCluster(tmp_path, 3, base_config=base) as cluster:
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.nodes if n != leader)
        acked: dict[str, int] = {}
        with DeviceClient([cluster.nodes[follower].endpoint]) as client:
            for i in range(20):
                ack = client.heartbeat(f"tcp-{i:02d}", {"i": str(i)})
                acked[ack.device_id] = ack.seq
                got = client.get(ack.device_id, consistency=Consistency.LINEARIZABLE)
                assert got.seq == ack.seq
        wait_caught_up(cluster)
        for node in cluster.nodes.values():
            assert node_devices(node.endpoint, "tcp-") == acked, node.node_id
            st = node_status(node.endpoint)
            assert st is not None and not st.transport_drops, st.transport_drops
