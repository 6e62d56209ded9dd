"""A real three-node cluster on loopback: heartbeats, reads, bad input."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import node_devices, wait_caught_up

from cluster.local import LocalCluster, wait_until
from raftstate.model import Consistency, OnlineFilter
from raftstate.sdk import DeviceClient, InvalidArgument, NotFound, Unavailable
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    """One cluster for the read-mostly tests in this module."""
    from raftstate.config import NodeConfig

    cluster = LocalCluster(tmp_path_factory.mktemp("shared"), 3, base_config=NodeConfig.for_tests())
    cluster.start(timeout_s=60)
    yield cluster  # type: ignore[misc]
    cluster.stop()


def stub(endpoint: str) -> tuple[grpc.Channel, device_pb2_grpc.DeviceStateServiceStub]:
    ch = grpc.insecure_channel(endpoint)
    return ch, device_pb2_grpc.DeviceStateServiceStub(ch)


def test_heartbeats_via_sdk_are_visible_on_every_node(shared: LocalCluster) -> None:
    acked: dict[str, int] = {}
    with DeviceClient(shared.endpoints) as client:
        for round_ in range(3):
            for i in range(20):
                ack = client.heartbeat(f"vis-{i:02d}", {"round": str(round_)})
                assert not ack.duplicate
                acked[ack.device_id] = ack.seq
    wait_caught_up(shared)
    for node in shared.nodes.values():
        seen = {d: s for d, s in node_devices(node.endpoint).items() if d.startswith("vis-")}
        assert seen == acked, f"{node.node_id} differs"


def test_linearizable_read_on_a_follower_sees_the_acknowledged_write(shared: LocalCluster) -> None:
    leader = shared.wait_for_leader()
    follower = next(n for n in shared.nodes.values() if n.node_id != leader)
    ch, s = stub(follower.endpoint)
    with ch:
        for seq in range(1, 30):
            s.Heartbeat(
                device_pb2.HeartbeatRequest(device_id="lin", seq=seq, reported={"s": str(seq)}),
                timeout=10,
            )
            got = s.GetDevice(device_pb2.GetDeviceRequest(device_id="lin"), timeout=10)
            assert got.device.seq == seq and got.device.reported["s"] == str(seq)


def test_retried_heartbeat_is_applied_once(shared: LocalCluster) -> None:
    with DeviceClient(shared.endpoints) as client:
        first = client.heartbeat("retry-1", {"v": "a"}, seq=77)
        again = client.heartbeat("retry-1", {"v": "b"}, seq=77)
        older = client.heartbeat("retry-1", {"v": "c"}, seq=10)
        dev = client.get("retry-1")
    assert not first.duplicate
    assert again.duplicate and again.stored_seq == 77 and again.revision == first.revision
    assert older.duplicate and older.stored_seq == 77
    assert (
        dev.heartbeats == 1 and dict(dev.reported) == {"v": "a"} and dev.revision == first.revision
    )


def test_get_unknown_device_is_not_found(shared: LocalCluster) -> None:
    with DeviceClient(shared.endpoints) as client, pytest.raises(NotFound, match="never-seen"):
        client.get("never-seen")


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Heartbeat", device_pb2.HeartbeatRequest(device_id="bad id", seq=1), "device_id"),
        ("Heartbeat", device_pb2.HeartbeatRequest(device_id="", seq=1), "device_id"),
        ("Heartbeat", device_pb2.HeartbeatRequest(device_id="d" * 129, seq=1), "device_id"),
        ("Heartbeat", device_pb2.HeartbeatRequest(device_id="ok", seq=0), "seq"),
        (
            "Heartbeat",
            device_pb2.HeartbeatRequest(
                device_id="ok", seq=1, reported={f"k{i}": "v" for i in range(65)}
            ),
            "reported",
        ),
        (
            "Heartbeat",
            device_pb2.HeartbeatRequest(device_id="ok", seq=1, reported={"k": "x" * 9000}),
            "reported",
        ),
        ("GetDevice", device_pb2.GetDeviceRequest(device_id="ok", consistency=9), "consistency"),
        ("GetDevice", device_pb2.GetDeviceRequest(device_id="a/b"), "device_id"),
        ("ListDevices", device_pb2.ListDevicesRequest(filter=9), "filter"),
        ("ListDevices", device_pb2.ListDevicesRequest(page_size=5000), "page_size"),
        ("ListDevices", device_pb2.ListDevicesRequest(page_token="%%%"), "page_token"),
        ("ListDevices", device_pb2.ListDevicesRequest(prefix="a b"), "prefix"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    shared: LocalCluster, method: str, request_: object, field: str
) -> None:
    leader = shared.wait_for_leader()
    before = shared.status(leader)
    ch, s = stub(shared.nodes[leader].endpoint)
    with ch, pytest.raises(grpc.RpcError) as exc:
        getattr(s, method)(request_, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(field + ":")
    after = shared.status(leader)
    assert before is not None and after is not None and after.revision == before.revision


def test_sdk_raises_invalid_argument_without_retrying(shared: LocalCluster) -> None:
    with DeviceClient(shared.endpoints) as client:
        with pytest.raises(InvalidArgument) as exc:
            client.heartbeat("ok", {"k": "v"}, seq=0)
        assert exc.value.field == "seq"
        assert client._client.retries == 0  # noqa: SLF001


def test_list_devices_pages_and_filters(shared: LocalCluster) -> None:
    with DeviceClient(shared.endpoints) as client:
        for i in range(25):
            client.heartbeat(f"page-{i:03d}", {}, ttl_s=3600)
        client.heartbeat("page-offline", {}, ttl_s=1)
        first = client.list("page-", page_size=10)
        assert [d.device_id for d in first.devices] == [f"page-{i:03d}" for i in range(10)]
        every = [d.device_id for d in client.iter_devices("page-", page_size=10)]
        assert every == [f"page-{i:03d}" for i in range(25)] + ["page-offline"]
        wait_until(lambda: not client.get("page-offline").online, 10, "page-offline to go offline")
        offline = [d.device_id for d in client.iter_devices("page-", online=OnlineFilter.OFFLINE)]
        online = [d.device_id for d in client.iter_devices("page-", online=OnlineFilter.ONLINE)]
        assert offline == ["page-offline"] and len(online) == 25
        ser = client.list("page-", page_size=5, consistency=Consistency.SERIALIZABLE)
        assert len(ser.devices) == 5


def test_heartbeat_stream_acks_each_message_in_order(shared: LocalCluster) -> None:
    reqs = [
        device_pb2.HeartbeatStreamRequest(device_id="st-1", seq=1),
        device_pb2.HeartbeatStreamRequest(device_id="bad id", seq=1),
        device_pb2.HeartbeatStreamRequest(device_id="st-1", seq=2),
        device_pb2.HeartbeatStreamRequest(device_id="st-1", seq=2),
        device_pb2.HeartbeatStreamRequest(device_id="st-2", seq=0),
    ]
    ch, s = stub(shared.endpoints[0])
    with ch:
        acks = list(s.HeartbeatStream(iter(reqs), timeout=10))
    assert [(a.device_id, a.seq) for a in acks] == [(r.device_id, r.seq) for r in reqs]
    codes = [grpc.StatusCode.INVALID_ARGUMENT.value[0] if a.code else 0 for a in acks]
    assert [a.code for a in acks] == codes == [0, 3, 0, 0, 3]
    assert acks[1].message.startswith("device_id:") and acks[4].message.startswith("seq:")
    assert not acks[2].result.duplicate and acks[3].result.duplicate


def test_health_service_reports_serving(shared: LocalCluster) -> None:
    request = health_pb2.HealthCheckRequest(service="raftstate.v1.DeviceStateService")
    serving = health_pb2.HealthCheckResponse.SERVING
    for endpoint in shared.endpoints:
        with grpc.insecure_channel(endpoint) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            wait_until(
                lambda h=health: h.Check(request, timeout=2).status == serving,
                10,
                f"{endpoint} to report SERVING",
            )


def test_status_reports_one_leader_and_all_members(shared: LocalCluster) -> None:
    leader = shared.wait_for_leader()
    for node_id in shared.nodes:
        st = shared.status(node_id)
        assert st is not None
        assert st.leader_id == leader
        assert st.leader_grpc_address == shared.nodes[leader].endpoint
        assert sorted(m.node_id for m in st.members) == ["n1", "n2", "n3"]
        assert st.transport == "udp" and st.durability == "process-crash"
        # The election barrier is in every log; nothing is applied that is not in it.
        assert st.last_log_index >= 1 and st.last_log_index >= st.last_applied
        for m in st.members:
            if m.node_id == node_id:
                assert m.path == "" and m.sessions == 0
            else:  # the link as this node sees it
                assert m.path == "static" and m.connected and m.sessions >= 1, m
                assert 0.0 <= m.loss_rate <= 1.0


def test_status_reports_link_rtt_between_leader_and_followers(shared: LocalCluster) -> None:
    """RTT is sampled from ACKed data, so it appears on links that carry Raft
    traffic (leader <-> followers); follower <-> follower links stay idle."""
    leader = shared.wait_for_leader()

    def rtts_measured() -> bool:
        for node_id in shared.nodes:
            st = shared.status(node_id)
            if st is None:
                return False
            peers = [m for m in st.members if m.node_id != node_id]
            busy = peers if node_id == leader else [m for m in peers if m.node_id == leader]
            if not all(0 < m.rtt_ms < 1000 for m in busy):
                return False
        return True

    wait_until(rtts_measured, 10, "an RTT sample on every leader <-> follower link")


def test_status_reports_no_loss_or_rtt_for_links_that_measured_none(shared: LocalCluster) -> None:
    """Idle follower <-> follower links carry no frames of their own: their
    loss is unset (not the 2 % prior), their RTT unset or a real sample;
    leader links report a measured loss once enough frames were acked."""
    leader = shared.wait_for_leader()

    def leader_links_measured() -> bool:
        st = shared.status(leader)
        peers = [] if st is None else [m for m in st.members if m.node_id != leader]
        return bool(peers) and all(m.HasField("loss_rate") for m in peers)

    wait_until(leader_links_measured, 10, "a loss rate on every leader -> follower link")
    for node_id in shared.nodes:
        if node_id == leader:
            continue
        st = shared.status(node_id)
        assert st is not None and st.leader_id == leader
        for m in st.members:
            if m.node_id in (node_id, leader):
                continue
            assert not m.HasField("loss_rate"), m
            assert not m.HasField("rtt_ms") or m.rtt_ms > 0, m


def test_without_quorum_writes_fail_unavailable_within_deadline(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(start=False)
    cluster.start_node("n1")  # alone: can never elect a leader
    wait_until(lambda: cluster.status("n1") is not None, 30, "n1 to serve gRPC")
    with DeviceClient([cluster.nodes["n1"].endpoint], deadline_s=1.5) as client:
        with pytest.raises(Unavailable, match="no leader"):
            client.heartbeat("lonely", {})
    ch, s = stub(cluster.nodes["n1"].endpoint)
    with ch, pytest.raises(grpc.RpcError) as exc:
        s.Heartbeat(device_pb2.HeartbeatRequest(device_id="lonely", seq=1), timeout=1.0)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no leader" in exc.value.details()


def test_client_without_leader_preference_reads_and_writes_through_its_node(
    shared: LocalCluster,
) -> None:
    leader = shared.wait_for_leader()
    follower = next(n for n in shared.nodes.values() if n.node_id != leader)
    with DeviceClient([follower.endpoint], prefer_leader=False) as client:
        ack = client.heartbeat("near-1", {"via": "follower"})
        assert client.get("near-1").seq == ack.seq
        assert client.status().node_id == follower.node_id
