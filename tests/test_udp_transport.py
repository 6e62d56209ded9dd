"""A real three-node cluster on loopback over the UDP transport (static mode):
election, replication, leader crash, ReadIndex over ``rs_*`` messages, and a
node with the wrong cluster secret that must never join."""

from __future__ import annotations

import dataclasses
import random
import socket
import threading
from pathlib import Path

import pytest
from helpers import assert_acked_present, node_devices, wait_caught_up
from test_faults import Fleet

from cluster.local import LocalCluster, wait_until
from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError
from raftstate.model import Consistency
from raftstate.sdk import DeviceClient
from raftstate.secretcheck import generate_secret

pytestmark = pytest.mark.cluster


def udp_cluster(path: Path) -> LocalCluster:
    base = dataclasses.replace(NodeConfig.for_tests(), transport="udp")
    return LocalCluster(path, 3, base_config=base)


def test_udp_requires_a_cluster_secret() -> None:
    cfg = NodeConfig.for_tests(
        transport="udp",
        node_id="n1",
        allow_insecure_transport=True,
        members=(Member("n1", "127.0.0.1:7001", "127.0.0.1:7101"),),
    )
    with pytest.raises(ConfigError, match="cluster_secret"):
        cfg.validate()


def test_leader_is_elected_and_heartbeats_reach_every_node(tmp_path: Path) -> None:
    with udp_cluster(tmp_path) as cluster:
        acked: dict[str, int] = {}
        with DeviceClient(cluster.endpoints) as client:
            for round_ in range(3):
                for i in range(20):
                    ack = client.heartbeat(f"udp-{i:02d}", {"round": str(round_)})
                    acked[ack.device_id] = ack.seq
        wait_caught_up(cluster)
        for node in cluster.nodes.values():
            assert node_devices(node.endpoint, "udp-") == acked, f"{node.node_id} differs"


def test_kill_leader_under_load_then_restarted_node_catches_up(tmp_path: Path) -> None:
    with udp_cluster(tmp_path) as cluster:
        old_leader = cluster.wait_for_leader()
        with Fleet(cluster.endpoints, devices=12) as fleet:
            fleet.wait_for_more(150)
            cluster.kill_node(old_leader)
            survivors = [n for n in cluster.nodes if n != old_leader]
            assert cluster.wait_for_leader(30, among=survivors) != old_leader
            fleet.wait_for_more(150)
        assert not fleet.errors, fleet.errors[:5]
        wait_caught_up(cluster, survivors)
        for node_id in survivors:
            view = node_devices(cluster.nodes[node_id].endpoint)
            assert_acked_present(fleet.acked, view, node_id)
        cluster.start_node(old_leader)  # a new process: a new session with each peer
        wait_caught_up(cluster)
        view = node_devices(cluster.nodes[old_leader].endpoint)
        assert_acked_present(fleet.acked, view, old_leader)
        for node_id in survivors:
            log = cluster.nodes[node_id].log_path.read_text()
            assert f"session 2 with {old_leader} established" in log, node_id


def test_linearizable_reads_on_a_follower_see_acknowledged_writes(tmp_path: Path) -> None:
    with udp_cluster(tmp_path) as cluster:
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.nodes.values() if n.node_id != leader)
        with DeviceClient(cluster.endpoints) as writer, DeviceClient([follower.endpoint]) as reader:
            for i in range(25):
                ack = writer.heartbeat("udp-lin", {"i": str(i)})
                got = reader.get("udp-lin", consistency=Consistency.LINEARIZABLE)
                assert got.seq >= ack.seq
                assert got.reported["i"] == str(i)


