"""A watcher on a follower through a leader kill, a partition and a pause.

Devices heartbeat with a 1 s TTL, pause past it (the leader commits their
expiry) and are deleted now and then, while the leader is killed, then
isolated at the Raft transport (network namespaces), then frozen with
SIGSTOP. The watcher (SDK ``client.watch``, started on a follower) must
deliver every revision of its prefix exactly once and in order:

* its events are strictly increasing and only of its prefix;
* they equal, event for event, a fresh catch-up watch of the same prefix on
  every node afterwards (each node's own history);
* every device's final state on every node (read serializably) equals the
  state its last event carried (absent: its last event was a delete);
* per device each event's ``prev_device`` is what the previous event left;
* every acknowledged heartbeat appears as an event.

The recorded history (heartbeats, deletes, linearizable reads of the
committed ``online`` flag) must be linearizable with the expiries inferred
(:mod:`chaos.linearizability`). Offline detection lateness (the expiry's log
time minus last_seen + TTL) is printed.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchcheck import (
    State,
    Watcher,
    check_acked_seen,
    check_chains,
    check_final_states,
    check_ordered_once,
    node_states,
    summary,
)

from chaos.linearizability import check
from chaos.presenceload import PresenceWorkload
from chaos.verify import wait_converged
from cluster.local import LocalCluster, wait_until
from cluster.netns import NetnsLab, available
from raftstate.config import NodeConfig
from raftstate.errors import ResyncRequired
from raftstate.latency import percentile
from raftstate.sdk import DeviceClient, EventKind, WatchEvent

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PREFIX = "wf-"
Lab = Callable[..., tuple[NetnsLab | None, LocalCluster]]


@pytest.fixture
def lab_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A 3-node cluster in network namespaces (so the leader can be cut off at
    the Raft transport), or on loopback without the partition step when
    namespaces are unavailable."""
    made: list[tuple[NetnsLab | None, LocalCluster]] = []

    def factory(**overrides: object) -> tuple[NetnsLab | None, LocalCluster]:
        base = dataclasses.replace(NodeConfig.for_tests(), **overrides)  # type: ignore[arg-type]
        lab = None
        if available() is None:
            lab = NetnsLab(3)
            lab.up()
            cluster = LocalCluster(
                tmp_path / f"c{len(made)}", 3, base_config=base,
                hosts=[lab.node_ip(i) for i in (1, 2, 3)],
                exec_prefix=lambda node_id: lab.exec_prefix(int(node_id[1:])),
                secure=True,
            )
        else:
            cluster = LocalCluster(tmp_path / f"c{len(made)}", 3, base_config=base)
        for key, value in cluster.client_env().items():
            monkeypatch.setenv(key, value)
        made.append((lab, cluster))
        cluster.start(timeout_s=60)
        return lab, cluster

    yield factory
    for lab, cluster in made:
        for node_id in cluster.nodes:
            cluster.signal_node(node_id, signal.SIGCONT)
        cluster.stop()
        if lab is not None:
            lab.down()


def _progress(w: PresenceWorkload, more: int, what: str, timeout_s: float = 40.0) -> None:
    """Wait for ``more`` acknowledged heartbeats and deletes."""
    target = w.writes_ok + w.deletes_ok + more
    wait_until(
        lambda: w.writes_ok + w.deletes_ok >= target, timeout_s, f"{more} more writes {what}"
    )


def _new_leader(cluster: LocalCluster, old: str) -> str:
    others = [n for n in cluster.nodes if n != old]

    def found() -> str | None:
        leader = cluster.leader(among=others)
        return leader if leader is not None and leader != old else None

    return wait_until(found, 30, "a new leader among the others")  # type: ignore[no-any-return]


def _quiet(endpoints: list[str]) -> dict[str, tuple[dict[str, State], int]]:
    """Every node's table of the prefix, once all are at one revision with
    every device offline (else empty: not yet)."""
    tables = {e: node_states(e, PREFIX) for e in endpoints}
    revisions = {rev for _, rev in tables.values()}
    offline = all(not s[3] for table, _ in tables.values() for s in table.values())
    return tables if len(revisions) == 1 and offline else {}


def _catch_up(endpoint: str, sentinel: int) -> list[WatchEvent]:
    """The prefix's events on one node from its oldest retained revision up
    to the ``sentinel`` revision (excluded), by a fresh watch pinned to that
    node."""
    with DeviceClient([endpoint], prefer_leader=False) as client:
        start = 1
        while True:
            events: list[WatchEvent] = []
            try:
                with client.watch(prefix=PREFIX, start_revision=start, prev_device=True,
                                  progress_interval_ms=200, retry_s=10) as w:
                    while not events or events[-1].revision < sentinel:
                        events.append(w.next(timeout_s=30))
            except ResyncRequired as err:
                start = err.oldest_revision  # a node that installed a snapshot
                continue
            return [e for e in events if e.revision < sentinel]


