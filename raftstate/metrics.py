"""Prometheus metrics of one node, read from its state when scraped.

Theory of operation
-------------------
:class:`NodeCollector` is a ``prometheus_client`` custom collector: each
scrape calls :meth:`~NodeCollector.collect`, which reads what the node
already keeps (``RaftNode.status()``, the tick statistics, the transport's
per-peer link counters, the device table) and builds the metric families
then. Nothing is updated on the request path for these. What cannot be read
afterwards is recorded where it happens, as cheaply as possible
(raftstate/histogram.py): heartbeat ack latency and batch sizes in the
Proposer, elections and snapshots in ``RaftNode``, gRPC calls in
raftstate/grpcmetrics.py.

Online devices need a look at every device's ``last_seen``: the scrape
handler first awaits :meth:`OnlineCounter.refresh`, which scans the table
in pages of :data:`ONLINE_PAGE` ids (the table's own ``list``), yielding
the event loop between pages, so a scrape of a million devices costs
about half a second of CPU and never holds the loop for more than one page.

Names follow the Prometheus conventions: ``raftstate_`` prefix, counters end
in ``_total``, units in the name (``_seconds``, ``_bytes``), labels of small
fixed sets (``peer`` is a member id, ``reason`` a drop reason, ``role`` one
of three). The full list is in docs/architecture.md ("Metrics").

Runs on the node's event loop (the scrape handler's thread).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from raftstate.config import NodeConfig
from raftstate.grpcmetrics import GrpcMetrics
from raftstate.histogram import HistogramSnapshot
from raftstate.model import OnlineFilter
from raftstate.statemachine import DeviceTable
from raftstate.tickstats import BUCKETS_S as TICK_BUCKETS_S

#: Ids examined per step of the online scan.
ONLINE_PAGE = 10_000
ROLES = ("follower", "candidate", "leader")


class OnlineCounter:
    """Counts online devices with a paged scan (module docstring). Event-loop only."""

    def __init__(self, table: DeviceTable, page: int = ONLINE_PAGE) -> None:
        self._table = table
        self._page = page
        self.value = 0
        self._running: asyncio.Future[int] | None = None

    async def refresh(self) -> int:
        """Scan now (or join the scan under way) and return the count."""
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._scan())
        return await asyncio.shield(self._running)

    def count_now(self) -> int:
        """The whole scan without yielding (tests, small tables)."""
        return sum(self._pages())

    def _pages(self) -> Iterator[int]:
        after: str | None = None
        while True:
            page = self._table.list(
                after=after, limit=self._page, online=OnlineFilter.ONLINE, max_scan=self._page
            )
            yield len(page.devices)
            if page.next_after is None:
                return
            after = page.next_after

    async def _scan(self) -> int:
        total = 0
        for n in self._pages():
            total += n
            await asyncio.sleep(0)
        self.value = total
        return total


def _histogram(
    name: str, doc: str, snap: HistogramSnapshot, labels: dict[str, str] | None = None
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), _buckets(snap), snap.sum)
    return family


def _buckets(snap: HistogramSnapshot) -> list[tuple[str, float]]:
    bounds = [repr(float(b)) for b in snap.buckets] + ["+Inf"]
    return list(zip(bounds, (float(c) for c in snap.cumulative), strict=True))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class NodeCollector(Collector):
    """Everything ``/metrics`` says about one node. ``services`` is the
    node's :class:`~raftstate.server.NodeServices`; ``guard`` its
    :class:`~raftstate.rpcguard.RpcGuard`."""

    def __init__(
        self,
        services: Any,
        guard: Any,
        grpc_metrics: GrpcMetrics,
        online: OnlineCounter,
        version: str = "",
    ) -> None:
        self.services = services
        self.guard = guard
        self.grpc_metrics = grpc_metrics
        self.online = online
        self.version = version
        self._snapshot_file = Path(services.cfg.data_dir) / "snapshot.bin"

    def collect(self) -> Iterable[Metric]:
        """Build every family from the node's current state."""
        yield from self._node_info(self.services.cfg)
        yield from self._raft()
        yield from self._transport()
        yield from self._grpc()
        yield from self._store()
        yield from self._watch()

    # ---- families -------------------------------------------------------------

    def _node_info(self, cfg: NodeConfig) -> Iterator[Metric]:
        info = InfoMetricFamily("raftstate_node", "This node and how it is configured.")
        info.add_metric(
            [],
            {
                "node_id": cfg.node_id,
                "transport": cfg.transport,
                "durability": cfg.durability,
                "version": self.version,
            },
        )
        yield info
        yield _gauge("raftstate_cluster_members", "Voting members configured.", len(cfg.members))

    def _raft(self) -> Iterator[Metric]:
        raft, proposer = self.services.raft, self.services.proposer
        st = raft.status()
        yield _gauge("raftstate_raft_term", "Current Raft term.", st.term)
        role = GaugeMetricFamily(
            "raftstate_raft_role", "1 for this node's current Raft role.", labels=["role"]
        )
        for i, name in enumerate(ROLES, start=1):
            role.add_metric([name], 1.0 if int(st.role) == i else 0.0)
        yield role
        yield _gauge(
            "raftstate_raft_has_leader",
            "1 while this node knows a leader.",
            1.0 if st.leader_raft_address else 0.0,
        )
        yield _gauge("raftstate_raft_commit_index", "Highest committed log index.", st.commit_index)
        yield _gauge("raftstate_raft_applied_index", "Highest applied log index.", st.last_applied)
        yield _gauge(
            "raftstate_raft_last_log_index", "Index of the last log entry.", st.last_log_index
        )
        events = raft.raft_events
        yield _counter(
            "raftstate_raft_elections", "Elections this node started.", events.elections
        )
        yield _counter(
            "raftstate_raft_leader_changes",
            "Times this node saw a new leader (the first one included).",
            events.leader_changes,
        )
        timing = raft.timing
        for name, doc, value in (
            ("heartbeat", "Leader's idle AppendEntries period in force.", timing.heartbeat),
            ("election_timeout_min", "Lower end of the election timeout.", timing.election_min),
            ("election_timeout_max", "Upper end of the election timeout.", timing.election_max),
            ("step_down", "Check-quorum: a leader unanswered this long steps down.",
             timing.step_down),
        ):  # fmt: skip
            yield _gauge(f"raftstate_raft_{name}_seconds", doc, value)
        yield _gauge(
            "raftstate_raft_timing_derived",
            "1 while the timers are derived from the measured links (raftstate/linktiming.py).",
            1.0 if timing.source == "links" else 0.0,
        )
        yield _counter(
            "raftstate_raft_proposals",
            "Log entries (heartbeat batches) this node proposed.",
            proposer.entries_proposed,
        )
        yield _counter(
            "raftstate_raft_proposal_retries",
            "Proposed entries that failed (no leader, leader changed) and were proposed again.",
            proposer.entries_retried,
        )
        yield _histogram(
            "raftstate_raft_batch_heartbeats",
            "Heartbeats per proposed log entry (group commit batch size).",
            proposer.batch_sizes.snapshot(),
        )
        tick = raft.tick_stats.snapshot()
        family = HistogramMetricFamily(
            "raftstate_raft_tick_duration_seconds",
            "Work time of each Raft tick (wall time minus the wait for input).",
        )
        bounds = [repr(float(b)) for b in TICK_BUCKETS_S] + ["+Inf"]
        family.add_metric(
            [], list(zip(bounds, (float(c) for c in tick.buckets), strict=True)), tick.sum_s
        )
        yield family
        yield _gauge(
            "raftstate_raft_tick_max_seconds", "Longest Raft tick since start.", tick.max_s
        )
        yield _counter(
            "raftstate_raft_tick_stalls", "Raft ticks that worked longer than 50 ms.", tick.stalls
        )
        yield _counter(
            "raftstate_raft_tick_failures", "Raft ticks that raised.", st.tick_failures
        )
        yield _gauge(
            "raftstate_raft_clock_skew_seconds",
            "This node's wall clock minus its estimate of the log clock (the leader's "
            "stamps as seen in applied entries); committed presence bounds its effect "
            "by max_clock_skew_ms.",
            raft.clock_skew_ms() / 1000,
        )
        planner = raft.expiry_planner
        yield _counter(
            "raftstate_presence_expiry_entries",
            "ExpireDevices entries this node proposed as leader.",
            planner.entries,
        )
        yield _counter(
            "raftstate_presence_expiry_failures",
            "ExpireDevices entries that failed or went unanswered (their devices re-planned).",
            planner.failures,
        )
        yield _gauge(
            "raftstate_presence_due_devices",
            "Online devices past their deadline, not yet expired (this node's view).",
            len(self.services.table.wheel.due),
        )
        yield _gauge(
            "raftstate_raft_catching_up",
            "1 while this node catches up after lost data (not voting).",
            1.0 if st.catching_up else 0.0,
        )
        yield _gauge("raftstate_raft_journal_bytes", "Size of the Raft journal.", st.journal_bytes)
        yield _counter(
            "raftstate_raft_compactions",
            "Journal compactions (log truncated after a snapshot).",
            raft.journal.compactions,
        )
        snaps = raft.snapshot_stats
        yield _histogram(
            "raftstate_raft_snapshot_duration_seconds",
            "Time to write each snapshot this node took.",
            snaps.duration.snapshot(),
        )
        yield _counter(
            "raftstate_raft_snapshot_failures", "Snapshot writes that failed.", snaps.failures
        )
        try:
            size = os.stat(self._snapshot_file).st_size
        except OSError:
            size = 0
        yield _gauge(
            "raftstate_raft_snapshot_bytes",
            "Size of this node's current snapshot file (0: none yet).",
            size,
        )

    def _transport(self) -> Iterator[Metric]:
        links = self.services.raft.peer_link_stats()
        peer = ["peer"]
        up = GaugeMetricFamily(
            "raftstate_transport_peer_up", "1 while the session with the peer is up.", labels=peer
        )
        rtt = GaugeMetricFamily(
            "raftstate_transport_peer_rtt_seconds", "Smoothed round-trip time.", labels=peer
        )
        min_rtt = GaugeMetricFamily(
            "raftstate_transport_peer_min_rtt_seconds", "Smallest RTT sample.", labels=peer
        )
        loss = GaugeMetricFamily(
            "raftstate_transport_peer_loss_ratio",
            "Estimated frame loss (EWMA, 0..1).",
            labels=peer,
        )
        path = GaugeMetricFamily(
            "raftstate_transport_peer_path",
            "1 for the kind of path to the peer (static, host, srflx, relay, none).",
            labels=["peer", "path"],
        )
        counters = {
            "retransmissions": ("Chunks resent after loss or by a probe.", "retransmissions"),
            "redundant_chunks": ("Chunk copies sent proactively.", "redundant_chunks"),
            "redundant_bytes": ("Bytes of the chunk copies sent proactively.", "redundant_bytes"),
            "frames_sent": ("Frames sent.", "frames_sent"),
            "frames_lost": ("Frames declared lost.", "frames_lost"),
            "probes": ("Probe frames sent on timeout.", "probes"),
        }
        families = {
            key: CounterMetricFamily(
                f"raftstate_transport_peer_{key}",
                f"{doc} Per session: restarts from 0 on a new session.",
                labels=peer,
            )
            for key, (doc, _attr) in counters.items()
        }
        sessions = CounterMetricFamily(
            "raftstate_transport_peer_sessions", "Sessions established with the peer.", labels=peer
        )
        paths = CounterMetricFamily(
            "raftstate_transport_peer_paths",
            "Paths to the peer: ICE builds plus moves to a new address (roaming).",
            labels=peer,
        )
        for peer_id, link in sorted(links.items()):
            up.add_metric([peer_id], 1.0 if link.connected else 0.0)
            if link.srtt is not None:
                rtt.add_metric([peer_id], link.srtt)
            if link.loss_rate is not None:  # None: too few frames' fates known yet
                loss.add_metric([peer_id], link.loss_rate)
            path.add_metric([peer_id, link.path], 1.0)
            sessions.add_metric([peer_id], link.sessions)
            paths.add_metric([peer_id], link.paths)
            stats = link.link
            if stats is not None:
                if stats.min_rtt is not None:
                    min_rtt.add_metric([peer_id], stats.min_rtt)
                for key, (_doc, attr) in counters.items():
                    families[key].add_metric([peer_id], getattr(stats, attr))
        yield from (up, rtt, min_rtt, loss, path, sessions, paths, *families.values())
        drops = CounterMetricFamily(
            "raftstate_transport_drops",
            "Datagrams (or TCP connections) the Raft transport dropped, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.services.raft.transport_drops().items()):
            drops.add_metric([reason], n)
        yield drops

    def _grpc(self) -> Iterator[Metric]:
        started_s, handled_s, handling_s = self.grpc_metrics.samples()
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily(
            "grpc_server_started", "RPCs started on the server.", labels=labels
        )
        for key, n in started_s:
            started.add_metric([key.type, key.service, key.method], n)
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            labels=[*labels, "grpc_code"],
        )
        for key, code, n in handled_s:
            handled.add_metric([key.type, key.service, key.method, code], n)
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status (a stream's whole life).",
            labels=labels,
        )
        for key, snap in handling_s:
            handling.add_metric([key.type, key.service, key.method], _buckets(snap), snap.sum)
        yield from (started, handled, handling)
        guard = self.guard
        refused = CounterMetricFamily(
            "raftstate_grpc_refused",
            "RPCs refused before their handler ran, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["unauthenticated"], guard.unauthenticated)
        refused.add_metric(["permission_denied"], guard.denied)
        refused.add_metric(["undecodable"], guard.bad_requests)
        refused.add_metric(["max_concurrent_rpcs"], guard.unary.refused)
        refused.add_metric(["max_streams"], guard.streams.refused)
        refused.add_metric(["watch_max_watchers"], guard.watches.refused)
        yield refused
        yield _gauge("raftstate_grpc_unary_in_flight", "Unary RPCs being served.", guard.unary.open)
        yield _gauge("raftstate_grpc_streams_open", "Streams open.", guard.streams.open)

    def _store(self) -> Iterator[Metric]:
        table, proposer = self.services.table, self.services.proposer
        yield _gauge("raftstate_store_devices", "Devices in the store.", len(table))
        yield _gauge(
            "raftstate_store_devices_online",
            "Devices whose last heartbeat is within their TTL (this node's clock).",
            self.online.value,
        )
        yield _gauge("raftstate_store_revision", "Store revision applied on this node.",
                     table.revision)  # fmt: skip
        yield _gauge(
            "raftstate_store_state_bytes",
            "Bytes of device ids and reported state (the max_state_bytes measure).",
            table.state_bytes,
        )
        yield _gauge(
            "raftstate_heartbeats_pending",
            "Heartbeats submitted on this node and not yet answered.",
            proposer.waiting,
        )
        yield _histogram(
            "raftstate_heartbeat_ack_seconds",
            "Time from a heartbeat's submit on this node to its commit and apply here.",
            proposer.ack_latency.snapshot(),
        )

    def _watch(self) -> Iterator[Metric]:
        hub = getattr(self.services, "hub", None)
        if hub is None:
            return
        yield _gauge("raftstate_watchers", "Watch streams open on this node.", hub.watchers)
        stats = hub.stats
        yield _counter(
            "raftstate_watch_events_sent",
            "Events sent to watchers (one per watcher that received it).",
            stats.events_sent,
        )
        yield _counter(
            "raftstate_watch_responses_sent",
            "Watch responses with events sent.",
            stats.responses_sent,
        )
        yield _counter(
            "raftstate_watch_slow_dropped",
            "Watchers ended with WATCHER_TOO_SLOW (more than watch_max_pending queued).",
            stats.slow_dropped,
        )
        yield _counter(
            "raftstate_watch_gaps",
            "Times the event window dropped events before the hub dispatched them "
            "(every affected watcher was ended).",
            stats.gaps,
        )
        window: Any = hub.window
        if hasattr(window, "stats"):
            ws = window.stats()
            yield _gauge("raftstate_watch_window_events", "Events retained for watchers.",
                         ws.events)  # fmt: skip
            yield _gauge(
                "raftstate_watch_window_bytes",
                "Approximate bytes the event window keeps alive.",
                ws.bytes,
            )
            yield _gauge(
                "raftstate_watch_window_oldest_revision",
                "Oldest revision a watch or an at_revision read can start from on this node.",
                ws.oldest,
            )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = ["ONLINE_PAGE", "NodeCollector", "OnlineCounter", "now_ms"]
