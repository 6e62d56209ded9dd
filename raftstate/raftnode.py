"""pysyncobj wiring: the Raft engine underneath the device table.

We extend pysyncobj without modifying it:

* one ``@replicated`` method, :meth:`RaftNode.apply_batch`, whose only
  argument is a protobuf ``HeartbeatBatch`` (bytes);
* snapshots through pysyncobj's custom serializer hooks, written as a
  protobuf ``Snapshot`` (never a pickle of our objects);
* pysyncobj's timers mapped from :class:`~raftstate.config.NodeConfig`,
  including ``leaderFallbackTimeout`` as check-quorum;
* for ``durability = "fsync"``, a journal subclass that msyncs every append
  and fsyncs term/vote before pysyncobj can answer a peer.

Threading: pysyncobj's tick thread owns all Raft state and calls
``apply_batch`` and the serializer hooks. Other threads may call
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
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.journal import FileJournal
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from raftstate import appendguard, fastcommit
from raftstate.config import NodeConfig
from raftstate.errors import ConfigError, DecodeError
from raftstate.model import HeartbeatResult
from raftstate.nextindex import ResetGuard, SendLedger
from raftstate.prevote import MESSAGE_TYPES as PREVOTE_MESSAGES
from raftstate.prevote import PREVOTE
from raftstate.prevotegate import PreVoteGate
from raftstate.statemachine import DeviceTable
from raftstate.transport.udp import UdpTransport
from raftstate.transport.udpconfig import IceSettings, PeerLinkStats, settings_for
from raftstate.v1 import storage_pb2

log = logging.getLogger("raftstate.raft")

JOURNAL_FILE = "raft.journal"
SNAPSHOT_FILE = "snapshot.bin"

ProposeCallback = Callable[[list[HeartbeatResult] | None, int], None]


class Role(enum.IntEnum):
    """Values match ``raftstate.v1.Role``."""

    FOLLOWER = 1
    CANDIDATE = 2
    LEADER = 3


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


def syncobj_conf(cfg: NodeConfig, table: DeviceTable) -> SyncObjConf:
    """Translate our config into pysyncobj's. See docs/architecture.md for
    why each value is what it is."""
    data = Path(cfg.data_dir)
    codec = SnapshotCodec(table, fsync=cfg.durability == "fsync")
    return SyncObjConf(
        password=cfg.cluster_secret or None,
        autoTick=True,
        autoTickPeriod=cfg.tick_ms / 1000,
        # Propose and replicate at once instead of on the appendEntriesPeriod
        # timer: group commit in our batcher already amortises the per-entry
        # cost, and the timer would add up to heartbeat_ms to every commit.
        appendEntriesUseBatch=False,
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

    def send(self, node: Any, message: Any) -> Any:
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
            if kind == "next_node_idx":
                on_reply = getattr(self._syncObj, "_on_next_index", None)
                if on_reply is not None:
                    on_reply(node, message, super()._onMessageReceived)  # type: ignore[misc]
                    return
            elif kind == "append_entries":
                keep = getattr(self._syncObj, "_filter_append_entries", None)
                if keep is not None:
                    message = keep(message)
        super()._onMessageReceived(node, message)  # type: ignore[misc]


#: Election messages that must survive pysyncobj closing an idle TCP link.
_HELD_ON_IDLE = frozenset({"request_vote", PREVOTE})


class RaftstateTCPTransport(OwnMessagesMixin, TCPTransport):  # type: ignore[misc]
    """pysyncobj's TCP transport with the ``rs_*`` side door.

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
            if conn is not None and _idle_out(conn):
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
        )
        return functools.partial(RaftstateUdpTransport, settings=settings, loop=loop)
    return RaftstateTCPTransport


