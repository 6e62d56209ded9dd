"""/metrics, reflection and health against a real secure cluster.

One three-node cluster (TLS, tokens, client certificates) serves every test
in this module; each scrape goes over HTTPS to a node's ``metrics_listen``
and is parsed with prometheus_client's own text-format parser.
"""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cluster.local import LocalCluster
from raftstate.authz import Role
from raftstate.config import NodeConfig
from raftstate.metrics import ROLES
from raftstate.node import SERVICE_NAMES
from raftstate.sdk.sync import DeviceClient

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

Families = dict[str, tuple[str, list[Sample]]]
NAME_RE = re.compile(r"(raftstate|grpc_server|process|python)_[a-z0-9_]+")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = dataclasses.replace(NodeConfig.for_tests(), insecure_grpc=False, auth="required")
    c = LocalCluster(tmp_path_factory.mktemp("metrics") / "c", 3, base_config=base)
    try:
        c.start(timeout_s=60)
        yield c
    finally:
        c.stop()


def _tls(cluster: LocalCluster, client_cert: bool = False) -> ssl.SSLContext:
    assert cluster.pki is not None
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
    if client_cert:
        ctx.load_cert_chain(str(cluster.pki.admin.cert), str(cluster.pki.admin.key))
    return ctx


def scrape_raw(
    cluster: LocalCluster, i: int, token: str | None = None, *, client_cert: bool = False
) -> tuple[int, str]:
    req = urllib.request.Request(f"https://{cluster.metrics_endpoints[i]}/metrics")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=_tls(cluster, client_cert), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(cluster: LocalCluster, i: int) -> Families:
    status, text = scrape_raw(cluster, i, cluster.issue_token(Role.OPERATOR, name="prom"))
    assert status == 200, text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(families: Families, name: str, **labels: str) -> float:
    """The value of the sample called ``name`` (full sample name) with ``labels``."""
    family = re.sub(r"(_total|_bucket|_count|_sum)$", "", name)
    for s in families[family][1]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError(f"{name}{labels}")


