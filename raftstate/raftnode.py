"""pysyncobj wiring: the Raft engine underneath the device table.

We extend pysyncobj without modifying it:

* log commands in our own format (:mod:`raftstate.logcommand`: a prefix and
  a protobuf ``HeartbeatBatch``), proposed through pysyncobj's
  ``_applyCommand`` and applied by overriding its private apply step, so no
  log entry is ever a pickle (pysyncobj's ``@replicated`` pickles);
* every message on the wire encoded by :mod:`raftstate.transport.wirecodec`
  (UDP and TCP), never pickled;
* snapshots through pysyncobj's custom serializer hooks, written as a
  protobuf ``Snapshot`` (never a pickle of our objects);
* pysyncobj's timers mapped from :class:`~raftstate.config.NodeConfig`,
  including ``leaderFallbackTimeout`` as check-quorum, then derived from the
  measured links (:mod:`raftstate.linktiming`, :meth:`RaftNode.refresh_link_timing`);
* always our own journal (``raftstate/journal.py``: a CRC per record, meta
  without pickle, fdatasync per append for ``durability = "fsync"``) and a
  snapshot receiver that verifies a streamed snapshot before it replaces
  ours; a corrupt snapshot on disk is moved aside at start and the node
  catches up from the leader without voting (``raftstate/catchup.py``);
* every exception escaping a tick counted and acted on
  (``raftstate/tickguard.py``), and compaction by journal bytes.

Threading: pysyncobj's tick thread owns all Raft state and applies
commands and calls the serializer hooks. Other threads may call
:meth:`propose` (pysyncobj queues it and wakes the tick thread through its
pipe notifier) and read the properties of :meth:`snapshot_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pysyncobj.syncobj as _pso
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.config import FAIL_REASON
from pysyncobj.tcp_connection import CONNECTION_STATE

from raftstate import appendguard, fastcommit, logcommand, snapshotfile
from raftstate.catchup import CatchUpGate
from raftstate.config import MAX_COMMAND_BYTES, NodeConfig, append_entries_bytes
from raftstate.errors import ConfigError
from raftstate.integrity import CorruptData
from raftstate.journal import (
    ChecksummedJournal,
    compaction_due,
    move_aside,
)
from raftstate.linktiming import LinkSample, Timing, TimingBounds, derive
from raftstate.model import HeartbeatResult
from raftstate.nextindex import ResetGuard, SendLedger
from raftstate.nodekeys import load_identity
from raftstate.presence import DEFAULT_TICK_BUDGET, ClockAnchor, ExpiryPlanner
from raftstate.prevote import MESSAGE_TYPES as PREVOTE_MESSAGES
from raftstate.prevote import PREVOTE
from raftstate.prevotegate import PreVoteGate
from raftstate.privfile import private_dir
from raftstate.raftevents import RaftEvents, SnapshotStats
from raftstate.snapshotter import BackgroundSerializer
from raftstate.statemachine import ControlResult, DeviceTable, TableCapture, encode_expire
from raftstate.tickguard import EXIT_TICK_FAILURES, TickGuard
from raftstate.tickstats import TickStats
from raftstate.transport.tcp import CodecTCPTransport
from raftstate.transport.udp import UdpTransport
from raftstate.transport.udpconfig import IceSettings, PeerLinkStats, settings_for

log = logging.getLogger("raftstate.raft")

JOURNAL_FILE = "raft.journal"
#: A forced (by bytes) compaction that has not completed is requested again
#: after this long.
FORCED_COMPACTION_RETRY_S = 30.0
SNAPSHOT_FILE = "snapshot.bin"

ProposeCallback = Callable[[list[HeartbeatResult] | None, int], None]
ControlCallback = Callable[[ControlResult | None, int], None]


class Role(enum.IntEnum):
    """Values match ``raftstate.v1.Role``."""

    FOLLOWER = 1
    CANDIDATE = 2
    LEADER = 3


#: An expiry entry unanswered this long (ms) is given up: its devices are
#: re-planned (pysyncobj answers every proposal, but a lost answer must not
#: leave devices undecided).
EXPIRY_ANSWER_TIMEOUT_MS = 5_000
#: A leader whose wall clock differs from the log clock estimate by more than
#: this logs a warning (the stamps keep log time continuous either way).
SKEW_WARN_MS = 1_000

#: pysyncobj's FAIL_REASON codes, for callers of :meth:`RaftNode.propose`.
SUCCESS = FAIL_REASON.SUCCESS
QUEUE_FULL = FAIL_REASON.QUEUE_FULL


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """A point-in-time view of this node's Raft state."""

    role: Role
    term: int
    commit_index: int
    last_applied: int
    leader_raft_address: str | None
    connected: frozenset[str]
    match_index: dict[str, int]
    last_log_index: int = 0
    #: Ticks that raised since start, and the last such error ("" if none).
    tick_failures: int = 0
    last_tick_error: str = ""
    #: Lost data found at start; not voting until caught up (raftstate/catchup.py).
    catching_up: bool = False
    journal_bytes: int = 0
    #: Longest tick work since start (raftstate/tickstats.py), and ticks over 50 ms.
    max_tick_s: float = 0.0
    max_tick_cpu_s: float = 0.0
    tick_stalls: int = 0
    #: Elections started and leader changes seen (raftstate/raftevents.py).
    elections: int = 0
    leader_changes: int = 0
    #: The timers in force (raftstate/linktiming.py), seconds.
    timing: Timing | None = None