def _ice_settings(cfg: NodeConfig) -> IceSettings | None:
    if cfg.reach != "ice":
        return None
    return IceSettings(
        rendezvous=cfg.rendezvous,
        stun_server=cfg.stun_server,
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
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        self.table = table
        self.cfg = cfg
        #: rs_* messages go to :meth:`_dispatch_own`: PreVote's to the gate,
        #: the rest to the handler of :meth:`set_message_handler`.
        self._own_message_handler: MessageHandler | None = self._dispatch_own
        self._reads_handler: MessageHandler | None = None
        self._prevote_gate: PreVoteGate | None = None
        self._reset_guard = ResetGuard()
        #: Followers raise their own commit index (raftstate/fastcommit.py).
        self._follower_commit = cfg.follower_commit and fastcommit.enabled(len(cfg.members))
        #: Entries sent / resent per peer raft address this term (leader).
        self.send_ledger = SendLedger()
        self._own_transport: Any = None
        self._by_raft = {m.raft: m for m in cfg.members}
        me = cfg.self_member
        others = [m.raft for m in cfg.members if m.id != me.id]
        conf = syncobj_conf(cfg, table)
        journal_cls = DurableFileJournal if cfg.durability == "fsync" else None
        with _journal_class(journal_cls):
            super().__init__(me.raft, others, conf, transportClass=transport_factory(cfg, loop))
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

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 - pysyncobj's names
        """Tick thread: PreVote decides whether an expired election deadline
        may start an election before pysyncobj looks at it (raftstate/prevotegate.py)."""
        gate = self._prevote_gate
        with gate.tick() if gate is not None else contextlib.nullcontext():
            super()._onTick(timeToWait)

    @replicated  # type: ignore[untyped-decorator]
    def apply_batch(self, entry: bytes) -> list[HeartbeatResult]:
        """Apply one committed HeartbeatBatch. Runs on the tick thread only."""
        return self.table.apply(entry)

    def propose(self, entry: bytes, callback: ProposeCallback) -> None:
        """Queue ``entry`` for replication. ``callback(results, fail_reason)``
        runs later on the tick thread. Safe to call from any thread."""
        self.apply_batch(entry, callback=callback)

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
        )

    def _filter_append_entries(self, message: dict[str, Any]) -> dict[str, Any]:
        """Tick thread: never let pysyncobj's follower delete entries that
        match the leader's (see raftstate/appendguard.py)."""
        gate = self._prevote_gate
        if gate is not None:
            gate.on_append_entries(int(message.get("term", -1)))
        if "prevLogIdx" not in message or message.get("term", -1) < self.raftCurrentTerm:
            return message
        ours = self._SyncObj__getEntries(message["prevLogIdx"])
        message = appendguard.trim(message, ours)
        if self._follower_commit:
            message = fastcommit.raise_commit(message)
        return message

    def _last_log_index(self) -> int:
        """Index of the last log entry. Any thread: a read of the journal's
        last element, which the tick thread only ever appends after or
        replaces whole."""
        try:
            return int(self._SyncObj__getCurrentLogIndex())
        except (IndexError, TypeError):
            return 0

    def read_floor(self) -> int:
        """Tick thread, on the leader: the lowest index a linearizable read
        must wait for. The commit index, unless followers commit on their own
        (three voters, see raftstate/fastcommit.py): then the last log index,
        since a follower may have acknowledged entries the leader has not yet
        counted."""
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
        index = self._reset_guard.on_reset(
            peer, int(self.raftCurrentTerm), match, hint, time.monotonic()
        )
        if index is None:
            return {**message, "reset": False}
        return {**message, "next_node_idx": index}

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

    def peer_link_stats(self) -> dict[str, PeerLinkStats]:
        """Per-peer path stats (srtt, retransmissions, loss) keyed by member
        id; empty for the TCP transport. Safe from any thread."""
        transport = self._own_transport
        return transport.peer_stats() if isinstance(transport, UdpTransport) else {}

    def transport_drops(self) -> dict[str, int]:
        """Datagrams the UDP transport dropped, by reason; empty for TCP.
        Safe from any thread."""
        transport = self._own_transport
        return transport.drop_counts() if isinstance(transport, UdpTransport) else {}

    def leader_raft_address(self) -> str | None:
        """The last known leader's Raft address, or ``None``. Thread-safe."""
        leader = self._getLeader()
        return leader.id if leader is not None else None

    def is_leader(self) -> bool:
        return bool(self._isLeader())