def test_watcher_on_a_follower_sees_every_revision_once_through_kill_partition_pause(
    lab_cluster: Lab,
) -> None:
    lab, cluster = lab_cluster()
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    order = [cluster.nodes[follower].endpoint] + [
        cluster.nodes[n].endpoint for n in cluster.nodes if n != follower
    ]
    started = time.monotonic()
    with Watcher(order, PREFIX, start_revision=1) as watcher, PresenceWorkload(
        cluster.endpoints, prefix=PREFIX, devices=8, writers=4, ttl_s=1
    ) as w, DeviceClient(cluster.endpoints) as other:
        other.heartbeat("zz-outside", {"k": "v"})  # another prefix: must not be delivered
        _progress(w, 80, "before the faults")
        # 1. Kill the leader, restart it once a new one leads.
        old = cluster.wait_for_leader()
        cluster.kill_node(old)
        _new_leader(cluster, old)
        _progress(w, 60, "after the kill")
        cluster.start_node(old)
        # 2. Cut the leader off at the Raft transport (namespaces only).
        if lab is not None:
            old = cluster.wait_for_leader(30)
            lab.isolate(int(old[1:]))
            _new_leader(cluster, old)
            _progress(w, 60, "during the partition")
            lab.heal()
        # 3. Freeze the leader with SIGSTOP, then let it wake up.
        old = cluster.wait_for_leader(30)
        cluster.signal_node(old, signal.SIGSTOP)
        try:
            _new_leader(cluster, old)
            _progress(w, 60, "while the old leader is frozen")
        finally:
            cluster.signal_node(old, signal.SIGCONT)
        _progress(w, 60, "after the faults")
        w.stop()
        # Quiesce: with the writers stopped every device expires within its
        # TTL; then nothing changes and every node holds the same revision.
        wait_converged(cluster.endpoints, 60)
        tables = wait_until(lambda: _quiet(cluster.endpoints), 30, "every device offline")
        final = max(rev for _, rev in tables.values())
        watcher.wait_revision(final, 60)
        sentinel = watcher.drain(cluster.endpoints, f"{PREFIX}zz-sentinel")
    elapsed = time.monotonic() - started
    events = watcher.events
    print(f"{len(events)} events, {watcher.resumes} resumes, {w.writes_ok} heartbeats, "
          f"{w.deletes_ok} deletes, {w.reads_ok} reads, {w.failures} failures, {elapsed:.0f}s")
    problems = check_ordered_once(events, PREFIX) + check_chains(events)
    for endpoint, (table, _) in tables.items():
        problems += check_final_states(events, table, endpoint)
    problems += check_acked_seen(events, w.acked)
    for endpoint in cluster.endpoints:
        theirs = _catch_up(endpoint, sentinel)
        start = theirs[0].revision if theirs else sentinel
        mine = summary([e for e in events if e.revision >= start])
        other = summary(theirs)
        if other != mine:
            diff = next((i for i, (a, b) in enumerate(zip(other, mine, strict=False)) if a != b),
                        min(len(other), len(mine)))
            problems.append(
                f"{endpoint}: its own history of {PREFIX!r} ({len(other)} events from "
                f"{start}) differs from the watcher's ({len(mine)}) at #{diff}: "
                f"{other[diff:diff + 2]} vs {mine[diff:diff + 2]}"
            )
    kinds = [k for e in events for k in e.kinds]
    assert kinds.count(EventKind.OFFLINE) >= 3, "the workload should make devices expire"
    assert kinds.count(EventKind.DELETED) >= 3, "the workload should delete devices"
    assert not problems, "\n".join(problems[:30])
    lateness = sorted(
        e.time_ms - (e.prev_device.last_seen_ms + 1000 * e.prev_device.ttl_s)
        for e in events if EventKind.OFFLINE in e.kinds and e.prev_device is not None
    )
    print(f"expiry lateness ms (log time - last_seen - ttl): n={len(lateness)} "
          f"p50={percentile(lateness, 50)} p99={percentile(lateness, 99)} max={lateness[-1]}")
    # Never early by more than the skew bound (one box: one clock).
    assert lateness[0] >= -NodeConfig.for_tests().max_clock_skew_ms, lateness[:5]
    lin = check(w.history)
    print(lin.explain())
    assert lin.ok, lin.explain()


def test_offline_is_seen_within_ttl_plus_1s_across_a_leader_kill(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Devices heartbeat once (TTL 2 s) and go silent; 0.5 s later the leader
    is killed. A watcher on a follower must see every device's OFFLINE event
    within TTL + 1 s of its heartbeat's acknowledgement (p99 over devices;
    the new leader derives the deadlines from the committed last_seen_ms)."""
    ttl = 2
    cluster = make_cluster()
    leader = cluster.wait_for_leader()
    order = [cluster.nodes[n].endpoint for n in cluster.nodes if n != leader]
    ids = [f"od-{i:03d}" for i in range(40)]
    with DeviceClient(cluster.endpoints) as client:
        client.heartbeat("warm-up", {})  # so the watch's created revision is above 0
    with Watcher(order, "od-", start_revision=0) as watcher:
        wait_until(lambda: watcher.revision > 0, 20, "the watch to be created")
        acked: dict[str, float] = {}
        with DeviceClient(cluster.endpoints) as client:
            for d in ids:
                client.heartbeat(d, {"k": "v"}, ttl_s=ttl)
                acked[d] = time.monotonic()
        kill_at = max(acked.values()) + 0.5
        wait_until(lambda: time.monotonic() >= kill_at, 5, "the kill time", interval_s=0.01)
        cluster.kill_node(leader)

        def offline() -> dict[str, float]:
            got = {
                e.device_id: t
                for e, t in zip(watcher.events, watcher.receive_times, strict=False)
                if EventKind.OFFLINE in e.kinds
            }
            return got if len(got) == len(ids) else {}

        seen = wait_until(offline, 30, "every device's OFFLINE event")
    detection = sorted(seen[d] - acked[d] for d in ids)
    p50, p99 = percentile(detection, 50), percentile(detection, 99)
    print(f"offline detection s (ack -> OFFLINE at a watcher), TTL {ttl} s, leader killed "
          f"0.5 s after the last ack: p50={p50:.3f} p99={p99:.3f} max={detection[-1]:.3f}")
    assert detection[0] >= ttl - NodeConfig.for_tests().max_clock_skew_ms / 1000
    assert p99 <= ttl + 1.0, detection
