"""Watching a cluster while the fleet benchmark loads it, and timing restarts.

:class:`ClusterWatch` is a thread that asks every node for its status twice
a second (raftstate ``Cluster.Status``; etcd ``Maintenance.Status``) and
keeps running counts: the highest term seen, how often the leader the nodes
name changed, and per node how often its snapshot file was replaced (a
compaction). :meth:`ClusterWatch.checkpoint` freezes those counts with the
latest tick statistics, RSS (``/proc/<pid>/status`` VmRSS and VmHWM), journal
and snapshot sizes; a phase's numbers are the difference of two checkpoints.
Terms are monotone, so the term difference counts every election even
between two polls; a leader that changed and changed back between polls is
missed by the leader count but not by the term count.

:func:`time_restart` kills a node with SIGKILL, starts it again and polls
(every 50 ms, with a deadline) until it serves: its health service says
``raftstate.v1.DeviceStateService`` SERVING, it holds every device and has applied
the commit index from before the kill, and it answers a LINEARIZABLE read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

#: Poll period of the watch thread.
WATCH_PERIOD_S = 0.5
_HEALTH_SERVICE = "raftstate.v1.DeviceStateService"


def rss_kib(pid: int | None) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in KiB; zeros when it is gone."""
    if pid is None:
        return 0, 0
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return rss, hwm


@dataclass(frozen=True, slots=True)
class WatchedNode:
    """A node to watch: its endpoint, how to find its pid now (it changes on
    restart) and the file whose replacement counts as a compaction."""

    endpoint: str
    pid: Callable[[], int | None]
    snapshot_file: Path | None = None


@dataclass(frozen=True, slots=True)
class NodeState:
    term: int = 0
    leader: str = ""
    max_tick_ms: float = 0.0
    tick_stalls: int = 0
    journal_bytes: int = 0
    devices: int = 0
    snapshot_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    at: float
    max_term: int
    leader_changes: int
    compactions: Mapping[str, int]
    nodes: Mapping[str, NodeState]
    rss_kib: Mapping[str, int]
    hwm_kib: Mapping[str, int]
    polls: int


@dataclass(frozen=True, slots=True)
class PhaseWatch:
    """What happened between two checkpoints."""

    term_changes: int
    leader_changes: int
    compactions: dict[str, int]
    max_tick_ms: dict[str, float]
    tick_stalls: dict[str, int]
    rss_mib: dict[str, float]
    peak_rss_mib: dict[str, float]
    journal_bytes: dict[str, int]
    snapshot_bytes: dict[str, int]
    devices: dict[str, int]


def between(a: Checkpoint, b: Checkpoint) -> PhaseWatch:
    """The phase from checkpoint ``a`` to ``b``. Pure."""
    names = list(b.nodes)
    return PhaseWatch(
        term_changes=max(0, b.max_term - a.max_term),
        leader_changes=b.leader_changes - a.leader_changes,
        compactions={n: b.compactions.get(n, 0) - a.compactions.get(n, 0) for n in names},
        max_tick_ms={n: round(b.nodes[n].max_tick_ms, 1) for n in names},
        tick_stalls={
            n: max(0, b.nodes[n].tick_stalls - a.nodes.get(n, NodeState()).tick_stalls)
            for n in names
        },
        rss_mib={n: round(b.rss_kib.get(n, 0) / 1024, 1) for n in names},
        peak_rss_mib={n: round(b.hwm_kib.get(n, 0) / 1024, 1) for n in names},
        journal_bytes={n: b.nodes[n].journal_bytes for n in names},
        snapshot_bytes={n: b.nodes[n].snapshot_bytes for n in names},
        devices={n: b.nodes[n].devices for n in names},
    )