class SnapshotCodec:
    """pysyncobj's serializer/deserializer hooks, writing protobuf."""

    def __init__(self, table: DeviceTable, *, fsync: bool) -> None:
        self.table = table
        self.fsync = fsync

    def write(self, path: str, data: tuple[Any, Any, Any]) -> None:
        """Called by pysyncobj on the tick thread with ``(last_entry,
        prev_entry, cluster)``; the table is at ``last_entry``."""
        last, prev, cluster = data
        snap = self.table.to_snapshot()
        snap.last_entry.CopyFrom(_entry(last))
        snap.prev_entry.CopyFrom(_entry(prev))
        snap.cluster.extend(sorted(str(n) for n in cluster))
        with open(path, "wb") as fh:
            fh.write(snap.SerializeToString())
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        log.info(
            "snapshot written: %d devices, revision %d, index %d",
            len(snap.devices),
            snap.revision,
            snap.last_entry.index,
        )

    def read(self, path: str) -> tuple[Any, Any, list[str]]:
        """Called by pysyncobj to restore: loads the table, returns the Raft
        fields pysyncobj stored. Raises ``DecodeError`` on a corrupt file."""
        snap = storage_pb2.Snapshot()
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            snap.ParseFromString(raw)
        except Exception as exc:
            raise DecodeError(f"{path} is not a raftstate snapshot: {exc}") from exc
        self.table.restore(snap)
        log.info(
            "snapshot restored: %d devices, revision %d, index %d",
            len(snap.devices),
            snap.revision,
            snap.last_entry.index,
        )
        last = (snap.last_entry.command, snap.last_entry.index, snap.last_entry.term)
        prev = (snap.prev_entry.command, snap.prev_entry.index, snap.prev_entry.term)
        return last, prev, list(snap.cluster)


def _entry(e: tuple[bytes, int, int]) -> storage_pb2.RaftEntry:
    command, index, term = e
    return storage_pb2.RaftEntry(command=bytes(command), index=index, term=term)


class DurableFileJournal(FileJournal):  # type: ignore[misc]
    """pysyncobj's file journal, made durable before every acknowledgement.

    pysyncobj appends to an mmap and never syncs it. Here every append or
    truncation is followed by ``msync`` (``mmap.flush``), and a term/vote
    change by an fsync of the meta file and its directory, all on the tick
    thread before pysyncobj sends the message that depends on it.
    """

    def __init__(self, journal_file: str) -> None:
        super().__init__(journal_file)
        self._meta_path = journal_file + ".meta"

    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self.flush()

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802 - pysyncobj's name
        super().deleteEntriesFrom(entry_from)
        self.flush()

    def clear(self) -> None:
        super().clear()
        self.flush()

    def setCurrentTerm(self, term: int, voted_for: Any) -> None:  # noqa: N802
        super().setCurrentTerm(term, voted_for)
        _fsync_path(self._meta_path)
        _fsync_path(os.path.dirname(os.path.abspath(self._meta_path)))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_journal_lock = threading.Lock()


@contextlib.contextmanager
def _journal_class(cls: type[FileJournal] | None) -> Iterator[None]:
    """Make pysyncobj build its journal from ``cls`` while a SyncObj is
    constructed. pysyncobj has no journal parameter, only a module-level
    factory; the swap is scoped and locked so concurrent constructions in one
    process cannot see each other's choice."""
    if cls is None:
        yield
        return
    original = _pso.createJournal

    def factory(path: str | None) -> Any:
        return cls(path) if path is not None else original(path)

    with _journal_lock:
        _pso.createJournal = factory
        try:
            yield
        finally:
            _pso.createJournal = original
