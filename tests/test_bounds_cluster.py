"""Resource bounds on a real three-node cluster: open streams, quotas, List
page bytes, and bad input, each answered with a status naming what was hit."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from helpers import wait_caught_up

from cluster.local import LocalCluster
from raftstate.admission import MAX_REQUEST_BYTES
from raftstate.model import Consistency
from raftstate.sdk import AsyncDeviceClient, DeviceClient, QuotaExceeded
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MakeCluster = Callable[..., LocalCluster]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _leader(cluster: LocalCluster) -> tuple[str, int]:
    node_id = cluster.wait_for_leader()
    st = cluster.status(node_id)
    assert st is not None
    return node_id, st.term


def test_streams_past_max_streams_are_refused_memory_stays_bounded_and_leadership_stays(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(max_streams=100)
    leader, term = _leader(cluster)
    node = cluster.nodes[leader]
    assert node.pid is not None
    with DeviceClient(cluster.endpoints) as client:
        client.heartbeat("warm-up", {"k": "v"})
    rss_before = _rss_kib(node.pid)

    async def flood() -> tuple[int, int, set[str]]:
        accepted, refused, details = 0, 0, set()
        async with grpc.aio.insecure_channel(node.endpoint) as ch:
            stub = device_pb2_grpc.DeviceStateServiceStub(ch)
            kept = []
            for _ in range(6):  # 6 x 500 attempts, the accepted ones stay open
                calls = [stub.HeartbeatStream() for _ in range(500)]
                await asyncio.gather(*(c.initial_metadata() for c in calls))
                for call in calls:
                    if call.done():
                        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        details.add((await call.details()).split(":")[0])
                        refused += 1
                    else:
                        kept.append(call)
                accepted = len(kept)
            for call in kept:
                call.cancel()
        return accepted, refused, details

    accepted, refused, details = asyncio.run(flood())
    assert accepted == 100 and refused == 2_900 and details == {"max_streams"}
    growth_mib = (_rss_kib(node.pid) - rss_before) / 1024
    assert growth_mib < 40, f"leader RSS grew {growth_mib:.0f} MiB"
    after, after_term = _leader(cluster)
    assert (after, after_term) == (leader, term), "leadership moved during the flood"
    with DeviceClient(cluster.endpoints) as client:
        assert client.heartbeat("after-flood", {"k": "v"}).revision > 0


def test_quotas_refuse_naming_the_quota_and_every_node_holds_the_same_state(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(max_devices=30, max_state_bytes=12_000)
    cluster.wait_for_leader()
    endpoints = cluster.endpoints

    async def run() -> tuple[dict[str, int], list[str], list[str]]:
        acked: dict[str, int] = {}
        device_refusals: list[str] = []
        byte_refusals: list[str] = []
        # One client per node, so entries are proposed (and quota-stamped) by
        # every node, forwarded by followers.
        clients = [AsyncDeviceClient([e], prefer_leader=False) for e in endpoints]
        try:

            async def one(i: int, state: dict[str, str], into: list[str]) -> None:
                device_id = f"q-{i:02d}"
                try:
                    ack = await clients[i % 3].heartbeat(device_id, state)
                    acked[device_id] = ack.seq
                except QuotaExceeded as err:
                    into.append(err.quota)

            await asyncio.gather(*(one(i, {"s": "x"}, device_refusals) for i in range(45)))
            big = {"s": "y" * 1_000}
            ids = sorted(int(d[2:]) for d in acked)
            await asyncio.gather(*(one(i, big, byte_refusals) for i in ids))
            # At the quota, an existing device can still shrink its state.
            shrink = ids[0]
            await one(shrink, {"s": "z"}, byte_refusals)
        finally:
            for c in clients:
                await c.close()
        return acked, device_refusals, byte_refusals

    acked, device_refusals, byte_refusals = asyncio.run(run())
    assert len(device_refusals) == 15 and set(device_refusals) == {"max_devices"}
    assert byte_refusals and set(byte_refusals) == {"max_state_bytes"}
    wait_caught_up(cluster)
    tables = []
    for node in cluster.nodes.values():
        with DeviceClient([node.endpoint], prefer_leader=False) as client:
            table = {}
            for i in range(45):
                try:
                    d = client.get(f"q-{i:02d}", Consistency.SERIALIZABLE)
                except Exception:
                    continue
                table[d.device_id] = (d.seq, dict(d.reported), d.revision)
            tables.append(table)
    assert tables[0] == tables[1] == tables[2]
    assert len(tables[0]) == 30
    assert sum(len(d) + len(v["s"]) + 1 for d, (_, v, _) in tables[0].items()) <= 12_000
    shrunk = min(tables[0])
    assert tables[0][shrunk][1] == {"s": "z"} and tables[0][shrunk][0] == acked[shrunk]


def test_a_list_of_1000_devices_of_up_to_8_kib_pages_within_the_message_limit(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster()
    cluster.wait_for_leader()
    rng = random.Random(1)
    states = {}
    for i in range(1000):
        size = rng.randint(0, 8 * 1024 - 1)  # the key "s" takes one byte
        states[f"big-{i:04d}"] = {"s": "v" * size} if size or rng.random() < 0.5 else {}

    async def write() -> None:
        async with AsyncDeviceClient(cluster.endpoints) as client, client.stream() as stream:
            await asyncio.gather(*(stream.send(d, s) for d, s in states.items()))

    asyncio.run(write())
    wait_caught_up(cluster)
    endpoint = cluster.endpoints[0]
    with grpc.insecure_channel(endpoint) as ch:  # gRPC's default 4 MiB receive limit
        first = device_pb2_grpc.DeviceStateServiceStub(ch).ListDevices(
            device_pb2.ListDevicesRequest(prefix="big-", page_size=1000), timeout=10
        )
    assert 0 < len(first.devices) < 1000 and first.next_page_token
    with DeviceClient([endpoint], prefer_leader=False) as client:
        seen = {d.device_id: dict(d.reported) for d in client.iter_devices("big-", page_size=1000)}
    assert seen == states


def test_undecodable_or_oversized_requests_are_refused_and_the_log_does_not_grow_per_request(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster()
    cluster.wait_for_leader()
    node = next(iter(cluster.nodes.values()))
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    bad_utf8 = device_pb2.HeartbeatRequest(device_id="x", seq=1).SerializeToString()
    bad_utf8 = bad_utf8.replace(b"x", b"\xff")

    def lines() -> int:
        return len(node.log_path.read_text(errors="replace").splitlines())

    before = lines()
    with grpc.insecure_channel(node.endpoint) as ch:
        unary = ch.unary_unary(
            "/raftstate.v1.DeviceStateService/Heartbeat",
            request_serializer=identity,
            response_deserializer=identity,
        )
        stream = ch.stream_stream(
            "/raftstate.v1.DeviceStateService/HeartbeatStream",
            request_serializer=identity,
            response_deserializer=identity,
        )
        for raw in [b"\xff\xff\xff\xff", bad_utf8] * 1000:
            with pytest.raises(grpc.RpcError) as info:
                unary(raw, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "raftstate.v1.HeartbeatRequest" in (info.value.details() or "")
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as info:
                list(stream(iter([bad_utf8]), timeout=5))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UTF-8" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            unary(b"a" * (MAX_REQUEST_BYTES + 1000), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    grown = lines() - before
    assert grown <= 4, node.log_path.read_text()[-3000:]