def wait_until(what: str, check: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_metrics_follow_prometheus_conventions(cluster: LocalCluster) -> None:
    families = scrape(cluster, 0)
    for name, (kind, samples) in families.items():
        assert NAME_RE.fullmatch(name), name
        assert not re.search(r"_(ms|milliseconds|kb|mb)(_|$)", name), name
        if kind == "counter":
            assert all(s.name == name + "_total" for s in samples), name
        if kind == "histogram":
            by_labels: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
            for s in samples:
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                by_labels.setdefault(key, []).append(s)
            for group in by_labels.values():
                buckets = [s for s in group if s.name == name + "_bucket"]
                count = [s.value for s in group if s.name == name + "_count"]
                assert buckets and buckets[-1].labels["le"] == "+Inf", name
                values = [b.value for b in buckets]
                assert values == sorted(values), f"{name}: buckets not cumulative"
                assert count == [values[-1]], name
            if name != "raftstate_raft_batch_heartbeats":
                assert name.endswith("_seconds"), f"{name}: a duration histogram needs a unit"
        if "bytes" in name:
            assert name.endswith(("_bytes", "_bytes_total")), name
    expected = {
        "raftstate_raft_term": "gauge",
        "raftstate_raft_role": "gauge",
        "raftstate_raft_commit_index": "gauge",
        "raftstate_raft_applied_index": "gauge",
        "raftstate_raft_elections": "counter",
        "raftstate_raft_leader_changes": "counter",
        "raftstate_raft_heartbeat_seconds": "gauge",
        "raftstate_raft_election_timeout_min_seconds": "gauge",
        "raftstate_raft_election_timeout_max_seconds": "gauge",
        "raftstate_raft_step_down_seconds": "gauge",
        "raftstate_raft_timing_derived": "gauge",
        "raftstate_raft_proposals": "counter",
        "raftstate_raft_batch_heartbeats": "histogram",
        "raftstate_raft_tick_duration_seconds": "histogram",
        "raftstate_raft_tick_failures": "counter",
        "raftstate_raft_snapshot_duration_seconds": "histogram",
        "raftstate_raft_snapshot_bytes": "gauge",
        "raftstate_raft_journal_bytes": "gauge",
        "raftstate_transport_peer_rtt_seconds": "gauge",
        "raftstate_transport_peer_loss_ratio": "gauge",
        "raftstate_transport_peer_retransmissions": "counter",
        "raftstate_transport_peer_redundant_bytes": "counter",
        "raftstate_transport_peer_path": "gauge",
        "raftstate_transport_peer_sessions": "counter",
        "raftstate_transport_drops": "counter",
        "grpc_server_started": "counter",
        "grpc_server_handled": "counter",
        "grpc_server_handling_seconds": "histogram",
        "raftstate_store_devices": "gauge",
        "raftstate_store_devices_online": "gauge",
        "raftstate_store_revision": "gauge",
        "raftstate_heartbeat_ack_seconds": "histogram",
        "process_cpu_seconds": "counter",
    }
    for name, kind in expected.items():
        assert families.get(name, ("missing",))[0] == kind, name
    # Every other member is a peer with its own series.
    peers = {s.labels["peer"] for s in families["raftstate_transport_peer_sessions"][1]}
    assert peers == {"n2", "n3"}


def test_metrics_agree_with_cluster_status(cluster: LocalCluster) -> None:
    with DeviceClient(cluster.endpoints, **cluster.client_kwargs()) as client:
        for i in range(25):
            client.heartbeat(f"metrics-{i}", {"i": str(i)}, ttl_s=3600)
    for i, node_id in enumerate(cluster.nodes):
        # Let the node apply what was acknowledged, so devices and revision are still.
        leader_status = cluster.status(cluster.leader() or node_id)
        assert leader_status is not None
        target = leader_status.revision

        def applied(n: str = node_id, r: int = target) -> bool:
            st = cluster.status(n)
            return st is not None and st.revision >= r

        wait_until(f"{node_id} applied the writes", applied)
        before = cluster.status(node_id)
        families = scrape(cluster, i)
        after = cluster.status(node_id)
        assert before is not None and after is not None
        term = value(families, "raftstate_raft_term")
        assert before.term <= term <= after.term
        assert before.commit_index <= value(families, "raftstate_raft_commit_index")
        assert value(families, "raftstate_raft_commit_index") <= after.commit_index
        assert value(families, "raftstate_store_devices") == before.devices == after.devices
        assert value(families, "raftstate_store_revision") == before.revision == after.revision
        assert value(families, "raftstate_store_devices_online") == before.devices
        if before.role == after.role:
            role = ROLES[before.role - 1]  # Role enum values 1..3
            assert value(families, "raftstate_raft_role", role=role) == 1
        assert value(families, "raftstate_raft_has_leader") == 1
        assert value(families, "raftstate_raft_leader_changes_total") >= 1
        elections = value(families, "raftstate_raft_elections_total")
        assert before.elections <= elections <= after.elections
        lo, hi = sorted((before.election_timeout_min_ms, after.election_timeout_min_ms))
        assert lo / 1000 <= value(families, "raftstate_raft_election_timeout_min_seconds")
        assert value(families, "raftstate_raft_election_timeout_min_seconds") <= hi / 1000
        for member in after.members:
            if member.node_id != node_id and member.rtt_ms > 0:
                rtt = value(families, "raftstate_transport_peer_rtt_seconds", peer=member.node_id)
                assert rtt > 0
    # The heartbeats went to some node; together the nodes answered all 25.
    handled = answered = 0.0
    for i in range(len(cluster.nodes)):
        families = scrape(cluster, i)
        for s in families["grpc_server_handled"][1]:
            if s.labels["grpc_method"] == "Heartbeat" and s.labels["grpc_code"] == "OK":
                assert s.labels["grpc_service"] == "raftstate.v1.DeviceStateService"
                assert s.labels["grpc_type"] == "unary"
                handled += s.value
        answered += value(families, "raftstate_heartbeat_ack_seconds_count")
    assert handled >= 25
    assert answered >= 25


def test_metrics_need_the_operator_role(cluster: LocalCluster) -> None:
    status, body = scrape_raw(cluster, 1)
    assert status == 401 and "Bearer" in body
    status, _ = scrape_raw(cluster, 1, "rst1.bogus.token.here")
    assert status == 401
    device = cluster.issue_token(Role.DEVICE, device_ids=("pump-1",))
    status, body = scrape_raw(cluster, 1, device)
    assert status == 403 and "operator" in body
    gateway = cluster.issue_token(Role.GATEWAY, prefix="pump-")
    assert scrape_raw(cluster, 1, gateway)[0] == 403
    assert scrape_raw(cluster, 1, cluster.issue_token(Role.OPERATOR, name="p"))[0] == 200
    assert scrape_raw(cluster, 1, cluster.issue_token(Role.ADMIN, name="a"))[0] == 200
    # The admin client certificate works without a token.
    status, text = scrape_raw(cluster, 1, client_cert=True)
    assert status == 200 and "raftstate_raft_term" in text


def _channel(cluster: LocalCluster, token: str | None) -> grpc.Channel:
    assert cluster.pki is not None
    creds = grpc.ssl_channel_credentials(cluster.pki.ca_cert.read_bytes())
    if token is not None:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(cluster.endpoints[0], creds)


def test_reflection_lists_every_service_and_resolves_methods(cluster: LocalCluster) -> None:
    token = cluster.issue_token(Role.DEVICE, device_ids=("pump-1",))
    with _channel(cluster, token) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) == set(SERVICE_NAMES)
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("raftstate.v1.DeviceStateService")
        method = service.methods_by_name["Heartbeat"]
        assert method.input_type.full_name == "raftstate.v1.HeartbeatRequest"
        assert "device_id" in method.input_type.fields_by_name
        status = pool.FindServiceByName("raftstate.v1.ClusterService").methods_by_name["Status"]
        assert status.output_type.full_name == "raftstate.v1.StatusResponse"
    with _channel(cluster, None) as channel, pytest.raises(grpc.RpcError) as err:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_health_serves_every_service_with_list_check_and_watch(cluster: LocalCluster) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    with _channel(cluster, None) as channel:  # health needs no credential
        health = health_pb2_grpc.HealthStub(channel)
        statuses = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
        assert set(statuses) == {"", *SERVICE_NAMES}
        assert all(s.status == serving for s in statuses.values())
        for name in ("", *SERVICE_NAMES):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == serving
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        watch = health.Watch(
            health_pb2.HealthCheckRequest(service="raftstate.v1.DeviceStateService")
        )
        assert next(watch).status == serving
        watch.cancel()