def test_node_with_a_different_secret_never_joins(tmp_path: Path) -> None:
    cluster = udp_cluster(tmp_path)
    intruder = cluster.nodes["n3"]
    intruder.config = dataclasses.replace(intruder.config, cluster_secret=generate_secret())
    try:
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        leader = cluster.wait_for_leader(30, among=["n1", "n2"])
        with DeviceClient([cluster.nodes[n].endpoint for n in ("n1", "n2")]) as client:
            for i in range(10):
                client.heartbeat(f"sec-{i}", {})
        wait_caught_up(cluster, ["n1", "n2"])
        st = cluster.status("n3")
        # Index 1 is pysyncobj's initial entry: n3 never learned anything else.
        assert st is not None and st.commit_index <= 1 and not st.leader_id
        assert node_devices(intruder.endpoint, "sec-") == {}
        for node_id in ("n1", "n2"):
            log = cluster.nodes[node_id].log_path
            wait_until(
                lambda log=log: "bad MAC on HELLO from 'n3'" in log.read_text(),  # type: ignore[misc]
                10,
                f"{node_id} to log the wrong secret",
            )
        assert leader in ("n1", "n2")
        # Rate-limited: at most one such line per 10 s per source.
        text = cluster.nodes[leader].log_path.read_text()
        assert text.count("bad MAC on HELLO from 'n3'") <= 2
        assert intruder.running()
    finally:
        cluster.stop()


def test_in_process_pair_reports_link_stats_and_shuts_down(tmp_path: Path) -> None:
    """Two RaftNodes in one process, each UDP transport on a loop thread of
    its own (``loop=None``): they connect, expose per-peer path stats, and
    destroy cleanly."""
    from cluster.local import free_ports
    from raftstate.raftnode import RaftNode
    from raftstate.statemachine import DeviceTable

    ports = free_ports(4)
    members = tuple(
        Member(f"n{i + 1}", f"127.0.0.1:{ports[i]}", f"127.0.0.1:{ports[i + 2]}") for i in range(2)
    )
    base = NodeConfig.for_tests(transport="udp", members=members, cluster_secret=generate_secret())
    nodes = [
        RaftNode(
            dataclasses.replace(base, node_id=m.id, data_dir=str(tmp_path / m.id)), DeviceTable(30)
        )
        for m in members
    ]
    try:
        wait_until(lambda: any(n.is_leader() for n in nodes), 20, "a leader")
        wait_until(
            lambda: all(s.srtt is not None for s in nodes[0].peer_link_stats().values()),
            10,
            "an RTT sample",
        )
        stats = nodes[0].peer_link_stats()["n2"]
        assert stats.path == "static" and stats.connected and stats.sessions == 1
    finally:
        for n in nodes:
            n.destroy_synchronous()


