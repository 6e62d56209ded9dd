"""End to end on a real secure cluster: who may call what, and revocation.

Every cell of {credential} x {method} answers the expected status code, and
no refused call writes anything (checked on every node afterwards)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.local import LocalCluster, wait_until
from raftstate import pki as pkilib
from raftstate.authz import Role, format_token_keys, new_token_key, parse_token_keys, sign_token
from raftstate.config import NodeConfig
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)

OK, UNAUTH, DENIED = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED"
HANDSHAKE = "UNAVAILABLE"  # a TLS handshake refused: no gRPC status can be sent
METHODS = ("heartbeat", "stream", "get", "list", "delete", "status")
VICTIM = "pump-b"  # never written; the cells try to write or delete it


def _base() -> NodeConfig:
    return NodeConfig.for_tests(compaction_min_entries=20)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("secure"), 3, base_config=_base(), secure=True)
    c.start()
    try:
        leader = c.nodes[c.wait_for_leader()].endpoint
        for device_id in ("pump-a", "site-3-a"):
            assert call("heartbeat", leader, c.credentials, device_id) == OK
        yield c
    finally:
        c.stop()


def call(method: str, endpoint: str, creds: Credentials, device_id: str = VICTIM) -> str:
    """One call; the status code name (stream: the first ack's code)."""
    md = creds.metadata()
    with creds.channel(endpoint) as ch:
        dev = device_pb2_grpc.DeviceStateServiceStub(ch)
        hb = device_pb2.HeartbeatRequest(
            device_id=device_id, seq=time.time_ns() // 1000, reported={"k": "v"}
        )
        try:
            if method == "heartbeat":
                dev.Heartbeat(hb, timeout=10, metadata=md)
            elif method == "stream":
                ack = next(iter(dev.HeartbeatStream(iter([hb]), timeout=10, metadata=md)))
                return grpc.StatusCode.OK.name if ack.code == 0 else _code_name(ack.code)
            elif method == "get":
                dev.GetDevice(
                    device_pb2.GetDeviceRequest(device_id=device_id), timeout=10, metadata=md
                )
            elif method == "list":
                dev.ListDevices(device_pb2.ListDevicesRequest(), timeout=10, metadata=md)
            elif method == "delete":
                dev.DeleteDevice(
                    device_pb2.DeleteDeviceRequest(device_id=device_id), timeout=10, metadata=md
                )
            else:
                cluster_pb2_grpc.ClusterServiceStub(ch).Status(
                    cluster_pb2.StatusRequest(), timeout=10, metadata=md
                )
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[attr-defined, no-any-return]
    return OK


def _code_name(value: int) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == value)


def _token_creds(c: LocalCluster, role: Role, **kw: object) -> Credentials:
    assert c.pki is not None
    return Credentials(ca=str(c.pki.ca_cert), token=c.issue_token(role, **kw))  # type: ignore[arg-type]


def _foreign_ca_cert(tmp: Path) -> Credentials:
    other = pkilib.make_cluster_pki(tmp / "other", [])
    return Credentials(ca=None, cert=str(other.admin.cert), key=str(other.admin.key))


def _revoke(c: LocalCluster, endpoint: str, token: str) -> auth_pb2.RevokeTokenResponse:
    with c.credentials.channel(endpoint) as ch:
        return auth_pb2_grpc.AuthServiceStub(ch).RevokeToken(  # type: ignore[no-any-return]
            auth_pb2.RevokeTokenRequest(token=token), timeout=10, metadata=c.credentials.metadata()
        )


def _state(c: LocalCluster) -> dict[str, tuple[int, int]]:
    """(revision, devices) per node, once every node has applied the leader's commit index."""
    leader = c.status(c.wait_for_leader())
    assert leader is not None
    for node_id in c.nodes:
        c.wait_applied(node_id, leader.commit_index)
    out = {}
    for node_id in c.nodes:
        st = c.status(node_id)
        assert st is not None
        out[node_id] = (st.revision, st.devices)
    return out