class ClusterWatch:
    """Polls ``nodes`` (name -> :class:`WatchedNode`) from a daemon thread
    until :meth:`stop`. ``system`` is ``"raftstate"`` or ``"etcd"``.
    ``credentials`` (raftstate) default to the environment's."""

    def __init__(
        self, system: str, nodes: Mapping[str, WatchedNode], credentials: Any = None
    ) -> None:
        self.system, self.nodes = system, dict(nodes)
        self.credentials = credentials
        self._lock = threading.Lock()
        self._state: dict[str, NodeState] = {n: NodeState() for n in nodes}
        self._max_term = 0
        self._leader = ""
        self._leader_changes = 0
        self._compactions = {n: 0 for n in nodes}
        self._snap_ids: dict[str, tuple[int, int] | None] = {n: None for n in nodes}
        self._snap_seen: set[str] = set()
        self._polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-watch", daemon=True)

    def start(self) -> ClusterWatch:
        self.poll()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(WATCH_PERIOD_S):
            try:
                self.poll()
            except Exception:  # never let the watch kill the benchmark
                continue

    def _status(self, node: WatchedNode) -> NodeState | None:
        if self.system == "etcd":
            from cluster.etcd import _member_status

            st = _member_status(node.endpoint, 1.0)
            if st is None:
                return None
            return NodeState(
                term=int(st.raftTerm), leader=str(st.leader), snapshot_bytes=int(st.dbSize)
            )
        from cluster.local import node_status

        rs = node_status(node.endpoint, 1.0, self.credentials)
        if rs is None:
            return None
        size = 0
        if node.snapshot_file is not None:
            try:
                size = node.snapshot_file.stat().st_size
            except OSError:
                size = 0
        return NodeState(
            term=rs.term,
            leader=rs.leader_id,
            max_tick_ms=rs.max_tick_ms,
            tick_stalls=rs.tick_stalls,
            journal_bytes=rs.journal_bytes,
            devices=rs.devices,
            snapshot_bytes=size,
        )

    def poll(self) -> None:
        """Sample every node once (also called by the thread)."""
        for name, node in self.nodes.items():
            st = self._status(node)
            snap_id: tuple[int, int] | None = None
            if node.snapshot_file is not None:
                try:
                    s = node.snapshot_file.stat()
                    snap_id = (s.st_ino, s.st_mtime_ns)
                except OSError:
                    snap_id = None
            with self._lock:
                # The first poll only notes the file (or its absence); every
                # later new file, the first one included, is a compaction.
                if name not in self._snap_seen:
                    self._snap_seen.add(name)
                elif snap_id is not None and snap_id != self._snap_ids[name]:
                    self._compactions[name] += 1
                if snap_id is not None:
                    self._snap_ids[name] = snap_id
                if st is None:
                    continue
                self._state[name] = st
                self._max_term = max(self._max_term, st.term)
        with self._lock:
            leaders = {s.leader for s in self._state.values() if s.leader}
            if len(leaders) == 1:
                leader = leaders.pop()
                if self._leader and leader != self._leader:
                    self._leader_changes += 1
                self._leader = leader
            self._polls += 1

    def checkpoint(self) -> Checkpoint:
        """The counts now (polls once first, so it is fresh)."""
        self.poll()
        rss = {n: rss_kib(w.pid()) for n, w in self.nodes.items()}
        with self._lock:
            return Checkpoint(
                at=time.time(),
                max_term=self._max_term,
                leader_changes=self._leader_changes,
                compactions=dict(self._compactions),
                nodes=dict(self._state),
                rss_kib={n: v[0] for n, v in rss.items()},
                hwm_kib={n: v[1] for n, v in rss.items()},
                polls=self._polls,
            )


@dataclass(slots=True)
class RestartTiming:
    """Seconds from the kill: to a leader among the others (leader kills),
    to the restarted node serving; and what was still missing at a timeout."""

    killed: str
    was_leader: bool
    serving_s: float = 0.0
    new_leader_s: float = 0.0
    missing: list[str] = field(default_factory=list)


def _serves(endpoint: str, creds: Any, devices: int, index: int, probe: str) -> list[str]:
    """What ``endpoint`` still lacks to count as serving (empty: it serves)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.local import node_status
    from raftstate.v1 import device_pb2, device_pb2_grpc

    missing: list[str] = []
    with creds.channel(endpoint) as ch:
        try:
            h = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=_HEALTH_SERVICE), timeout=1.0
            )
            if h.status != health_pb2.HealthCheckResponse.SERVING:
                missing.append("health SERVING")
        except grpc.RpcError:
            return ["answering"]
        st = node_status(endpoint, 1.0, creds)
        if st is None or st.devices < devices or st.last_applied < index:
            missing.append(
                "all devices applied"
                + (f" ({st.devices}/{devices}, {st.last_applied}/{index})" if st else "")
            )
        try:
            device_pb2_grpc.DeviceStateServiceStub(ch).GetDevice(
                device_pb2.GetDeviceRequest(
                    device_id=probe, consistency=device_pb2.CONSISTENCY_LINEARIZABLE
                ),
                timeout=1.0,
                metadata=creds.metadata(),
            )
        except grpc.RpcError as err:
            missing.append(f"linearizable read ({err.code().name})")
    return missing


def time_restart(
    cluster: Any, node_id: str, devices: int, probe_device: str, timeout_s: float
) -> RestartTiming:
    """kill -9 ``node_id`` of a running ``LocalCluster``, start it again at
    once, and time it back to serving (module docstring). Never raises for a
    slow node: at the deadline the timing says what was missing."""
    creds = cluster.credentials
    leader = cluster.leader()
    st = cluster.status(leader) if leader else None
    index = st.commit_index if st is not None else 0
    timing = RestartTiming(node_id, node_id == leader)
    others = [n for n in cluster.nodes if n != node_id]
    endpoint = cluster.nodes[node_id].endpoint
    t0 = time.monotonic()
    cluster.kill_node(node_id)
    cluster.start_node(node_id)
    deadline = t0 + timeout_s
    while True:
        now = time.monotonic()
        if timing.was_leader and not timing.new_leader_s:
            new = cluster.leader(among=others)
            if new is not None:
                timing.new_leader_s = round(now - t0, 2)
        missing = _serves(endpoint, creds, devices, index, probe_device)
        if not missing:
            timing.serving_s = round(time.monotonic() - t0, 2)
            timing.missing = []
            return timing
        timing.missing = missing
        if now >= deadline or not cluster.nodes[node_id].running():
            if not cluster.nodes[node_id].running():
                timing.missing.append("process exited")
            return timing
        time.sleep(0.05)


__all__ = [
    "Checkpoint",
    "ClusterWatch",
    "PhaseWatch",
    "RestartTiming",
    "WatchedNode",
    "between",
    "rss_kib",
    "time_restart",
]