def test_health_per_service_without_quorum(tmp_path: Path) -> None:
    """A node that lost its quorum stops serving the Raft-backed services and
    keeps serving Cluster (how an operator finds out why)."""
    c = LocalCluster(tmp_path / "c", 3, base_config=NodeConfig.for_tests())
    try:
        c.start(timeout_s=60)
        c.stop_node("n2")
        c.stop_node("n3")
        channel = grpc.insecure_channel(c.endpoints[0])
        health = health_pb2_grpc.HealthStub(channel)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

        def lost() -> bool:
            statuses = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
            return statuses["raftstate.v1.DeviceStateService"].status == not_serving

        wait_until("DeviceStateService NOT_SERVING", lost)
        statuses = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
        assert statuses["raftstate.v1.AuthService"].status == not_serving
        cluster_status = statuses["raftstate.v1.ClusterService"].status
        assert cluster_status == health_pb2.HealthCheckResponse.SERVING
        assert statuses[""].status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        # Plaintext metrics without auth on a test cluster: served to anyone.
        # The link goes down when the transport gives up on the peer, which
        # may be after health changed: poll for it.
        def peer_down() -> bool:
            url = f"http://{c.metrics_endpoints[0]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                return 'raftstate_transport_peer_up{peer="n2"} 0.0' in r.read().decode()

        wait_until("peer n2 reported down in /metrics", peer_down)
    finally:
        c.stop()


def test_grafana_dashboard_uses_only_served_metric_names(cluster: LocalCluster) -> None:
    path = Path(__file__).parent.parent / "docs" / "grafana" / "raftstate.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"\b(?:raftstate|grpc_server)_[a-z0-9_]+", e)}
    families = scrape(cluster, 0)  # a family may have no samples yet (no drops)
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
    assert names and bases <= set(families), sorted(bases - set(families))


def test_watch_metrics_count_watchers_and_delivered_events(cluster: LocalCluster) -> None:
    from raftstate.sdk import DeviceClient

    endpoint = cluster.endpoints[0]
    before = scrape(cluster, 0)
    assert value(before, "raftstate_watchers") == 0
    sent0 = value(before, "raftstate_watch_events_sent_total")
    with DeviceClient([endpoint], prefer_leader=False, **cluster.client_kwargs()) as cl:
        with cl.watch(prefix="metrics-w-") as w:
            ack = cl.heartbeat("metrics-w-1", {"k": "v"})
            assert w.next(timeout_s=10).revision == ack.revision
            now = scrape(cluster, 0)
            assert value(now, "raftstate_watchers") == 1
            assert value(now, "raftstate_watch_events_sent_total") >= sent0 + 1
            assert value(now, "raftstate_watch_window_events") >= 1
            assert value(now, "raftstate_watch_window_bytes") > 0
            assert value(now, "raftstate_watch_window_oldest_revision") <= ack.revision
    wait_until("the watcher to go", lambda: value(scrape(cluster, 0), "raftstate_watchers") == 0)