def test_the_credential_method_matrix_with_nothing_written(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    c = cluster
    assert c.pki is not None
    ca = str(c.pki.ca_cert)
    revoked_token = c.issue_token(Role.DEVICE, device_ids=(VICTIM,))
    leader = c.nodes[c.wait_for_leader()].endpoint
    assert _revoke(c, leader, revoked_token).already_revoked is False
    foreign_key = {"k1": new_token_key()}
    foreign = sign_token(
        auth_pb2.TokenClaims(
            role=int(Role.ADMIN), token_id=b"\x07" * 8, issued_at_s=0, expires_at_s=2**40
        ),
        "k1",
        foreign_key["k1"],
    )
    assert format_token_keys(foreign_key)  # a well-formed key, just not this cluster's
    rows = {
        "no credential": (Credentials(ca=ca), {m: UNAUTH for m in METHODS}),
        "wrong CA (client certificate)": (
            _foreign_ca_cert(tmp_path),
            {m: HANDSHAKE for m in METHODS},
        ),
        "wrong key (token of another cluster)": (
            Credentials(ca=ca, token=foreign),
            {m: UNAUTH for m in METHODS},
        ),
        "expired token": (
            Credentials(
                ca=ca,
                token=c.issue_token(Role.ADMIN, ttl_s=60, now_s=int(time.time()) - 120),
            ),
            {m: UNAUTH for m in METHODS},
        ),
        "revoked token": (Credentials(ca=ca, token=revoked_token), {m: UNAUTH for m in METHODS}),
        "device A writing B": (
            _token_creds(c, Role.DEVICE, device_ids=("pump-a",)),
            {m: DENIED for m in METHODS},
        ),
        "gateway outside its prefix": (
            _token_creds(c, Role.GATEWAY, prefix="site-3-"),
            {m: DENIED for m in METHODS},
        ),
        "operator writing": (
            _token_creds(c, Role.OPERATOR, name="alice"),
            {
                "heartbeat": DENIED,
                "stream": DENIED,
                "get": "NOT_FOUND",  # allowed to read; the victim does not exist
                "list": OK,
                "delete": OK,  # allowed; idempotent on a missing device: nothing changes
                "status": OK,
            },
        ),
    }
    endpoints = {m: e for m, e in zip(METHODS, [*c.endpoints, *c.endpoints], strict=False)}
    before = _state(c)
    got, want = {}, {}
    for name, (creds, expected) in rows.items():
        for method in METHODS:
            # Spread the cells over leader and followers; certificates use the mTLS ports.
            i = METHODS.index(method) % 3
            endpoint = c.mtls_endpoints[i] if creds.cert else endpoints[method]
            got[(name, method)] = call(method, endpoint, creds)
            want[(name, method)] = expected[method]
    assert got == want
    assert _state(c) == before, "a refused call changed the state"
    for node_id in c.nodes:  # and the victim exists on no node
        assert call("get", c.nodes[node_id].endpoint, c.credentials) == "NOT_FOUND"


def test_admin_may_do_everything_and_in_scope_credentials_work(cluster: LocalCluster) -> None:
    c = cluster
    for method in METHODS:
        assert call(method, c.endpoints[1], c.credentials, "admin-dev") == OK, method
    device = _token_creds(c, Role.DEVICE, device_ids=("pump-a",))
    gateway = _token_creds(c, Role.GATEWAY, prefix="site-3-")
    listed = _token_creds(c, Role.GATEWAY, device_ids=("x-1", "x-2"))
    for creds, device_id in ((device, "pump-a"), (gateway, "site-3-b"), (listed, "x-2")):
        for method in ("heartbeat", "stream", "get"):
            assert call(method, c.endpoints[2], creds, device_id) == OK, (method, device_id)
    # A client certificate with the operator identity, on the mTLS port.
    assert c.pki is not None
    op = pkilib.issue_client_pair(c.pki, c.base_dir, "op", "raftstate://operator/bob")
    op_creds = Credentials(ca=str(c.pki.ca_cert), cert=str(op.cert), key=str(op.key))
    assert call("status", c.mtls_endpoints[0], op_creds) == OK
    assert call("heartbeat", c.mtls_endpoints[0], op_creds) == DENIED
    admin_cert = Credentials(
        ca=str(c.pki.ca_cert), cert=str(c.pki.admin.cert), key=str(c.pki.admin.key)
    )
    assert call("heartbeat", c.mtls_endpoints[1], admin_cert, "cert-dev") == OK
    # A certificate is not a token: on the token port it is not even asked for.
    assert call("status", c.endpoints[0], admin_cert) == UNAUTH


def test_a_stream_goes_on_after_a_denied_message(cluster: LocalCluster) -> None:
    c = cluster
    creds = _token_creds(c, Role.DEVICE, device_ids=("pump-a",))
    seq = time.time_ns() // 1000
    reqs = [
        device_pb2.HeartbeatStreamRequest(device_id=d, seq=seq + i)
        for i, d in enumerate(["pump-a", VICTIM, "pump-a"])
    ]
    with creds.channel(c.endpoints[0]) as ch:
        acks = list(
            device_pb2_grpc.DeviceStateServiceStub(ch).HeartbeatStream(
                iter(reqs), timeout=10, metadata=creds.metadata()
            )
        )
    assert [a.code for a in acks] == [0, grpc.StatusCode.PERMISSION_DENIED.value[0], 0]


def test_revocation_reaches_every_node_and_survives_restart_and_snapshot(
    cluster: LocalCluster,
) -> None:
    c = cluster
    leader_id = c.wait_for_leader()
    follower_id = next(n for n in c.nodes if n != leader_id)
    follower = c.nodes[follower_id].endpoint
    with c.credentials.channel(c.nodes[leader_id].endpoint) as ch:
        issued = auth_pb2_grpc.AuthServiceStub(ch).IssueToken(
            auth_pb2.IssueTokenRequest(role=int(Role.DEVICE), device_ids=["rv-1"], ttl_s=3600),
            timeout=10,
            metadata=c.credentials.metadata(),
        )
    creds = Credentials(ca=c.credentials.ca, token=issued.token)
    assert call("heartbeat", follower, creds, "rv-1") == OK
    res = _revoke(c, c.nodes[leader_id].endpoint, issued.token_id)
    assert res.token_id == issued.token_id and not res.already_revoked
    for node in c.nodes.values():  # every node, followers included, once applied
        wait_until(lambda n=node: call("get", n.endpoint, creds, "rv-1") == UNAUTH, 10, "revoked")
    # Enough entries for a snapshot (compaction_min_entries=20), then restart a follower.
    for i in range(30):
        assert call("heartbeat", c.nodes[leader_id].endpoint, c.credentials, f"fill-{i}") == OK
    snapshot = Path(c.nodes[follower_id].config.data_dir) / "snapshot.bin"
    wait_until(snapshot.exists, 20, "a snapshot on the follower")
    c.restart_node(follower_id)
    c.wait_for_leader()
    wait_until(lambda: c.status(follower_id) is not None, 20, "the follower back")
    assert call("heartbeat", follower, creds, "rv-1") == UNAUTH
    assert _revoke(c, follower, issued.token).already_revoked  # by the whole token, idempotent
    keys = parse_token_keys(Path(c.nodes[follower_id].config.token_key_file).read_text())
    assert list(keys) == ["k1"]
