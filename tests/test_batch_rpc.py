"""HeartbeatBatch on a real three-node cluster: one ack per heartbeat, in
order, each exactly what a unary Heartbeat would have answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import node_devices, wait_caught_up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.local import LocalCluster
from raftstate.admission import MAX_BATCH_REQUEST_BYTES
from raftstate.authz import Role
from raftstate.config import NodeConfig
from raftstate.model import REPORTED_MAX_BYTES
from raftstate.sdk import (
    AsyncDeviceClient,
    BatchItem,
    DeviceClient,
    InvalidArgument,
    PermissionDenied,
    QuotaExceeded,
)
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = pytest.mark.cluster

HB = device_pb2.HeartbeatRequest
OK = 0
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = NodeConfig.for_tests(max_devices=100_000)
    cluster = LocalCluster(tmp_path_factory.mktemp("batch"), 3, base_config=base)
    cluster.start(timeout_s=60)
    try:
        yield cluster
    finally:
        cluster.stop()


def batch(
    endpoint: str, heartbeats: list[device_pb2.HeartbeatRequest], **kw: object
) -> device_pb2.HeartbeatBatchResponse:
    with grpc.insecure_channel(
        endpoint, options=[("grpc.max_send_message_length", 2 * MAX_BATCH_REQUEST_BYTES)]
    ) as ch:
        return device_pb2_grpc.DeviceStateServiceStub(ch).HeartbeatBatch(  # type: ignore[no-any-return]
            device_pb2.HeartbeatBatchRequest(heartbeats=heartbeats), timeout=30, **kw
        )


def leader_endpoint(c: LocalCluster) -> str:
    return c.nodes[c.wait_for_leader()].endpoint


def test_bad_items_get_their_own_error_naming_the_field_and_good_ones_commit(
    shared: LocalCluster,
) -> None:
    far = (time.time_ns() // 1000) + 10 * 86_400 * 10**6  # beyond max_seq_ahead_s
    reqs = [
        HB(device_id="mix-ok-1", seq=1, reported={"a": "1"}),
        HB(device_id="bad id", seq=1),
        HB(device_id="mix-ok-2", seq=1),
        HB(device_id="mix-x", seq=0),
        HB(device_id="mix-y", seq=1, reported={"k": "x" * (REPORTED_MAX_BYTES + 1)}),
        HB(device_id="mix-z", seq=far),
        HB(device_id="mix-t", seq=1, ttl_s=10**9),
        HB(device_id="mix-ok-3", seq=7),
    ]
    res = batch(leader_endpoint(shared), reqs)
    assert [(a.device_id, a.seq) for a in res.acks] == [(r.device_id, r.seq) for r in reqs]
    assert [a.code for a in res.acks] == [OK, INVALID, OK, INVALID, INVALID, INVALID, INVALID, OK]
    fields = [a.message.split(":")[0] for a in res.acks if a.code]
    assert fields == [
        "heartbeats[1].device_id",
        "heartbeats[3].seq",
        "heartbeats[4].reported",
        "heartbeats[5].seq",
        "heartbeats[6].ttl_s",
    ]
    assert [a.result.stored_seq for a in res.acks if a.code == OK] == [1, 1, 7]
    wait_caught_up(shared)
    for node in shared.nodes.values():
        got = node_devices(node.endpoint, "mix-")
        assert got == {"mix-ok-1": 1, "mix-ok-2": 1, "mix-ok-3": 7}, node.node_id


def test_duplicates_in_a_request_and_same_seq_retries_are_applied_once(
    shared: LocalCluster,
) -> None:
    endpoint = leader_endpoint(shared)
    reqs = [
        HB(device_id="dup-a", seq=5, reported={"v": "first"}),
        HB(device_id="dup-a", seq=5, reported={"v": "second"}),
        HB(device_id="dup-a", seq=3),
        HB(device_id="dup-b", seq=1),
        HB(device_id="dup-a", seq=6, reported={"v": "sixth"}),
    ]
    first = batch(endpoint, reqs)
    assert [a.code for a in first.acks] == [OK] * 5
    r = [a.result for a in first.acks]
    assert [x.duplicate for x in r] == [False, True, True, False, False]
    assert [x.stored_seq for x in r] == [5, 5, 5, 1, 6]
    again = batch(endpoint, reqs)  # the whole request retried (e.g. its answer was lost)
    assert all(a.code == OK and a.result.duplicate for a in again.acks)
    assert [a.result.stored_seq for a in again.acks] == [6, 6, 6, 1, 6]
    with DeviceClient(shared.endpoints) as client:
        dev = client.get("dup-a")
    assert dev.seq == 6 and dev.heartbeats == 2 and dict(dev.reported) == {"v": "sixth"}


def test_a_follower_forwards_the_batch_and_every_node_stores_it(shared: LocalCluster) -> None:
    leader = shared.wait_for_leader()
    follower = next(n for n in shared.nodes.values() if n.node_id != leader)
    reqs = [HB(device_id=f"fwd-{i:03d}", seq=1, reported={"i": str(i)}) for i in range(300)]
    res = batch(follower.endpoint, reqs)
    assert all(a.code == OK and not a.result.duplicate for a in res.acks)
    wait_caught_up(shared)
    for node in shared.nodes.values():
        assert node_devices(node.endpoint, "fwd-") == {r.device_id: 1 for r in reqs}


def test_request_bounds_count_bytes_and_empty(shared: LocalCluster) -> None:
    endpoint = leader_endpoint(shared)
    assert list(batch(endpoint, []).acks) == []
    with pytest.raises(grpc.RpcError) as info:
        batch(endpoint, [HB(device_id=f"over-{i}", seq=1) for i in range(1001)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("heartbeats: 1001 heartbeats, at most 1000")
    # Bigger than the byte limit: refused whole, before decoding.
    big = [HB(device_id=f"big-{i}", seq=1, reported={"k": "x" * 8000}) for i in range(600)]
    with pytest.raises(grpc.RpcError) as info:
        batch(endpoint, big)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with DeviceClient(shared.endpoints) as client:
        assert not any(d.device_id.startswith(("over-", "big-")) for d in client.iter_devices())


def test_the_largest_request_commits_whole(shared: LocalCluster) -> None:
    # 1,000 heartbeats (the count limit) filling the 4 MiB byte limit.
    per = (MAX_BATCH_REQUEST_BYTES - 2048) // 1000 - 40
    reqs = [HB(device_id=f"max-{i:04d}", seq=1, reported={"p": "x" * per}) for i in range(1000)]
    size = device_pb2.HeartbeatBatchRequest(heartbeats=reqs).ByteSize()
    assert MAX_BATCH_REQUEST_BYTES - 64 * 1024 < size <= MAX_BATCH_REQUEST_BYTES
    res = batch(leader_endpoint(shared), reqs)
    failed = {(a.code, a.message) for a in res.acks if a.code != OK}
    assert len(res.acks) == 1000 and not failed, failed


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_allowed_size_commits_every_item(shared: LocalCluster, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 1000), "heartbeats")
    # Payloads from 0 up to 8 KiB, as far as the 4 MiB request allows.
    cap = min(REPORTED_MAX_BYTES - 1, (MAX_BATCH_REQUEST_BYTES - 4096) // n - 40)
    sizes = data.draw(st.lists(st.integers(0, cap), min_size=n, max_size=n), "sizes")
    tag = time.time_ns()
    reqs = [
        HB(device_id=f"sz-{tag}-{i}", seq=tag // 1000, reported={"p": "y" * s} if s else {})
        for i, s in enumerate(sizes)
    ]
    res = batch(leader_endpoint(shared), reqs)
    assert [a.code for a in res.acks] == [OK] * n
    assert all(a.result.stored_seq == tag // 1000 for a in res.acks)


def test_sync_sdk_batch_results_are_typed_and_in_order(shared: LocalCluster) -> None:
    with DeviceClient(shared.endpoints) as client:
        items: list[BatchItem | tuple[str, dict[str, str]]] = [
            ("sdk-s-1", {"a": "1"}),
            BatchItem("sdk-s-2", {"b": "2"}, seq=42),
            BatchItem("bad id", {}),
            BatchItem("sdk-s-3", {}, seq=0),
            ("sdk-s-1", {"a": "2"}),  # the same device again: a later seq
        ]
        res = client.heartbeat_batch(items)
        assert [r.ok for r in res] == [True, True, False, False, True]
        assert isinstance(res[2].error, InvalidArgument)
        assert res[2].error.field == "heartbeats[2].device_id"
        assert isinstance(res[3].error, InvalidArgument)
        assert res[3].error.field == "heartbeats[3].seq"
        assert res[1].seq == 42 and res[4].seq > res[0].seq
        again = client.heartbeat_batch([BatchItem("sdk-s-2", {"b": "3"}, seq=42)])
        assert again[0].ack is not None and again[0].ack.duplicate
        assert client.get("sdk-s-1").reported == {"a": "2"}
        # Any number of items: split into requests of at most max_batch.
        client._client.max_batch = 300
        many = client.heartbeat_batch([(f"sdk-m-{i}", {}) for i in range(1000)])
        assert all(r.ok for r in many) and len(many) == 1000


def test_async_sdk_batch_with_a_server_limit_smaller_than_the_client_s(
    make_cluster: object,
) -> None:
    c = make_cluster(batch_rpc_max_heartbeats=100)  # type: ignore[operator]

    async def main() -> None:
        async with AsyncDeviceClient(c.endpoints) as client:
            res = await client.heartbeat_batch([(f"asy-{i}", {"i": str(i)}) for i in range(450)])
            assert all(r.ok for r in res), [r.error for r in res if r.error][:3]
            assert client.max_batch <= 100
            assert [r.device_id for r in res] == [f"asy-{i}" for i in range(450)]

    asyncio.run(main())


def test_quota_refuses_only_the_items_past_it(make_cluster: object) -> None:
    c = make_cluster(max_devices=3)  # type: ignore[operator]
    reqs = [HB(device_id=f"q-{i}", seq=1) for i in range(5)] + [HB(device_id="q-0", seq=2)]
    res = batch(c.nodes[c.wait_for_leader()].endpoint, reqs)
    assert [a.code for a in res.acks] == [OK, OK, OK, EXHAUSTED, EXHAUSTED, OK]
    assert all(a.message.startswith("max_devices:") for a in res.acks if a.code)
    with DeviceClient(c.endpoints) as client:
        out = client.heartbeat_batch([("q-9", {}), ("q-1", {})])
    assert isinstance(out[0].error, QuotaExceeded) and out[1].ok


def test_scoped_credentials_are_checked_per_item(tmp_path: Path) -> None:
    secure = LocalCluster(tmp_path / "secure", 3, base_config=NodeConfig.for_tests(), secure=True)
    try:
        secure.start(timeout_s=60)
        assert secure.pki is not None
        ca = str(secure.pki.ca_cert)
        endpoint = leader_endpoint(secure)
        seq = time.time_ns() // 1000
        reqs = [HB(device_id=d, seq=seq) for d in ("pump-a", "pump-b", "pump-a", "site-1-x")]

        def codes(creds: Credentials) -> list[int]:
            with creds.channel(endpoint) as ch:
                res = device_pb2_grpc.DeviceStateServiceStub(ch).HeartbeatBatch(
                    device_pb2.HeartbeatBatchRequest(heartbeats=reqs),
                    timeout=20,
                    metadata=creds.metadata(),
                )
            return [a.code for a in res.acks]

        device = Credentials(ca=ca, token=secure.issue_token(Role.DEVICE, device_ids=("pump-a",)))
        assert codes(device) == [OK, DENIED, OK, DENIED]
        gateway = Credentials(ca=ca, token=secure.issue_token(Role.GATEWAY, prefix="site-1-"))
        assert codes(gateway) == [DENIED, DENIED, DENIED, OK]
        assert codes(secure.credentials) == [OK, OK, OK, OK]  # admin
        operator = Credentials(ca=ca, token=secure.issue_token(Role.OPERATOR, name="op"))
        with pytest.raises(grpc.RpcError) as info:
            codes(operator)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The SDK reports the refused item as PermissionDenied, the others acked.
        with DeviceClient(secure.endpoints, credentials=device) as client:
            out = client.heartbeat_batch([("pump-a", {}), ("pump-c", {})])
        assert out[0].ok and isinstance(out[1].error, PermissionDenied)
        wait_caught_up(secure)
        with DeviceClient(secure.endpoints, credentials=secure.credentials) as admin:
            names = {d.device_id for d in admin.iter_devices()}
        assert "pump-c" not in names
    finally:
        secure.stop()


def test_simulate_gateways_sends_batches_for_every_device(shared: LocalCluster) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable, "-m", "raftstate", "simulate",
            "--endpoints", ",".join(shared.endpoints),
            "--gateways", "3", "--devices-per-gateway", "40",
            "--interval", "0.5", "--duration", "2", "--prefix", "simgw-",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "120 devices behind 3 gateways" in out.stdout and ", 0 errors" in out.stdout
    with DeviceClient(shared.endpoints) as client:
        ids = {d.device_id for d in client.iter_devices("simgw-")}
    assert len(ids) == 120
