"""The sans-IO pieces behind /metrics, health and the gRPC metrics."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.admission import Quota
from raftstate.authz import Identity, Role
from raftstate.config import Member, NodeConfig
from raftstate.errors import ConfigError, Unauthenticated
from raftstate.grpcmetrics import GrpcMetrics, MethodKey, rpc_type, split_method, status_of
from raftstate.health import NOT_SERVING, SERVING, can_commit, service_health
from raftstate.histogram import LATENCY_BUCKETS_S, Histogram
from raftstate.metrics import OnlineCounter
from raftstate.metricsserver import BadRequest, HttpRequest, decide, parse_request_head, uri_sans
from raftstate.model import Heartbeat
from raftstate.raftevents import CANDIDATE, LEADER, RaftEvents, SnapshotStats
from raftstate.statemachine import DeviceTable, encode_batch, encode_expire

FOLLOWER = 0


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=200))
def test_histogram_buckets_are_cumulative_and_count_every_observation(
    values: list[float],
) -> None:
    hist = Histogram(LATENCY_BUCKETS_S)
    for v in values:
        hist.observe(v)
    snap = hist.snapshot()
    assert snap.count == len(values)
    assert snap.sum == pytest.approx(sum(values))
    for bound, cumulative in zip(snap.buckets, snap.cumulative, strict=False):
        assert cumulative == sum(1 for v in values if v <= bound)
    assert list(snap.cumulative) == sorted(snap.cumulative)


def test_histogram_rejects_unordered_buckets() -> None:
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError):
        Histogram(())


def test_elections_count_own_term_rises_only() -> None:
    ev = RaftEvents(term=5)
    ev.observe(FOLLOWER, 5, "a")  # restored term, known leader: no election
    assert (ev.elections, ev.leader_changes) == (0, 1)
    ev.observe(FOLLOWER, 6, None)  # adopted from another node's RequestVote
    assert ev.elections == 0
    ev.observe(CANDIDATE, 7, None)  # this node stood
    ev.observe(CANDIDATE, 7, None)  # same election, seen again
    assert ev.elections == 1
    ev.observe(CANDIDATE, 8, None)  # timed out, stood again
    ev.observe(LEADER, 8, "me")
    assert (ev.elections, ev.leader_changes) == (2, 2)
    ev.observe(LEADER, 9, "me")  # a single voter wins within the tick it stands
    assert (ev.elections, ev.leader_changes) == (3, 2)
    ev.observe(FOLLOWER, 9, "me")
    ev.observe(FOLLOWER, 10, "b")
    assert ev.leader_changes == 3


def test_snapshot_stats_time_each_write_and_keep_its_size(tmp_path: object) -> None:
    ticks = iter([1.0, 3.5, 10.0])
    stats = SnapshotStats(clock=lambda: next(ticks))
    path = f"{tmp_path}/snap.tmp"

    def write(p: str, data: object) -> None:
        with open(p, "wb") as fh:
            fh.write(b"x" * 1234)

    stats.timed(write)(path, None)
    snap = stats.duration.snapshot()
    assert (snap.count, snap.sum, stats.last_bytes) == (1, 2.5, 1234)

    def fail(p: str, data: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        stats.timed(fail)(path, None)
    assert (stats.failures, stats.duration.snapshot().count) == (1, 1)


def test_grpc_metric_labels_are_bounded_and_named_like_go() -> None:
    assert split_method("/raftstate.v1.DeviceStateService/Heartbeat") == (
        "raftstate.v1.DeviceStateService",
        "Heartbeat",
    )
    assert split_method("garbage") == ("unknown", "unknown")
    assert split_method("/x/") == ("unknown", "unknown")
    assert rpc_type(False, False) == "unary"
    assert rpc_type(True, True) == "bidi_stream"
    assert rpc_type(False, True) == "server_stream"
    assert rpc_type(True, False) == "client_stream"
    assert status_of(None) is grpc.StatusCode.OK
    assert status_of(14) is grpc.StatusCode.UNAVAILABLE
    assert status_of(grpc.StatusCode.NOT_FOUND) is grpc.StatusCode.NOT_FOUND
    m = GrpcMetrics()
    key = MethodKey("unary", "s", "m")
    m.on_start(key)
    m.on_end(key, grpc.StatusCode.CANCELLED, 0.01)
    m.on_end(key, grpc.StatusCode.UNAUTHENTICATED, 0.02)
    started, handled, handling = m.samples()
    assert started == [(key, 1)]
    assert sorted(c for _k, c, _n in handled) == ["Canceled", "Unauthenticated"]
    assert handling[0][1].count == 2


@pytest.mark.parametrize(
    ("leader", "connected", "voters", "expected"),
    [
        ("me", [], 1, True),
        ("me", [], 3, False),  # leader without a quorum (about to step down)
        ("me", ["b"], 3, True),
        ("a", ["a"], 3, True),
        ("a", ["b"], 3, False),  # the leader it remembers is gone
        (None, ["a", "b"], 3, False),
        ("a", ["a"], 5, False),
        ("a", ["a", "b"], 5, True),
        ("a", ["a", "me"], 5, False),  # itself is not counted twice
    ],
)
def test_can_commit_needs_a_reachable_leader_and_a_majority(
    leader: str | None, connected: list[str], voters: int, expected: bool
) -> None:
    assert can_commit(leader, connected, "me", voters) is expected


def test_health_of_raft_services_follows_commit_ability() -> None:
    for service in ("raftstate.v1.DeviceStateService", "raftstate.v1.AuthService"):
        assert service_health(service, can_commit=True, problem=None) == SERVING
        assert service_health(service, can_commit=False, problem=None) == NOT_SERVING
        assert service_health(service, can_commit=True, problem="tick failing") == NOT_SERVING
    for service in ("", "raftstate.v1.ClusterService", "grpc.health.v1.Health"):
        assert service_health(service, can_commit=False, problem="x") == SERVING


def test_request_head_parsing() -> None:
    req = parse_request_head(
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t0k\r\n"
    )
    assert (req.method, req.path, req.headers["authorization"]) == ("GET", "/metrics", "Bearer t0k")
    for bad in (b"GET /metrics", b"GET /metrics SPDY/3", b"GET / HTTP/1.1\r\nno colon here"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)


def _identify(token: str | None, sans: list[str]) -> Identity:
    roles = {"op": Role.OPERATOR, "adm": Role.ADMIN, "dev": Role.DEVICE, "gw": Role.GATEWAY}
    if token in roles:
        return Identity(roles[token], "x", frozenset({"d"}) if token == "dev" else frozenset())
    if sans == ["raftstate://operator/prom"]:
        return Identity(Role.OPERATOR, "prom")
    raise Unauthenticated("bad token")


@pytest.mark.parametrize(
    ("method", "path", "auth", "sans", "status"),
    [
        ("GET", "/metrics", None, [], 401),
        ("GET", "/metrics", "Bearer junk", [], 401),
        ("GET", "/metrics", "Bearer dev", [], 403),
        ("GET", "/metrics", "Bearer gw", [], 403),
        ("GET", "/metrics", "Bearer op", [], None),
        ("GET", "/metrics", "Bearer adm", [], None),
        ("GET", "/metrics", None, ["raftstate://operator/prom"], None),
        ("POST", "/metrics", "Bearer op", [], 405),
        ("GET", "/", "Bearer op", [], 404),
    ],
)
def test_scrape_needs_the_operator_role(
    method: str, path: str, auth: str | None, sans: list[str], status: int | None
) -> None:
    headers = {"authorization": auth} if auth else {}
    answer = decide(HttpRequest(method, path, headers), _identify, sans)
    assert (answer.status if answer else None) == status
    if status == 401:
        assert answer is not None
        assert ("WWW-Authenticate", 'Bearer realm="raftstate"') in answer.extra_headers


def test_scrape_without_auth_is_served_to_anyone() -> None:
    assert decide(HttpRequest("GET", "/metrics", {}), None, []) is None


def test_uri_sans_come_from_the_certificate_only() -> None:
    cert = {"subjectAltName": (("DNS", "x"), ("URI", "raftstate://operator/p"))}
    assert uri_sans(cert) == ["raftstate://operator/p"]
    assert uri_sans({}) == [] and uri_sans(None) == []


@settings(deadline=None, max_examples=40)
@given(
    online=st.integers(min_value=0, max_value=120),
    offline=st.integers(min_value=0, max_value=120),
    page=st.integers(min_value=1, max_value=50),
)
def test_online_count_scans_every_page(online: int, offline: int, page: int) -> None:
    table = DeviceTable(default_ttl_s=30)
    now = 10_000_000
    hbs = [Heartbeat(f"on-{i:04d}", 1, {}, 60) for i in range(online)]
    hbs += [Heartbeat(f"off-{i:04d}", 1, {}, 1) for i in range(offline)]
    if hbs:
        table.apply(encode_batch(hbs, now - 5_000, Quota(0, 0)))
    gone = []
    for h in hbs:
        view = table.get(h.device_id)
        if h.ttl_s == 1 and view is not None:
            gone.append((h.device_id, view.revision))
    table.apply_control(encode_expire(gone, now))
    counter = OnlineCounter(table, page=page)
    assert counter.count_now() == online
    assert asyncio.run(counter.refresh()) == online == counter.value


def test_metrics_listen_is_checked_like_the_grpc_addresses() -> None:
    cfg = NodeConfig.for_tests(
        node_id="n1",
        members=(Member("n1", "127.0.0.1:7101", "127.0.0.1:7001"),),
        cluster_secret="",
        allow_insecure_transport=True,
        transport="tcp",
    )
    cfg.validate()
    dataclasses.replace(cfg, metrics_listen=":9464").validate()
    for bad, field in (("nonsense", "metrics_listen"), ("10.0.0.1:9464", "metrics_listen")):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(cfg, metrics_listen=bad).validate()