def syncobj_conf(
    cfg: NodeConfig, table: DeviceTable, codec: SnapshotCodec | None = None
) -> SyncObjConf:
    """Translate our config into pysyncobj's. See docs/architecture.md for
    why each value is what it is."""
    data = Path(cfg.data_dir)
    if codec is None:
        codec = SnapshotCodec(table, fsync=cfg.durability == "fsync")
    return SyncObjConf(
        password=cfg.cluster_secret or None,
        autoTick=True,
        autoTickPeriod=cfg.tick_ms / 1000,
        # Propose and replicate at once instead of on the appendEntriesPeriod
        # timer: group commit in our batcher already amortises the per-entry
        # cost, and the timer would add up to heartbeat_ms to every commit.
        appendEntriesUseBatch=False,
        # An entry whose command reaches this size would be sent in pysyncobj's
        # chunked 'transmission' form, whose last piece can arrive after the
        # piece marked 'finish' (the marker is computed from the command's
        # length, not the pickled entry's): followers then unpickled a cut
        # entry, and replication wedged. Entries are bounded far below it.
        appendEntriesBatchSizeBytes=append_entries_bytes(),
        appendEntriesPeriod=cfg.heartbeat_ms / 1000,
        raftMinTimeout=cfg.election_timeout_min_ms / 1000,
        raftMaxTimeout=cfg.election_timeout_max_ms / 1000,
        leaderFallbackTimeout=cfg.leader_step_down_ms / 1000,
        connectionTimeout=cfg.connection_timeout_ms / 1000,
        connectionRetryTime=cfg.connection_retry_ms / 1000,
        # Fail fast when there is no leader; the proposer retries on its own
        # schedule within each request's deadline.
        commandsWaitLeader=False,
        journalFile=str(data / JOURNAL_FILE),
        fullDumpFile=str(data / SNAPSHOT_FILE),
        logCompactionMinEntries=cfg.compaction_min_entries,
        logCompactionMinTime=cfg.compaction_min_time_s,
        serializer=codec.write,
        deserializer=codec.read,
        # With a custom serializer pysyncobj never forks; say so explicitly.
        useFork=False,
        bindAddress=cfg.raft_bind,
        bindRetryTime=0.2,
        maxBindRetries=25,
        dynamicMembershipChange=False,
    )


def configured_timing(cfg: NodeConfig) -> Timing:
    """The timers as configured (before any link is measured)."""
    return Timing(
        heartbeat=cfg.heartbeat_ms / 1000,
        election_min=cfg.election_timeout_min_ms / 1000,
        election_max=cfg.election_timeout_max_ms / 1000,
        step_down=cfg.leader_step_down_ms / 1000,
    )


def timing_bounds(cfg: NodeConfig) -> TimingBounds:
    """Where :func:`raftstate.linktiming.derive` may put the timers."""
    return TimingBounds(
        floor=cfg.election_timeout_floor_ms / 1000,
        ceiling=cfg.election_timeout_ceiling_ms / 1000,
        min_heartbeat=cfg.tick_ms / 1000,
    )


def link_samples(links: dict[str, PeerLinkStats]) -> dict[str, LinkSample]:
    """The connected peers' links that have an RTT sample, keyed by member id.
    Loss and burst are the worse of the two directions: a follower's timer
    waits on what it *receives* (``rx_loss``), a leader's on what it sends.
    The copies are this end's own (chosen for its send loss): when the
    receive direction is the worse one the peer sends at least as many, so
    counting ours keeps the estimate conservative."""
    out = {}
    for peer, st in links.items():
        link = st.link
        if not st.connected or link is None or link.srtt is None or link.rttvar is None:
            continue
        burst = link.burst_loss if link.burst_loss is not None else 0.0
        out[peer] = LinkSample(
            srtt=link.srtt,
            rttvar=link.rttvar,
            loss=max(link.loss_rate, link.rx_loss or 0.0),
            burst=max(burst, link.rx_burst or 0.0),
            copies=link.redundancy,
        )
    return out


MessageHandler = Callable[[Any, dict[str, Any]], None]
#: Messages of ours carried inside pysyncobj's transport have types with this prefix.
OWN_MESSAGE_PREFIX = "rs_"


