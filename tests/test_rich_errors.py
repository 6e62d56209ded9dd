"""google.rpc.Status details on every error: ErrorInfo (stable reason),
BadRequest (the field), RetryInfo (when to retry); the SDK maps them back."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import strategies as st

from cluster.local import LocalCluster, wait_until
from raftstate import richstatus
from raftstate.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from raftstate.sdk import DeviceClient
from raftstate.sdk.retry import MAX_SERVER_DELAY_S, Backoff
from raftstate.v1 import device_pb2, device_pb2_grpc


def unpack(details: object) -> dict[str, object]:
    """The known detail messages of a Status (or ack) by type name."""
    out: dict[str, object] = {}
    for item in details:  # type: ignore[attr-defined]
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if item.Is(cls.DESCRIPTOR):
                msg = cls()
                item.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


# ---- the mapping, without I/O ------------------------------------------------

FIELDS = st.from_regex(r"[a-z_]{1,20}(\[[0-9]{1,4}\]\.[a-z_]{1,10})?", fullmatch=True)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)


@given(field=FIELDS, problem=TEXT)
def test_invalid_argument_carries_its_field_and_round_trips(field: str, problem: str) -> None:
    err = InvalidArgument(field, problem)
    status = status_pb2.Status.FromString(richstatus.status_trailer(err)[1])
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    found = unpack(status.details)
    bad = found["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, problem)]  # type: ignore[attr-defined]
    info = found["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "raftstate.dev")  # type: ignore[attr-defined]
    assert "RetryInfo" not in found
    back = richstatus.decode(grpc.StatusCode.INVALID_ARGUMENT, "whatever", status.details)
    assert isinstance(back, InvalidArgument)
    assert (back.field, back.problem, back.reason) == (field, problem, "INVALID_ARGUMENT")


CASES: list[tuple[RaftStateError, str, bool]] = [
    (Unavailable("no leader elected; x", "NO_LEADER"), "NO_LEADER", True),
    (Unavailable("x not committed in time", "NO_QUORUM"), "NO_QUORUM", True),
    (Unavailable("node is shutting down", "SHUTTING_DOWN"), "SHUTTING_DOWN", True),
    (Unavailable("plain"), "UNAVAILABLE", True),
    (NotLeader("not the leader", "127.0.0.1:7001"), "NOT_LEADER", True),
    (ResourceExhausted("max_pending_heartbeats: 10 waiting"), "LIMIT_MAX_PENDING_HEARTBEATS", True),
    (ResourceExhausted("no config field here"), "RESOURCE_EXHAUSTED", True),
    (QuotaExceeded("max_devices", "the cluster holds 30"), "QUOTA_MAX_DEVICES", False),
    (QuotaExceeded("max_state_bytes", "full"), "QUOTA_MAX_STATE_BYTES", False),
    (NotFound("device_id: 'x' has never sent a heartbeat"), "DEVICE_NOT_FOUND", False),
    (Unauthenticated("token: expired"), "UNAUTHENTICATED", False),
    (PermissionDenied("needs operator"), "PERMISSION_DENIED", False),
    (DeadlineExceeded("late"), "DEADLINE_EXCEEDED", False),
    (Cancelled("restart"), "CANCELLED", False),
]


@pytest.mark.parametrize(("err", "reason", "retry_info"), CASES)
def test_every_error_has_a_stable_reason_and_retry_info_where_retrying_helps(
    err: RaftStateError, reason: str, retry_info: bool
) -> None:
    found = unpack(richstatus.encode_details(err))
    info = found["ErrorInfo"]
    assert (info.reason, info.domain) == (reason, "raftstate.dev")  # type: ignore[attr-defined]
    assert ("RetryInfo" in found) is retry_info
    back = richstatus.decode(err.grpc_code, err.message, richstatus.encode_details(err))
    assert type(back) is type(err)
    assert back.reason == reason
    if retry_info:
        assert back.retry_delay_s == richstatus.retry_delay_s(err)
    else:
        assert back.retry_delay_s is None
    if isinstance(err, NotLeader):
        assert isinstance(back, NotLeader) and back.leader_hint == err.leader_hint
    if isinstance(err, QuotaExceeded):
        assert isinstance(back, QuotaExceeded) and back.quota == err.quota


def test_a_status_without_details_decodes_from_code_and_message() -> None:
    back = richstatus.decode(grpc.StatusCode.INVALID_ARGUMENT, "seq: must be at least 1")
    assert isinstance(back, InvalidArgument) and back.field == "seq"
    assert back.reason == "" and back.retry_delay_s is None


def test_a_broken_details_trailer_is_ignored() -> None:
    back = richstatus.decode_trailer(
        grpc.StatusCode.UNAVAILABLE, "x", [(richstatus.DETAILS_KEY, b"\xff\xff")]
    )
    assert isinstance(back, Unavailable) and back.retry_delay_s is None


@given(attempt=st.integers(0, 64), asked=st.floats(0.0, 1000.0))
def test_backoff_never_retries_before_the_server_delay(attempt: int, asked: float) -> None:
    backoff = Backoff()
    err = Unavailable("x")
    err.retry_delay_s = asked
    wait = backoff.after(attempt, err)
    assert wait >= min(asked, MAX_SERVER_DELAY_S)
    assert wait <= max(backoff.cap_s, MAX_SERVER_DELAY_S)


# ---- on a real cluster ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    from raftstate.config import NodeConfig

    cluster = LocalCluster(
        tmp_path_factory.mktemp("rich"), 3, base_config=NodeConfig.for_tests()
    )
    cluster.start(timeout_s=60)
    yield cluster  # type: ignore[misc]
    cluster.stop()


@pytest.mark.cluster
def test_unary_invalid_argument_carries_bad_request_in_the_standard_trailer(
    shared: LocalCluster,
) -> None:
    with grpc.insecure_channel(shared.endpoints[0]) as ch:
        s = device_pb2_grpc.DeviceStateServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            s.Heartbeat(device_pb2.HeartbeatRequest(device_id="rich-1", seq=0), timeout=10)
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        found = unpack(status.details)
        assert [v.field for v in found["BadRequest"].field_violations] == ["seq"]  # type: ignore[attr-defined]
        assert found["ErrorInfo"].reason == "INVALID_ARGUMENT"  # type: ignore[attr-defined]

        with pytest.raises(grpc.RpcError) as info:
            s.GetDevice(device_pb2.GetDeviceRequest(device_id="rich-none"), timeout=10)
        status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
        assert status is not None
        assert unpack(status.details)["ErrorInfo"].reason == "DEVICE_NOT_FOUND"  # type: ignore[attr-defined]


@pytest.mark.cluster
def test_stream_and_batch_acks_carry_the_same_details(shared: LocalCluster) -> None:
    with grpc.insecure_channel(shared.endpoints[1]) as ch:
        s = device_pb2_grpc.DeviceStateServiceStub(ch)
        reqs = [
            device_pb2.HeartbeatStreamRequest(device_id="rich-s", seq=1),
            device_pb2.HeartbeatStreamRequest(device_id="rich-s", seq=2, ttl_s=10**7),
        ]
        acks = list(s.HeartbeatStream(iter(reqs), timeout=10))
        assert acks[0].code == 0 and not acks[0].details
        assert acks[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        found = unpack(acks[1].details)
        assert [v.field for v in found["BadRequest"].field_violations] == ["ttl_s"]  # type: ignore[attr-defined]

        batch = s.HeartbeatBatch(
            device_pb2.HeartbeatBatchRequest(
                heartbeats=[
                    device_pb2.HeartbeatRequest(device_id="rich-b", seq=1),
                    device_pb2.HeartbeatRequest(device_id="bad id", seq=1),
                ]
            ),
            timeout=10,
        )
        assert batch.acks[0].code == 0 and not batch.acks[0].details
        found = unpack(batch.acks[1].details)
        field = [v.field for v in found["BadRequest"].field_violations]  # type: ignore[attr-defined]
        assert field == ["heartbeats[1].device_id"]
        assert found["ErrorInfo"].domain == "raftstate.dev"  # type: ignore[attr-defined]


@pytest.mark.cluster
def test_sdk_errors_carry_reason_and_field_from_the_details(shared: LocalCluster) -> None:
    from raftstate.sdk import NotFound as SdkNotFound

    with DeviceClient(shared.endpoints, deadline_s=10) as client:
        with pytest.raises(SdkNotFound) as nf:
            client.get("rich-never")
        assert nf.value.reason == "DEVICE_NOT_FOUND"


@pytest.mark.cluster
def test_quota_refusal_is_quota_exceeded_with_its_reason(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(size=1, max_devices=1)
    with DeviceClient(cluster.endpoints, deadline_s=10) as client:
        client.heartbeat("q-1", {})
        with pytest.raises(QuotaExceeded) as info:
            client.heartbeat("q-2", {})
        results = client.heartbeat_batch([("q-1", {}), ("q-3", {})])
    assert info.value.quota == "max_devices"
    assert info.value.reason == "QUOTA_MAX_DEVICES"
    assert info.value.retry_delay_s is None
    assert results[0].error is None
    err = results[1].error
    assert isinstance(err, QuotaExceeded) and err.reason == "QUOTA_MAX_DEVICES"


@pytest.mark.cluster
def test_unavailable_without_quorum_carries_retry_info(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(size=3)
    survivor, *others = list(cluster.nodes)
    for node_id in others:
        cluster.stop_node(node_id)
    endpoint = cluster.nodes[survivor].endpoint
    with grpc.insecure_channel(endpoint) as ch:
        s = device_pb2_grpc.DeviceStateServiceStub(ch)

        def refused() -> bool:
            try:
                s.Heartbeat(device_pb2.HeartbeatRequest(device_id="nq", seq=1), timeout=2)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined, no-any-return]
            return False

        wait_until(refused, 30, "UNAVAILABLE without a quorum")
        with pytest.raises(grpc.RpcError) as info:
            s.Heartbeat(device_pb2.HeartbeatRequest(device_id="nq", seq=2), timeout=2)
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    found = unpack(status.details)
    assert found["ErrorInfo"].reason in ("NO_LEADER", "NO_QUORUM")  # type: ignore[attr-defined]
    delay = found["RetryInfo"].retry_delay  # type: ignore[attr-defined]
    assert 0 < delay.seconds + delay.nanos / 1e9 <= MAX_SERVER_DELAY_S
    # The SDK retries until its deadline and keeps the reason of the last
    # answer, also when its final attempt timed out without an answer.
    with DeviceClient([endpoint], deadline_s=3, prefer_leader=False) as client:
        with pytest.raises((Unavailable, DeadlineExceeded)) as gave_up:
            client.heartbeat("nq", {}, seq=3)
    assert gave_up.value.reason in ("NO_LEADER", "NO_QUORUM")