class RecordingRelay:
    """A UDP relay on loopback that forwards one direction of a node link
    (n1 -> n2, via n1's ``peer_raft``) and keeps a copy of what it forwards."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.target: tuple[str, int] | None = None
        self.recorded: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._thread.start()

    def _run(self) -> None:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if self.target is not None:
                out.sendto(data, self.target)
                if len(self.recorded) < 2000:
                    self.recorded.append(data)
        out.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_garbage_forged_and_replayed_datagrams_never_harm_a_node(tmp_path: Path) -> None:
    """Random datagrams, bit-flipped copies of real ones and exact replays hit
    a live node's UDP port: it keeps committing, nothing is lost, and every
    one of them is dropped and counted by reason in Cluster.Status."""
    # n1 reaches each peer through a recording relay: whoever leads, one of
    # n1's two links carries Raft traffic (followers do not talk to each
    # other, so a single n1 -> n2 relay recorded nothing when n3 led).
    relays = {peer: RecordingRelay() for peer in ("n2", "n3")}
    base = dataclasses.replace(NodeConfig.for_tests(), transport="udp")
    cluster = LocalCluster(
        tmp_path,
        3,
        base_config=base,
        node_overrides={"n1": {"peer_raft": {p: r.address for p, r in relays.items()}}},
    )
    for peer, r in relays.items():
        r.start(cluster.raft_address(peer))
    rng = random.Random(7)
    try:
        cluster.start()
        with DeviceClient(cluster.endpoints) as client:
            acked = {
                f"fz-{i}": client.heartbeat(f"fz-{i}", {}, seq=1).stored_seq for i in range(30)
            }

            def busy() -> str | None:
                return next((p for p, r in relays.items() if len(r.recorded) >= 50), None)

            victim = str(wait_until(busy, 30, "50 recorded datagrams from n1 to a peer"))
            relay = relays[victim]
            target = cluster.raft_address(victim)
            real = list(relay.recorded)
            host, _, port = target.rpartition(":")
            addr = (host, int(port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(5000):
                    s.sendto(rng.randbytes(rng.randrange(0, 1400)), addr)
                for d in real:
                    s.sendto(d, addr)  # exact replay
                    flipped = bytearray(d)
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
                    s.sendto(bytes(flipped), addr)  # forged
            for i in range(30, 60):
                acked[f"fz-{i}"] = client.heartbeat(f"fz-{i}", {}, seq=1).stored_seq
        wait_caught_up(cluster)
        for node_id, node in cluster.nodes.items():
            assert node.running(), f"{node_id} died"
            assert_acked_present(acked, node_devices(node.endpoint, "fz-"), node_id)

        def counted() -> dict[str, int] | None:
            # Some of the burst may overflow the socket buffer in the kernel;
            # what reaches the node must be dropped and counted by reason.
            st = cluster.status(victim)
            drops = dict(st.transport_drops) if st is not None else {}
            replayed = drops.get("replay", 0) + drops.get("too_old", 0)
            if drops.get("malformed", 0) >= 1000 and replayed and drops.get("bad_tag", 0):
                return drops
            return None

        try:
            drops = wait_until(
                counted, 10, f"{victim} to count the junk, the replays and the forgeries"
            )
        finally:
            st = cluster.status(victim)
            print(f"{victim} drops:", dict(st.transport_drops) if st else None)
        print(f"{victim} drops:", drops)
    finally:
        cluster.stop()
        for r in relays.values():
            r.close()


def test_loop_side_messages_bypass_the_tick_thread_both_ways(tmp_path: Path) -> None:
    """``send_from_loop`` sends from the transport's loop and
    ``set_loop_receiver`` hands the chosen wire kinds (ReadIndex's) to a
    handler on the receiver's loop thread, decoded; pysyncobj's tick thread
    never sees them."""
    from cluster.local import free_ports
    from raftstate.raftnode import RaftNode
    from raftstate.reads import ACK, PROBE, WIRE_KINDS
    from raftstate.statemachine import DeviceTable

    ports = free_ports(4)
    members = tuple(
        Member(f"n{i + 1}", f"127.0.0.1:{ports[i]}", f"127.0.0.1:{ports[i + 2]}") for i in range(2)
    )
    base = NodeConfig.for_tests(transport="udp", members=members, cluster_secret=generate_secret())
    nodes = [
        RaftNode(
            dataclasses.replace(base, node_id=m.id, data_dir=str(tmp_path / m.id)), DeviceTable(30)
        )
        for m in members
    ]
    got: list[tuple[str, dict[str, object], str]] = []
    on_tick: list[dict[str, object]] = []
    try:
        sender, receiver = (n.loop_transport() for n in nodes)
        assert sender is not None and receiver is not None
        nodes[1].set_message_handler(lambda _node, msg: on_tick.append(msg))

        def record(node: object, msg: dict[str, object]) -> None:
            got.append((str(getattr(node, "id", "")), msg, threading.current_thread().name))

        receiver.loop.call_soon_threadsafe(receiver.set_loop_receiver, WIRE_KINDS, record)
        wait_until(lambda: all(n.status().connected for n in nodes), 20, "both nodes connected")
        peer = next(iter(nodes[0].otherNodes))
        sent: list[bool] = []
        send = sender.send_from_loop
        for i, kind in enumerate((PROBE, ACK)):
            msg = {"type": kind, "term": 7, "round": i + 1}
            sender.loop.call_soon_threadsafe(lambda m=msg: sent.append(send(peer, m)))
        wait_until(lambda: len(got) == 2, 10, "both messages on the receiver's loop")
        assert sent == [True, True]
        assert [m for _, m, _ in got] == [
            {"type": PROBE, "term": 7, "round": 1},
            {"type": ACK, "term": 7, "round": 2},
        ]
        assert all(who == nodes[0].selfNode.id for who, _, _ in got)
        assert all(thread == "raftstate-udp" for _, _, thread in got)  # the loop, not the tick
        assert on_tick == []
    finally:
        for n in nodes:
            n.destroy_synchronous()