class OwnMessagesMixin:
    """The side door for raftstate's own messages (type ``rs_*``: ReadIndex
    probes, acks, grants), mixed into every transport class: those go to
    ``RaftNode``'s handler, everything else to pysyncobj unchanged. Also
    registers the transport so :meth:`RaftNode.send_raw` can reach it. Tick
    thread only."""

    _syncObj: Any

    def __init__(self, syncObj: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N803
        super().__init__(syncObj, *args, **kwargs)  # type: ignore[call-arg]
        syncObj._own_transport = self

    #: (node, index): the answer to the AppendEntries being processed may
    #: claim no more than ``index`` (raftstate/appendguard.py).
    _reply_cap: tuple[Any, int] | None = None

    def send(self, node: Any, message: Any) -> Any:
        cap = self._reply_cap
        if (
            cap is not None
            and cap[0] is node
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
        ):
            message = {**message, "next_node_idx": min(message["next_node_idx"], cap[1] + 1)}
        if isinstance(message, dict) and message.get("type") == "append_entries":
            entries = message.get("entries")
            ledger = getattr(self._syncObj, "send_ledger", None)
            if entries and ledger is not None:
                ledger.on_append(str(node.id), int(message["term"]), entries[0][1], entries[-1][1])
        return super().send(node, message)  # type: ignore[misc]

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if isinstance(message, dict):
            kind = message.get("type")
            if isinstance(kind, str) and kind.startswith(OWN_MESSAGE_PREFIX):
                handler = getattr(self._syncObj, "_own_message_handler", None)
                if handler is not None:
                    handler(node, message)
                return
            if kind in ("request_vote", "rs_prevote"):
                may_vote = getattr(self._syncObj, "may_vote", None)
                if may_vote is not None and not may_vote():
                    return  # catching up after lost data: no vote (raftstate/catchup.py)
            if kind == "next_node_idx":
                on_reply = getattr(self._syncObj, "_on_next_index", None)
                if on_reply is not None:
                    on_reply(node, message, super()._onMessageReceived)  # type: ignore[misc]
                    return
            elif kind == "append_entries" and _snapshot_piece(message):
                super()._onMessageReceived(node, message)  # type: ignore[misc]
                # pysyncobj's follower answers a snapshot only after its last
                # piece, so a leader's TCP connection reads nothing for the whole
                # transfer and closes itself after connectionTimeout; a 133 MB
                # snapshot then never arrived whole. A no-op answer per piece
                # (neither success nor reset: the leader only notes the reply).
                raft = self._syncObj
                self.send(node, {
                    "type": "next_node_idx", "reset": False, "success": False,
                    "next_node_idx": int(raft._SyncObj__getCurrentLogIndex()) + 1,
                })  # fmt: skip
                return
            elif kind == "append_entries":
                keep = getattr(self._syncObj, "_filter_append_entries", None)
                if keep is not None:
                    message, cap = keep(message)
                    if cap is not None:
                        # pysyncobj answers inside this call: cap that answer.
                        self._reply_cap = (node, cap)
                        try:
                            super()._onMessageReceived(node, message)  # type: ignore[misc]
                        finally:
                            self._reply_cap = None
                        return
        super()._onMessageReceived(node, message)  # type: ignore[misc]


def _snapshot_piece(message: dict[str, Any]) -> bool:
    """A snapshot piece that is not the last one (``serialized`` is
    ``(data, is_first, is_last)``)."""
    piece = message.get("serialized")
    return isinstance(piece, tuple | list) and len(piece) == 3 and not piece[2]


#: Election messages that must survive pysyncobj closing an idle TCP link.
_HELD_ON_IDLE = frozenset({"request_vote", PREVOTE})


class RaftstateTCPTransport(OwnMessagesMixin, CodecTCPTransport):
    """pysyncobj's TCP transport, speaking our wire codec
    (:mod:`raftstate.transport.tcp`), with the ``rs_*`` side door.

    pysyncobj closes a connection on which nothing was read for
    ``connectionTimeout``, but only checks when it next sends on it, so that
    send is dropped with the connection. Follower-to-follower links carry
    nothing while a leader lives, so the dropped message was the first
    ``request_vote`` after the leader failed: the other follower timed out
    too and every TCP election split into a second term. An election message
    that meets an idle link is kept and sent again when the peer reconnects
    (milliseconds later: the dialling side redials as soon as the link drops).
    """

    def __init__(self, syncObj: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N803
        self._held: dict[Any, tuple[float, dict[str, Any]]] = {}
        super().__init__(syncObj, *args, **kwargs)

    def send(self, node: Any, message: Any) -> Any:
        if isinstance(message, dict) and message.get("type") in _HELD_ON_IDLE:
            conn = self._connections.get(node)
            handshaking = conn is not None and self._syncObj.encryptor and not conn.sendRandKey
            if conn is not None and (_idle_out(conn) or handshaking):
                self._held[node] = (time.monotonic(), message)
        return super().send(node, message)

    def _onNodeConnected(self, node: Any) -> None:  # noqa: N802 - pysyncobj's name
        super()._onNodeConnected(node)
        held = self._held.pop(node, None)
        if held is not None and time.monotonic() - held[0] < self._syncObj.conf.raftMinTimeout:
            self.send(node, held[1])


def _idle_out(conn: Any) -> bool:
    """pysyncobj's TcpConnection will close itself at its next send."""
    return bool(
        conn.state == CONNECTION_STATE.CONNECTED
        and time.monotonic() - conn._TcpConnection__lastReadTime > conn._TcpConnection__timeout
    )


class RaftstateUdpTransport(OwnMessagesMixin, UdpTransport):
    """:class:`~raftstate.transport.udp.UdpTransport` with the ``rs_*`` side door."""


def transport_factory(
    cfg: NodeConfig, loop: asyncio.AbstractEventLoop | None
) -> Callable[..., Any]:
    """The ``transportClass`` pysyncobj should build for ``cfg.transport``.
    For ``udp``, ``loop`` (a running loop on another thread) owns the socket;
    ``None`` gives the transport a loop thread of its own."""
    if cfg.transport == "udp":
        settings = settings_for(
            cfg.node_id,
            cfg.raft_bind,
            [(m.id, m.raft) for m in cfg.members],
            cfg.cluster_secret,
            dead_after=max(cfg.connection_timeout_ms / 1000, 1.5),
            send_to=cfg.peer_raft,
            ice=_ice_settings(cfg),
            identity=load_identity(cfg),
            congestion_control=cfg.udp_congestion_control,
        )
        return functools.partial(RaftstateUdpTransport, settings=settings, loop=loop)
    return RaftstateTCPTransport


def _ice_settings(cfg: NodeConfig) -> IceSettings | None:
    if cfg.reach != "ice":
        return None
    return IceSettings(
        rendezvous=cfg.rendezvous,
        stun_server=cfg.stun_server,
        rendezvous_secret=cfg.rendezvous_secret,
        turn_server=cfg.turn_server,
        turn_username=cfg.turn_username,
        turn_password=cfg.turn_password,
        connect_timeout=cfg.ice_connect_timeout_ms / 1000,
    )


class RaftNode(SyncObj):  # type: ignore[misc]
    """A pysyncobj node whose state machine is a :class:`DeviceTable`."""

    def __init__(
        self,
        cfg: NodeConfig,
        table: DeviceTable,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``loop``: the node's running event loop, used by the UDP transport
        (see :func:`transport_factory`); construct on another thread, since
        this waits for the transport to bind. Raises ``ConfigError``."""
        private_dir(cfg.data_dir)
        self.table = table
        self.cfg = cfg
        #: rs_* messages go to :meth:`_dispatch_own`: PreVote's to the gate,
        #: the rest to the handler of :meth:`set_message_handler`.
        self._own_message_handler: MessageHandler | None = self._dispatch_own
        self._reads_handler: MessageHandler | None = None
        self._prevote_gate: PreVoteGate | None = None
        self._reset_guard = ResetGuard()
        #: Committed presence (raftstate/presence.py): the log clock estimate
        #: and, on the leader, the expiry planner.
        self.clock_anchor = ClockAnchor(cfg.max_clock_skew_ms)
        self.expiry_planner = ExpiryPlanner()
        #: The last leader this node knew (None: none since start).
        self._seen_leader: Any = None
        self._skew_warned = False
        #: Followers raise their own commit index (raftstate/fastcommit.py).
        self._follower_commit = cfg.follower_commit and fastcommit.enabled(len(cfg.members))
        #: Entries sent / resent per peer raft address this term (leader).
        self.send_ledger = SendLedger()
        self._own_transport: Any = None
        self._by_raft = {m.raft: m for m in cfg.members}
        me = cfg.self_member
        others = [m.raft for m in cfg.members if m.id != me.id]
        #: Elections and leader changes (raftstate/raftevents.py), snapshots written.
        self.raft_events = RaftEvents()
        self.snapshot_stats = SnapshotStats()
        self._codec = SnapshotCodec(
            table, fsync=cfg.durability == "fsync", stats=self.snapshot_stats
        )
        conf = syncobj_conf(cfg, table, self._codec)
        fsync = cfg.durability == "fsync"
        data = Path(cfg.data_dir)
        self.journal = ChecksummedJournal(str(data / JOURNAL_FILE), fsync=fsync)
        _quarantine_corrupt_snapshot(data, self.journal)
        if self.journal.catch_up and len(cfg.members) == 1:
            log.warning("single member: nobody to catch up from; serving what survived")
            self.journal.set_catch_up(False)
        self._catch_up = CatchUpGate(self.journal.catch_up, self.journal.getRaftCommitIndex())
        self._tick_guard = TickGuard(cfg.tick_failure_limit)
        #: The timers in force (tick thread writes) and the next ones to
        #: apply (:meth:`refresh_link_timing` writes, the tick thread takes).
        self.timing = configured_timing(cfg)
        self._timing_next: Timing | None = None
        self._timing_bounds = timing_bounds(cfg)
        #: Work time of every tick (wall time minus the poller wait).
        self.tick_stats = TickStats()
        self._timed_poller: _TimedPoller | None = None
        self._on_fatal: Callable[[int], None] | None = None
        self._compaction_forced: tuple[int, float] | None = None
        serializer = functools.partial(
            BackgroundSerializer, codec=self._codec, verify=SnapshotCodec.verify, fsync=fsync
        )
        if not cfg.cluster_secret:
            log.warning(
                "INSECURE: the Raft transport runs without cluster_secret "
                "(allow_insecure_transport): any local process can join and write the log"
            )
        with _storage_classes(self.journal, serializer):
            super().__init__(me.raft, others, conf, transportClass=transport_factory(cfg, loop))
        self._timed_poller = _TimedPoller(self._poller)
        self._poller: Any = self._timed_poller
        try:
            self.waitBinded()
        except Exception:
            self.destroy()
            raise ConfigError(
                f"raft_listen: cannot bind {cfg.raft_bind} (in use, or not an address of this host)"
            ) from None
        if cfg.pre_vote:
            self._prevote_gate = PreVoteGate(
                self, len(cfg.members), cfg.election_timeout_min_ms / 1000
            )

    def propose(self, entry: bytes, callback: ProposeCallback) -> None:
        """Queue the HeartbeatBatch ``entry`` for replication, as a
        :mod:`raftstate.logcommand` command (no pickle). ``callback(results,
        fail_reason)`` runs later on the tick thread. Safe from any thread."""
        self._applyCommand(logcommand.encode(entry), callback)

    def propose_control(self, command: bytes, callback: ControlCallback) -> None:
        """Queue a ``ControlCommand`` (delete, revocation) for replication;
        ``callback(result, fail_reason)`` runs later on the tick thread with a
        :class:`~raftstate.statemachine.ControlResult`. Safe from any thread."""
        self._applyCommand(logcommand.encode_control(command), callback)

    def _applyCommand(  # noqa: N802 - pysyncobj's name
        self, command: bytes, callback: Any, commandType: int | None = None  # noqa: N803
    ) -> None:
        """pysyncobj's entry point for a new command, also for commands a
        follower forwards (``apply_command``): only raftstate batch commands
        enter the log, and none larger than ``MAX_COMMAND_BYTES`` (whatever
        this node's own ``batch_max_bytes``: a larger one would reach
        pysyncobj's chunked form); anything else is denied before it is
        appended."""
        if (
            commandType is not None
            or not logcommand.is_ours(command)
            or len(command) > MAX_COMMAND_BYTES
        ):
            self._SyncObj__callErrCallback(FAIL_REASON.REQUEST_DENIED, callback)
            return
        super()._applyCommand(command, callback)

    def _SyncObj__doApplyCommand(  # noqa: N802
        self, command: bytes
    ) -> list[HeartbeatResult] | ControlResult | None:
        """Replaces pysyncobj's private apply step (which unpickles): apply one
        committed command on the tick thread. Returns the batch's results or
        the control command's result (pysyncobj hands them to the proposer's
        callback), ``None`` for a NO_OP; raises ``DecodeError`` for any other
        command."""
        parsed = logcommand.parse(command)
        if parsed is None:
            return None
        kind, body = parsed
        table = self.table
        result: list[HeartbeatResult] | ControlResult
        if kind is logcommand.Kind.CONTROL:
            result = table.apply_control(body)
        else:
            result = table.apply(body)
        self.clock_anchor.observe(table.last_entry_ms, _mono_ms())
        return result

    # ---- committed presence: the expiry driver (raftstate/presence.py) --------

    def stamp_ms(self) -> int:
        """``proposed_at_ms`` for an entry this node proposes now: its wall
        clock, but never below the log clock estimate or the committed log
        time (raftstate/presence.py). Any thread (reads a few ints)."""
        return self.clock_anchor.stamp(_mono_ms(), _wall_ms(), self.table.max_proposed_at_ms)

    def clock_skew_ms(self) -> int:
        """This node's wall clock minus its log clock estimate (Status)."""
        return self.clock_anchor.skew_ms(_mono_ms(), _wall_ms())

    def _presence_tick(self) -> None:
        """Tick thread, every tick on every node: follow leadership for the
        clock anchor, advance the deadline wheel; on the leader, propose
        expiries (at most ``MAX_INFLIGHT`` entries unanswered)."""
        anchor, planner, table = self.clock_anchor, self.expiry_planner, self.table
        wheel = table.wheel
        mono, wall, committed = _mono_ms(), _wall_ms(), table.max_proposed_at_ms
        leader = bool(self._isLeader())
        current = self._SyncObj__raftLeader
        if leader and not anchor.leader:
            if self._seen_leader is None:
                # No leader followed since start: what the journal replay
                # taught the estimate is old; trust this node's own clock.
                anchor.leader_changed()
            anchor.become_leader(mono, wall, committed)
            self._skew_warned = False
        elif not leader and anchor.leader:
            anchor.step_down()
            planner.give_up(wheel, 0, -1)
        if current is not None and current is not self._seen_leader:
            if not leader:
                anchor.leader_changed()
            self._seen_leader = current
        now = anchor.stamp(mono, wall, committed)
        wheel.advance(now, table.deadline_of, DEFAULT_TICK_BUDGET)
        if not leader:
            if wheel.due:
                wheel.recheck_due(now, table.deadline_of, DEFAULT_TICK_BUDGET // 10)
            return
        skew = anchor.skew_ms(mono, wall)
        if abs(skew) > SKEW_WARN_MS and not self._skew_warned:
            self._skew_warned = True
            log.warning(
                "this leader's clock is %d ms %s the previous leader's (estimated); "
                "expiries are bounded by max_clock_skew_ms = %d",
                abs(skew),
                "ahead of" if skew > 0 else "behind",
                anchor.max_clock_skew_ms,
            )
        if planner.inflight:
            planner.give_up(wheel, now, EXPIRY_ANSWER_TIMEOUT_MS)
        if not wheel.due or len(planner.inflight) >= planner.max_inflight:
            return
        def may_expire(last_seen: int, deadline: int) -> bool:
            return anchor.may_expire(last_seen, deadline, mono, wall, committed)

        plans = planner.plan(
            wheel,
            table.presence_state,
            may_expire,
            now,
            DEFAULT_TICK_BUDGET,
        )
        for token, batch in plans:
            self.propose_control(encode_expire(batch, now), self._expiry_answer(token))

    def _expiry_answer(self, token: int) -> ControlCallback:
        def answer(result: ControlResult | None, fail_reason: int) -> None:
            expired = result.expired if fail_reason == SUCCESS and result is not None else None
            self.expiry_planner.done(token, self.table.wheel, expired)

        return answer

    def status(self) -> RaftStatus:
        """Read this node's Raft state. Safe from any thread (a snapshot of
        values the tick thread may change right after)."""
        st: dict[str, Any] = self.getStatus()
        leader = st["leader"]
        role = {0: Role.FOLLOWER, 1: Role.CANDIDATE, 2: Role.LEADER}[st["state"]]
        connected = frozenset(
            k.removeprefix("partner_node_status_server_")
            for k, v in st.items()
            if k.startswith("partner_node_status_server_") and v == 2
        )
        match = {
            k.removeprefix("match_idx_server_"): int(v)
            for k, v in st.items()
            if k.startswith("match_idx_server_")
        }
        return RaftStatus(
            role=role,
            term=int(st["raft_term"]),
            commit_index=int(st["commit_idx"]),
            last_applied=int(st["last_applied"]),
            leader_raft_address=str(leader) if leader is not None else None,
            connected=connected,
            match_index=match if role is Role.LEADER else {},
            last_log_index=self._last_log_index(),
            tick_failures=self._tick_guard.total,
            last_tick_error=self._tick_guard.last_error,
            catching_up=self._catch_up.active,
            journal_bytes=self.journal.size_bytes,
            max_tick_s=self.tick_stats.max_s,
            max_tick_cpu_s=self.tick_stats.max_cpu_s,
            tick_stalls=self.tick_stats.stalls,
            elections=self.raft_events.elections,
            leader_changes=self.raft_events.leader_changes,
            timing=self.timing,
        )

    # ---- timers that follow the link (raftstate/linktiming.py) ----------------

    def refresh_link_timing(self) -> Timing | None:
        """Derive the timers from the links as measured now and hand them to
        the tick thread, which applies them at its next tick. Call on the
        event loop that owns the UDP transport (``peer_link_stats`` is then
        a direct read); a no-op without link samples (TCP, idle links).
        Returns the timing handed over, or ``None`` if nothing changed."""
        leader = self.leader_raft_address()
        member = self._by_raft.get(leader) if leader is not None else None
        leader_id = member.id if member is not None and member.id != self.cfg.node_id else None
        links = link_samples(self.peer_link_stats())
        now = self.timing
        new = derive(links, leader_id, self._timing_bounds, now)
        if _same_timing(new, now):
            return None
        self._timing_next = new
        return new

    def _apply_timing(self) -> None:
        """Tick thread: put :attr:`_timing_next` into pysyncobj's conf (it
        reads these four fields each time it uses them) and PreVote's lease.
        An election deadline already armed keeps its value; the next
        ``append_entries`` re-arms it with the new range."""
        new, self._timing_next = self._timing_next, None
        if new is None:
            return
        conf = self.conf
        conf.appendEntriesPeriod = new.heartbeat
        conf.raftMinTimeout = new.election_min
        conf.raftMaxTimeout = new.election_max
        conf.leaderFallbackTimeout = new.step_down
        if self._prevote_gate is not None:
            self._prevote_gate.set_min_timeout(new.election_min)
        old, self.timing = self.timing, new
        # Estimates jitter: log big moves only (and the ceiling starting or
        # stopping to hold the timeout down); Status and /metrics show the rest.
        if new.capped != old.capped or not 0.5 < new.election_min / old.election_min < 2:
            log.info(
                "raft timers from the link to %s: heartbeat %.0f ms, election timeout "
                "%.0f-%.0f ms, check-quorum %.0f ms%s",
                new.basis or "?",
                new.heartbeat * 1000,
                new.election_min * 1000,
                new.election_max * 1000,
                new.step_down * 1000,
                " (held down by election_timeout_ceiling_ms)" if new.capped else "",
            )

    def _SyncObj__sendAppendEntries(self) -> None:  # noqa: N802 - overrides pysyncobj's private
        """Tick thread, leader: pysyncobj's AppendEntries round, skipping peers
        whose transport backlog is too high (``UdpTransport.paused_nodes``).

        pysyncobj ignores ``send``'s result and moves nextIndex (or a snapshot
        transfer's file position) as if every message went out, and one round
        may produce up to ``appendEntriesPeriod`` worth of messages. A peer
        that cannot keep up is therefore left out of rounds, not refused
        messages, until its backlog has drained: nothing accepted is lost and
        a snapshot transfer resumes where it stopped."""
        transport = self._own_transport
        paused = transport.paused_nodes() if isinstance(transport, UdpTransport) else set()
        if not paused:
            SyncObj._SyncObj__sendAppendEntries(self)
            return
        others: set[Any] = getattr(self, "_SyncObj__otherNodes")  # noqa: B009 - private of pysyncobj
        self._SyncObj__otherNodes = others - paused
        try:
            SyncObj._SyncObj__sendAppendEntries(self)
        finally:
            self._SyncObj__otherNodes = others

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802 - overrides pysyncobj's private
        """Tick thread: pysyncobj's apply. With ``appendEntriesUseBatch``
        off, pysyncobj answers "send an AppendEntries round now" whenever the
        leader applied something, only to tell the followers the new commit
        index. Under follower commit (raftstate/fastcommit.py) a follower
        already committed every entry of the current term it holds when it
        accepted it, so that round (two AppendEntries, two replies and a
        tick-thread wake-up per reply at the leader, per commit) carries
        nothing new in steady state; it is skipped. Anything a follower still
        lacks (entries of an earlier term, which the leader's no-op of its
        term commits; an entry whose commit a trimmed AppendEntries could not
        raise) reaches it with the next proposal's AppendEntries or the next
        heartbeat round, which pysyncobj still sends every
        ``appendEntriesPeriod``."""
        need: bool = SyncObj._SyncObj__applyLogEntries(self)
        return need and not self._follower_commit

    # ---- integrity: tick guard, catch-up, compaction by bytes ------------------

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 - pysyncobj's names
        """pysyncobj's tick, guarded: an exception is counted and acted on
        here (raftstate/tickguard.py) instead of looping in pysyncobj's
        thread; PreVote decides whether an expired election deadline may
        start an election before pysyncobj looks at it
        (raftstate/prevotegate.py). Tick thread only."""
        started = time.monotonic()
        cpu = time.thread_time()
        if self._timing_next is not None:
            self._apply_timing()
        poller = self._timed_poller
        waited = poller.waited if poller is not None else 0.0
        if self._guarded_tick(timeToWait) and poller is not None:
            work = time.monotonic() - started - (poller.waited - waited)
            self.tick_stats.observe(work, time.thread_time() - cpu)
        self.raft_events.observe(
            self._SyncObj__raftState, self._SyncObj__raftCurrentTerm, self._SyncObj__raftLeader
        )

    def _guarded_tick(self, timeToWait: float) -> bool:  # noqa: N803 - pysyncobj's name
        """One tick; True if it ran normally (not failed, transport ready:
        both of those sleep instead of polling, which is not work)."""
        if self._catch_up.active:
            self._hold_election()
        gate = self._prevote_gate
        try:
            if self.cfg.test_fail_ticks_file and os.path.exists(self.cfg.test_fail_ticks_file):
                raise RuntimeError("injected tick failure (test_fail_ticks_file)")
            with gate.tick() if gate is not None else contextlib.nullcontext():
                super()._onTick(timeToWait)
            self._presence_tick()
        except Exception as exc:  # every escape is counted; see TickGuard
            self._on_tick_failure(exc)
            time.sleep(self.cfg.tick_ms / 1000)  # pysyncobj's pause before a retry
            return False
        self._tick_guard.on_success()
        if self._catch_up.on_applied(int(self.raftLastApplied)):
            self.journal.set_catch_up(False)
            log.warning(
                "caught up with the leader (applied index %d): voting again",
                self.raftLastApplied,
            )
        self._maybe_compact_by_bytes(time.monotonic())
        return bool(self._SyncObj__transport.ready)

    def _on_tick_failure(self, exc: Exception) -> None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        text = f"{type(exc).__name__}: {exc}"
        guard = self._tick_guard
        verdict = guard.on_failure(f"{type(exc).__name__}@{where}", text, time.monotonic())
        if verdict.log_traceback:
            log.error("Raft tick failed (%d in a row): %s", guard.consecutive, text, exc_info=exc)
        elif verdict.log_summary:
            log.error(
                "Raft tick still failing: %d failed ticks in total, %d in a row; last: %s",
                guard.total,
                guard.consecutive,
                text,
            )
        if verdict.act:
            self._give_up_after_tick_failures()

    def _give_up_after_tick_failures(self) -> None:
        """``tick_failure_limit`` consecutive failures: a leader hands over and
        steps down; then the node asks its owner to exit with
        :data:`EXIT_TICK_FAILURES` (a supervisor restarts it from its verified
        snapshot and journal)."""
        if self._isLeader():
            with contextlib.suppress(Exception):
                self.transferLeadership()
            self._SyncObj__raftLeader = None
            self._SyncObj__setState(_pso._RAFT_STATE.FOLLOWER)
            log.error("stepped down as leader after %d failed ticks", self._tick_guard.consecutive)
        log.critical(
            "Raft tick failed %d times in a row: exiting with status %d so a supervisor "
            "restarts this node from its verified snapshot and journal",
            self._tick_guard.consecutive,
            EXIT_TICK_FAILURES,
        )
        if self._on_fatal is not None:
            self._on_fatal(EXIT_TICK_FAILURES)

    def set_fatal_handler(self, handler: Callable[[int], None] | None) -> None:
        """``handler(exit_status)`` runs on the tick thread when this node
        cannot go on (repeated tick failures); it must only schedule a stop."""
        self._on_fatal = handler

    def health_problem(self) -> str | None:
        """Why this node should not be used for reads and writes now, or
        ``None``. Any thread."""
        if self._tick_guard.failing(time.monotonic()):
            return f"Raft tick failing: {self._tick_guard.last_error}"
        if self._catch_up.active:
            return "catching up with the leader after lost data"
        return None

    def may_vote(self) -> bool:
        """Whether this node may grant votes (False while catching up)."""
        return self._catch_up.may_vote()

    def _hold_election(self) -> None:
        """Tick thread: while catching up, never stand for election."""
        hold = time.monotonic() + self.cfg.election_timeout_min_ms / 1000
        deadline: float = getattr(self, "_SyncObj__raftElectionDeadline", 0.0)
        if deadline < hold:
            self._SyncObj__raftElectionDeadline = hold

    def _maybe_compact_by_bytes(self, now: float) -> None:
        """Tick thread: force a snapshot when the journal exceeds
        ``compaction_max_journal_bytes`` (at most one request per compaction,
        or per ``FORCED_COMPACTION_RETRY_S`` if none completes: a snapshot of a
        large table takes seconds and the journal is only truncated on a later
        tick, so a one-second retry snapshotted everything twice)."""
        journal = self.journal
        forced = self._compaction_forced
        if (
            forced is not None
            and forced[0] == journal.compactions
            and now - forced[1] < FORCED_COMPACTION_RETRY_S
        ):
            return
        compactable = journal.bytes_before(int(self.raftLastApplied) - 1)
        if compaction_due(journal.size_bytes, compactable, self.cfg.compaction_max_journal_bytes):
            log.info(
                "journal is %d bytes (limit %d): compacting",
                journal.size_bytes,
                self.cfg.compaction_max_journal_bytes,
            )
            self._compaction_forced = (journal.compactions, now)
            self.forceLogCompaction()

    def _filter_append_entries(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, Any], int | None]:
        """Tick thread: never let pysyncobj's follower delete entries that
        match the leader's (see raftstate/appendguard.py). Returns the message
        for pysyncobj and the highest index its answer may claim."""
        if self._catch_up.active and message.get("term", -1) >= self.raftCurrentTerm:
            self._catch_up.on_leader_commit(int(message.get("commit_index", 0)))
        gate = self._prevote_gate
        if gate is not None:
            gate.on_append_entries(int(message.get("term", -1)))
        if "prevLogIdx" not in message or message.get("term", -1) < self.raftCurrentTerm:
            return message, None
        ours = self._SyncObj__getEntries(message["prevLogIdx"])
        message, cap = appendguard.trim(message, ours)
        if self._follower_commit and cap is None:
            message = fastcommit.raise_commit(message)
        return message, cap

    def _last_log_index(self) -> int:
        """Index of the last log entry. Any thread: a read of the journal's
        last element, which the tick thread only ever appends after or
        replaces whole."""
        try:
            return int(self._SyncObj__getCurrentLogIndex())
        except (IndexError, TypeError):
            return 0

    def read_floor(self) -> int:
        """On the leader, any thread (values the tick thread writes, each read
        atomically): the lowest index a linearizable read must wait for. The
        commit index, unless followers commit on their own (three voters, see
        raftstate/fastcommit.py): then the last log index, since a follower may
        have acknowledged entries the leader has not yet counted."""
        return fastcommit.read_floor(
            self._follower_commit, int(self.raftCommitIndex), self._last_log_index()
        )

    def _on_next_index(
        self, node: Any, message: dict[str, Any], deliver: Callable[[Any, Any], None]
    ) -> None:
        """Tick thread: a follower's ``next_node_idx`` reply. Resets go through
        :class:`ResetGuard` (see raftstate/nextindex.py). A success never moves
        nextIndex back: pysyncobj's leader sets nextIndex to the reply's value,
        so with AppendEntries pipelined (one per proposal, every RTT's worth in
        flight) each ack of an older message rewound it and the next message
        re-sent every entry still in flight, which the follower then deleted
        and appended again. Raft (and etcd's Progress) keep nextIndex at
        ``max(nextIndex, matchIndex + 1)``; a lost message shows up as a
        rejection of the next one, which resets it."""
        if not self._isLeader():
            deliver(node, message)
            return
        nexts: dict[Any, int] = getattr(self, "_SyncObj__raftNextIndex", {})
        before = nexts.get(node)
        deliver(node, self._filter_next_index(node, message))
        after = nexts.get(node)
        if (
            message.get("success")
            and not message.get("reset")
            and before is not None
            and after is not None
            and after < before
        ):
            nexts[node] = before

    def _filter_next_index(self, node: Any, message: dict[str, Any]) -> dict[str, Any]:
        """Tick thread: pass a ``next_node_idx`` reply through :class:`ResetGuard`
        (see raftstate/nextindex.py) before pysyncobj's leader applies it."""
        if not self._isLeader():
            return message
        match = int(getattr(self, "_SyncObj__raftMatchIndex", {}).get(node, 0))
        hint = int(message.get("next_node_idx", 0))
        peer = str(node.id)
        if message.get("success") and hint - 1 > match:
            self._reset_guard.on_progress(peer)
        if not message.get("reset"):
            return message
        if hint - 1 < match:
            match = self._forget_lost_entries(node, match, hint - 1)
        index = self._reset_guard.on_reset(
            peer, int(self.raftCurrentTerm), match, hint, time.monotonic()
        )
        if index is None:
            return {**message, "reset": False}
        return {**message, "next_node_idx": index}

    def _forget_lost_entries(self, node: Any, match: int, last: int) -> int:
        """Tick thread, leader: ``node`` rejects with a log that ends at
        ``last``, below the index it had acknowledged (``match``). Over an
        ordered transport that only happens when it lost entries (a corrupt
        journal or snapshot, see raftstate/catchup.py). Raft assumes matchIndex
        never decreases, and pysyncobj's leader (and ResetGuard) would keep
        sending from ``match + 1`` forever; lower it so the entries are sent
        again and are not counted as held there. Returns the new match index."""
        log.warning(
            "%s lost log entries it had acknowledged (it holds through %d, had acked %d): "
            "sending them again",
            node.id,
            last,
            match,
        )
        matches: dict[Any, int] = getattr(self, "_SyncObj__raftMatchIndex", {})
        matches[node] = max(0, last)
        self._reset_guard.on_progress(str(node.id))
        return max(0, last)

    def set_message_handler(self, handler: MessageHandler | None) -> None:
        """Receive raftstate's own messages (type ``rs_*``, except PreVote's)
        on the tick thread."""
        self._reads_handler = handler

    def _dispatch_own(self, node: Any, message: dict[str, Any]) -> None:
        """Tick thread: route one ``rs_*`` message."""
        if message.get("type") in PREVOTE_MESSAGES:
            gate = self._prevote_gate
            if gate is not None:
                gate.on_message(node, message)
            return
        handler = self._reads_handler
        if handler is not None:
            handler(node, message)

    def send_raw(self, node: Any, message: dict[str, Any]) -> None:
        """Send one of our messages to a peer ``Node``. Tick thread only; a
        message to a disconnected peer is dropped (senders retransmit)."""
        self._own_transport.send(node, message)

    def loop_transport(self) -> UdpTransport | None:
        """The UDP transport, whose socket lives on the node's event loop
        (:meth:`UdpTransport.send_from_loop`, :meth:`UdpTransport.set_loop_receiver`);
        ``None`` for TCP, whose sockets belong to the tick thread."""
        transport = self._own_transport
        return transport if isinstance(transport, UdpTransport) else None

    def peer_link_stats(self) -> dict[str, PeerLinkStats]:
        """Per-peer path stats (srtt, retransmissions, loss) keyed by member
        id; empty for the TCP transport. Safe from any thread."""
        transport = self._own_transport
        return transport.peer_stats() if isinstance(transport, UdpTransport) else {}

    def transport_drops(self) -> dict[str, int]:
        """Datagrams the UDP transport dropped (or TCP connections closed for
        a bad frame), by reason. Safe from any thread."""
        transport = self._own_transport
        if isinstance(transport, (UdpTransport, CodecTCPTransport)):
            return transport.drop_counts()
        return {}

    def leader_raft_address(self) -> str | None:
        """The last known leader's Raft address, or ``None``. Thread-safe."""
        leader = self._getLeader()
        return leader.id if leader is not None else None

    def is_leader(self) -> bool:
        return bool(self._isLeader())


def _same_timing(a: Timing, b: Timing) -> bool:
    """Within 5 % on every timer (estimates jitter; re-applying costs little
    but logs and churns), same source."""
    pairs = (
        (a.heartbeat, b.heartbeat),
        (a.election_min, b.election_min),
        (a.election_max, b.election_max),
        (a.step_down, b.step_down),
    )
    return a.source == b.source and all(abs(x - y) <= 0.05 * max(x, y) for x, y in pairs)


def _mono_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _TimedPoller:
    """pysyncobj's poller, adding up the time the tick thread waits in it
    (so ``tick work = tick wall time - wait``, raftstate/tickstats.py)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.waited = 0.0

    def poll(self, timeout: float) -> None:
        start = time.monotonic()
        try:
            self._inner.poll(timeout)
        finally:
            self.waited += time.monotonic() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SnapshotCodec:
    """pysyncobj's serializer/deserializer hooks for the device table
    (raftstate/snapshotter.py runs them off the tick thread,
    raftstate/snapshotfile.py is the format)."""

    def __init__(
        self, table: DeviceTable, *, fsync: bool, stats: SnapshotStats | None = None
    ) -> None:
        self.table = table
        self.fsync = fsync
        self.stats = stats
        self._capture: TableCapture | None = None
        self._staged: tuple[str, snapshotfile.Loaded] | None = None
        self._writing: tuple[int, int, int, str] = (0, 0, 0, "")
        #: The last snapshot written here (``None`` before the first).
        self.last_written: snapshotfile.Written | None = None

    def start_write(self, path: str, data: tuple[Any, Any, Any]) -> Callable[[], None]:
        """Tick thread: capture the table at ``data[0]`` (``(last_entry,
        prev_entry, cluster)``) and return the write to run elsewhere."""
        last, prev, cluster = data
        capture = self._capture = self.table.capture()
        raft = snapshotfile.RaftFields(
            _entry_tuple(last), _entry_tuple(prev), tuple(sorted(str(n) for n in cluster))
        )

        self._writing = (capture.devices, capture.revision, raft.last[1], path)

        def work() -> None:  # the writer thread
            snapshotfile.write(path, capture, raft, fsync=self.fsync)

        return work

    def written(self, seconds: float) -> None:
        """Tick thread: the write started by ``start_write`` succeeded."""
        devices, revision, index, path = self._writing
        size = os.path.getsize(path)
        self.last_written = snapshotfile.Written(devices, revision, index, size)
        if self.stats is not None:
            self.stats.observe(seconds, size)
        log.info(
            "snapshot written in %.2f s: %d devices, revision %d, index %d, %d bytes",
            seconds,
            devices,
            revision,
            index,
            size,
        )

    def release(self) -> None:
        """Tick thread: the write ended; stop copy-on-write."""
        if self._capture is not None:
            self.table.release(self._capture)
            self._capture = None

    def failed(self) -> None:
        """Tick thread: the write started by ``start_write`` failed."""
        if self.stats is not None:
            self.stats.failures += 1

    def stage(self, path: str, loaded: snapshotfile.Loaded) -> None:
        """Tick thread: ``loaded`` is ``path``'s verified content; the next
        ``read(path)`` installs it without reading the file again."""
        self._staged = (path, loaded)

    def write(self, path: str, data: tuple[Any, Any, Any]) -> None:
        """The synchronous form (pysyncobj's hook signature): capture and write
        now, on the calling thread."""
        try:
            self.start_write(path, data)()
        finally:
            self.release()

    def read(self, path: str) -> tuple[Any, Any, list[str]]:
        """Called by pysyncobj to restore: installs the staged snapshot for
        ``path`` or verifies and loads the file, then returns the Raft fields
        pysyncobj stored. Raises ``CorruptData`` (a ``DecodeError``) on a
        corrupt file, without touching the table."""
        staged, self._staged = self._staged, None
        loaded = staged[1] if staged is not None and staged[0] == path else None
        if loaded is None:
            loaded = snapshotfile.load(path)
        self.table.install(loaded.table)
        log.info(
            "snapshot restored: %d devices, revision %d, index %d",
            len(self.table),
            self.table.revision,
            loaded.raft.last[1],
        )
        return loaded.raft.last, loaded.raft.prev, list(loaded.raft.cluster)

    @staticmethod
    def verify(path: str) -> None:
        """Raise ``CorruptData`` unless ``path`` is an intact snapshot."""
        snapshotfile.verify(path)


def _entry_tuple(e: tuple[Any, int, int]) -> tuple[bytes, int, int]:
    command, index, term = e
    return bytes(command), int(index), int(term)


def _quarantine_corrupt_snapshot(data: Path, journal: ChecksummedJournal) -> None:
    """Before pysyncobj starts: a snapshot that fails verification is moved to
    ``snapshot.bin.corrupt-<ts>`` and the log emptied (it continues from that
    snapshot), so the node starts with an empty table and catches up from the
    leader, not voting until then."""
    path = data / SNAPSHOT_FILE
    if not path.exists():
        return
    try:
        SnapshotCodec.verify(str(path))
    except CorruptData as exc:
        moved = move_aside(path)
        journal.reset_for_catch_up()
        log.error(
            "snapshot %s is corrupt (%s): refused and moved to %s; starting with an empty "
            "table and log, the leader will send a fresh snapshot; not voting until caught up",
            path,
            exc.what,
            moved.name,
        )


_storage_lock = threading.Lock()


@contextlib.contextmanager
def _storage_classes(journal: ChecksummedJournal, serializer: Callable[..., Any]) -> Iterator[None]:
    """Make pysyncobj use ``journal`` and build its snapshot serializer from
    ``serializer`` while a SyncObj is constructed. pysyncobj has no
    parameters for either, only module-level names; the swap is scoped and
    locked so concurrent constructions in one process cannot see each
    other's."""
    original_journal, original_serializer = _pso.createJournal, _pso.Serializer

    def factory(path: str | None) -> Any:
        return journal if path is not None else original_journal(path)

    with _storage_lock:
        _pso.createJournal, _pso.Serializer = factory, serializer
        try:
            yield
        finally:
            _pso.createJournal, _pso.Serializer = original_journal, original_serializer
