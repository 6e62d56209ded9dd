"""Watch and reads at a revision on real three-node clusters (real processes,
loopback). Fault and linearizability tests of watches are in the wtest
helper's files; these check the API's contract."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster.local import LocalCluster, wait_until
from raftstate import richstatus
from raftstate.authz import Role
from raftstate.config import NodeConfig
from raftstate.errors import FutureRevision, InvalidArgument, ResyncRequired, RevisionCompacted
from raftstate.model import REPORTED_MAX_BYTES
from raftstate.sdk import DeviceClient, EventKind
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = pytest.mark.cluster

HISTORY = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = NodeConfig.for_tests(watch_history_events=HISTORY, watch_progress_ms=500)
    c = LocalCluster(tmp_path_factory.mktemp("watch"), 3, base_config=base)
    c.start(timeout_s=60)
    try:
        yield c
    finally:
        c.stop()


def client(c: LocalCluster, *order: int) -> DeviceClient:
    eps = c.endpoints
    return DeviceClient([eps[i] for i in order] if order else eps, prefer_leader=not order)


def payloads() -> list[dict[str, str]]:
    """Reported maps from empty to the largest allowed (8 KiB of keys and values)."""
    big = "v" * (REPORTED_MAX_BYTES - 1)
    many = {f"k{i:02d}": "x" * 100 for i in range(64)}
    return [{}, {"a": "1"}, {"t": "y" * 1000}, many, {"b": big}]


def collect(watch: Any, until_revision: int, timeout_s: float = 30.0) -> list[Any]:
    """Events from a SyncWatch until one reaches ``until_revision``."""
    out: list[Any] = []
    end = time.monotonic() + timeout_s
    while not out or out[-1].revision < until_revision:
        out.append(watch.next(timeout_s=max(0.1, end - time.monotonic())))
    return out


def test_each_matching_revision_once_in_order_with_the_whole_payload_range(
    cluster: LocalCluster,
) -> None:
    with client(cluster) as cl, cl.watch(prefix="t1-", prev_device=True) as w:
        acks = []
        for i, reported in enumerate(payloads() * 2):
            acks.append(cl.heartbeat(f"t1-{i % 3}", reported))
            cl.heartbeat(f"x1-{i}", {"noise": str(i)})  # not matching
        events = collect(w, acks[-1].revision)
    assert [e.revision for e in events] == [a.revision for a in acks]
    by_rev = {a.revision: a for a in acks}
    seen: dict[str, Any] = {}
    for ev, reported in zip(events, payloads() * 2, strict=True):
        assert ev.device is not None and ev.device.seq == by_rev[ev.revision].seq
        assert ev.device.reported == reported
        assert EventKind.HEARTBEAT in ev.kinds
        before = seen.get(ev.device_id)
        if before is None:
            assert ev.prev_device is None and EventKind.ONLINE in ev.kinds
        else:
            assert ev.prev_device is not None and ev.prev_device.seq == before.seq
        seen[ev.device_id] = ev.device


def test_kinds_filter_delivers_only_those_kinds(cluster: LocalCluster) -> None:
    with (
        client(cluster) as cl,
        cl.watch(prefix="t2-", kinds=[EventKind.ONLINE, EventKind.DELETED]) as w,
    ):
        first = cl.heartbeat("t2-a", {"v": "1"})
        cl.heartbeat("t2-a", {"v": "2"})  # online already: not delivered
        gone = cl.delete("t2-a")
        events = collect(w, gone.revision)
    assert [(e.revision, sorted(e.kinds)) for e in events] == [
        (first.revision, [EventKind.REPORTED_CHANGED, EventKind.HEARTBEAT, EventKind.ONLINE]),
        (gone.revision, [EventKind.DELETED]),
    ]
    assert events[1].device is None


def test_start_revision_catches_up_from_history_on_every_node(cluster: LocalCluster) -> None:
    with client(cluster) as cl:
        acks = [cl.heartbeat(f"t3-{i}", {"i": str(i)}) for i in range(8)]
    for i, endpoint in enumerate(cluster.endpoints):
        with DeviceClient([endpoint], prefer_leader=False) as cl:
            with cl.watch(prefix="t3-", start_revision=acks[2].revision) as w:
                events = collect(w, acks[-1].revision)
        assert [e.revision for e in events] == [a.revision for a in acks[2:]], f"node {i}"


def test_a_future_start_revision_waits_for_it(cluster: LocalCluster) -> None:
    with client(cluster) as cl:
        now = cl.heartbeat("t4-a", {}).revision
        with cl.watch(prefix="t4-", start_revision=now + 5) as w:
            with pytest.raises(TimeoutError):
                w.next(timeout_s=0.5)
            acks = [cl.heartbeat("t4-a", {"i": str(i)}) for i in range(8)]
            events = collect(w, acks[-1].revision)
    assert events[0].revision >= now + 5
    assert [e.revision for e in events] == [a.revision for a in acks if a.revision >= now + 5]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(prefix="a", device_ids=["b"]), "device_ids"),
        (dict(device_ids=["bad id"]), "device_ids[0]"),
        (dict(kinds=[7]), "kinds[0]"),
        (dict(progress_interval_ms=5), "progress_interval_ms"),
    ],
)
def test_invalid_requests_get_invalid_argument_naming_the_field(
    cluster: LocalCluster, fields: dict[str, Any], field: str
) -> None:
    with grpc.insecure_channel(cluster.endpoints[0]) as ch:
        stub = device_pb2_grpc.DeviceStateServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.Watch(device_pb2.WatchRequest(**fields), timeout=10)))
    err = richstatus.decode_trailer(
        e.value.code(),
        e.value.details(),
        e.value.trailing_metadata(),  # type: ignore[attr-defined]
    )
    assert isinstance(err, InvalidArgument) and err.field == field


def test_sdk_watch_resumes_on_another_node_without_loss_or_duplicate(
    cluster: LocalCluster,
) -> None:
    leader = cluster.wait_for_leader()
    ids = list(cluster.nodes)
    follower = next(n for n in ids if n != leader)
    order = [ids.index(follower)] + [i for i, n in enumerate(ids) if n != follower]
    acked: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with DeviceClient([cluster.nodes[leader].endpoint], prefer_leader=False) as cl:
            i = 0
            while not stop.is_set():
                acked.append(cl.heartbeat(f"t6-{i % 5}", {"i": str(i)}).revision)
                i += 1

    with client(cluster, *order) as cl, cl.watch(prefix="t6-", progress_interval_ms=200) as w:
        t = threading.Thread(target=writer)
        t.start()
        try:
            got = [e.revision for e in collect(w, 0)]
            wait_until(lambda: len(acked) >= 20, 30, "20 heartbeats")
            cluster.stop_node(follower)  # the node this watch is on
            wait_until(lambda: len(acked) >= 60, 30, "60 heartbeats")
        finally:
            stop.set()
            t.join()
        got += [e.revision for e in collect(w, acked[-1])]
        assert w.resumes >= 1
    cluster.start_node(follower)
    assert got == sorted(set(got)), "duplicate or out of order"
    assert set(acked) <= set(got), f"lost {sorted(set(acked) - set(got))[:5]}"


def test_list_then_watch_is_exact(cluster: LocalCluster) -> None:
    stop = threading.Event()
    last: list[int] = []

    def writer() -> None:
        with client(cluster) as cl:
            i = 0
            while not stop.is_set():
                dev = f"t7-{i % 7}"
                last.append(
                    cl.delete(dev).revision
                    if i % 11 == 10
                    else cl.heartbeat(dev, {"i": str(i)}).revision
                )
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(last) >= 10, 30, "10 writes")
        with client(cluster) as cl:
            listing, w = cl.list_then_watch("t7-", page_size=2)
            with w:
                state = {d.device_id: d for d in listing.devices}
                wait_until(lambda: len(last) >= 40, 30, "40 writes")
                stop.set()
                t.join()
                for ev in collect(w, last[-1]):
                    if ev.device is None:
                        state.pop(ev.device_id, None)
                    else:
                        state[ev.device_id] = ev.device
            final = cl.list_all("t7-")
    finally:
        stop.set()
        t.join()
    assert final.revision >= last[-1]
    assert state == {d.device_id: d for d in final.devices}


def test_reads_at_a_revision_and_their_errors(cluster: LocalCluster) -> None:
    with client(cluster) as cl:
        a = cl.heartbeat("t8-a", {"v": "old"})
        cl.heartbeat("t8-a", {"v": "new"})
        b = cl.heartbeat("t8-b", {})
        assert cl.get("t8-a", at_revision=a.revision).reported == {"v": "old"}
        assert cl.get("t8-a").reported == {"v": "new"}
        page = cl.list("t8-", at_revision=a.revision)
        assert [d.device_id for d in page.devices] == ["t8-a"] and page.revision == a.revision
        with pytest.raises(FutureRevision):
            cl.get("t8-a", at_revision=b.revision + 10_000)
        for i in range(HISTORY + 10):  # push a.revision out of every node's window
            cl.heartbeat(f"t8-fill-{i % 50}", {"i": str(i)})
        with pytest.raises(RevisionCompacted) as e:
            cl.get("t8-a", at_revision=a.revision)
        assert e.value.oldest_revision > a.revision
        assert e.value.current_revision >= e.value.oldest_revision


def test_resync_required_when_every_node_compacted_then_list_then_watch(
    cluster: LocalCluster,
) -> None:
    with client(cluster) as cl:
        start = cl.heartbeat("t9-a", {"v": "1"}).revision
        for i in range(HISTORY + 10):
            cl.heartbeat(f"t9-fill-{i % 50}", {})
        with pytest.raises(ResyncRequired) as e:
            with cl.watch(prefix="t9-", start_revision=start):
                pass
        assert e.value.wanted_revision == start and e.value.oldest_revision > start
        listing, w = cl.list_then_watch("t9-")
        with w:
            assert {d.device_id for d in listing.devices} >= {"t9-a"}
            nxt = cl.heartbeat("t9-a", {"v": "2"})
            [ev] = collect(w, nxt.revision)
        assert ev.revision == nxt.revision and ev.device is not None
        assert ev.device.reported == {"v": "2"}


def test_cli_watch_prints_one_line_per_event(cluster: LocalCluster) -> None:
    with client(cluster) as cl:
        acks = [cl.heartbeat("t10-a", {"temp": str(i)}) for i in range(3)]
    env = {**os.environ, **cluster.client_env()}
    run = subprocess.run(
        [sys.executable, "-m", "raftstate", "watch", "--endpoints", ",".join(cluster.endpoints),
         "--prefix", "t10-", "--from", str(acks[0].revision), "--limit", "3"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [[str(a.revision), "t10-a"] for a in acks]
    assert lines[0].split()[2] == "reported,heartbeat,online" and "temp=0" in lines[0]


def test_watch_needs_an_operator_credential_checked_before_anything_else(
    tmp_path: Path,
) -> None:
    c = LocalCluster(tmp_path / "secure", 3, base_config=NodeConfig.for_tests(), secure=True)
    c.start(timeout_s=60)
    try:
        assert c.pki is not None
        ca = str(c.pki.ca_cert)
        endpoint = c.nodes[c.wait_for_leader()].endpoint
        bad = device_pb2.WatchRequest(prefix="a", device_ids=["b"])  # invalid as well
        cases = {
            "none": (Credentials(ca=ca), "UNAUTHENTICATED"),
            "device": (
                Credentials(ca=ca, token=c.issue_token(Role.DEVICE, device_ids=("a",))),
                "PERMISSION_DENIED",
            ),
            "gateway": (
                Credentials(ca=ca, token=c.issue_token(Role.GATEWAY, prefix="a")),
                "PERMISSION_DENIED",
            ),
            "operator": (
                Credentials(ca=ca, token=c.issue_token(Role.OPERATOR)),
                "INVALID_ARGUMENT",
            ),
        }
        for name, (creds, want) in cases.items():
            with creds.channel(endpoint) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(stub.Watch(bad, timeout=10, metadata=creds.metadata())))
                assert e.value.code().name == want, name  # type: ignore[attr-defined]
        operator = c.client_kwargs(Role.OPERATOR)
        admin = c.client_kwargs(Role.ADMIN)
        with DeviceClient(c.endpoints, **operator) as cl, cl.watch(prefix="ok-") as w:
            with DeviceClient(c.endpoints, **admin) as writer:
                ack = writer.heartbeat("ok-1", {})
            assert w.next(timeout_s=10).revision == ack.revision
    finally:
        c.stop()


def test_closing_a_sync_watch_from_another_thread_ends_the_iteration(
    cluster: LocalCluster,
) -> None:
    outcome: list[object] = []
    with client(cluster) as cl:
        first = cl.heartbeat("t11-a", {})
        watch = cl.watch(prefix="t11-", start_revision=first.revision)

        def consume() -> None:
            try:
                outcome.extend(ev.revision for ev in watch)
                outcome.append("ended")
            except BaseException as err:  # noqa: BLE001 - the outcome is what is checked
                outcome.append(err)

        reader = threading.Thread(target=consume)
        reader.start()
        wait_until(lambda: outcome, 10, "the first event")
        watch.close()  # the reader is blocked in the next read
        reader.join(10)
    assert outcome == [first.revision, "ended"]
