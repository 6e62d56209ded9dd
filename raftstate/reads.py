"""The ReadIndex driver: linearizable reads without log writes (Raft thesis §6.4).

Theory of operation
-------------------
The sans-IO :class:`~raftstate.readindex.ReadIndexTracker` decides *when* a
read is confirmed; this driver feeds it from pysyncobj and carries its
messages. It runs on the node's **event loop**, not on pysyncobj's tick
thread: a read, its quorum round and its answer never cross a thread unless
the read must wait for the log to be applied. (On the UDP transport the
socket lives on this loop, so probes and acks go out and come in here; on
TCP, whose sockets belong to the tick thread, a small bridge carries them.)

1. ``read()`` queues the read; all reads of one loop turn start together
   (one ``call_soon``), so they share a round.
2. A **leader** starts each read in the tracker with ``read_index`` = its
   ``RaftNode.read_floor()`` (the commit index, or the last log index when
   followers commit on their own). A **follower** sends ``rs_ri_req`` to the
   leader, which runs it as an ordinary read and answers ``rs_ri_grant``
   (with the read index) or ``rs_ri_fail``. A node that knows no leader
   fails the read at once; the caller retries until its deadline.
3. The tracker asks for quorum rounds; the driver sends ``rs_ri_probe`` with
   ``(term, round)`` to peers. A follower acks (``rs_ri_ack``) only if its
   current term equals the probe's and it follows the sender.
4. Own-term commit: when this node becomes leader it proposes an empty
   ``HeartbeatBatch`` (a barrier). Once that entry is applied in the same
   term, the tracker is told ``on_leader_ready`` (with the commit index the
   tick thread saw then); reads wait until then.
5. A granted read is answered once ``last_applied >= read_index``: at once
   if it already is, else when the tick thread, after applying, sees the
   lowest index a read waits for reached and hands the loop one wake-up.
6. Before any event is fed to the tracker, the driver compares pysyncobj's
   role and term with what it last reported (``_sync``), so a step-down or a
   new term reaches the tracker before a later ack; while reads wait, a
   timer every ``resend_after`` does the same, resends probes and expires
   reads. Check-quorum is pysyncobj's ``leaderFallbackTimeout``.

Raft state read from the loop thread
------------------------------------
The loop reads pysyncobj's term, leader, role, commit index, last log index
and last applied index while the tick thread may change them (each read is
one attribute, atomic under the GIL). Safety does not depend on the leader's
view being current: a read is granted only after a majority acked a
``(term, round)`` probe sent after the read arrived, and a follower acks only
if its term, read before *and* after its leader, equals the probe's and its
leader is the sender. A leader of a newer term can commit only after a
majority moved to that term (terms never decrease), so if a write committed
in a newer term before the read arrived, no majority could have acked the
older term afterwards. Writes of our own term are covered by ``read_index``,
read after the read arrived from values the tick thread updates before it
acknowledges any write. A stale "I am leader" only starts rounds that no
majority will ack.

Messages travel inside pysyncobj's transport (see ``RaftNode``), which is
authenticated with the cluster secret.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from pysyncobj.pipe_notifier import PipeNotifier

from raftstate.raftnode import SUCCESS, RaftNode
from raftstate.readindex import Output, ReadIndexTracker, should_ack
from raftstate.statemachine import encode_batch
from raftstate.transport import wirecodec

log = logging.getLogger("raftstate.reads")

PROBE = "rs_ri_probe"
ACK = "rs_ri_ack"
REQUEST = "rs_ri_req"
GRANT = "rs_ri_grant"
FAIL = "rs_ri_fail"
MESSAGE_TYPES = frozenset({PROBE, ACK, REQUEST, GRANT, FAIL})
#: The wire kinds of :data:`MESSAGE_TYPES` (handled on the loop by the UDP transport).
WIRE_KINDS = frozenset(s.kind for s in wirecodec.SCHEMAS if s.type in MESSAGE_TYPES)

Handler = Callable[[Any, dict[str, Any]], None]


class ReadFailed(Exception):
    """The read could not be confirmed (no leader, leadership lost, expired)."""


class _TickBridge:
    """Carries ReadIndex messages between the loop and the tick thread when
    the transport's sockets belong to the tick thread (TCP): sends are queued
    and sent on the tick thread (woken through pysyncobj's poller), received
    messages are handed to the loop."""

    def __init__(self, raft: RaftNode, loop: asyncio.AbstractEventLoop, handler: Handler) -> None:
        self._raft = raft
        self._loop = loop
        self._handler = handler
        self._lock = threading.Lock()
        self._out: collections.deque[tuple[Any, dict[str, Any]]] = collections.deque()
        # Created on the tick thread: pysyncobj's poller is not safe to
        # subscribe to from another thread while it polls.
        self._notifier: PipeNotifier | None = None
        raft.set_message_handler(self._received)

    def send(self, node: Any, message: dict[str, Any]) -> None:
        """Loop thread: queue ``message`` for the tick thread to send."""
        with self._lock:
            wake = not self._out
            self._out.append((node, message))
        notifier = self._notifier
        if wake and notifier is not None:
            notifier.notify()

    def on_tick(self) -> None:
        """Tick thread."""
        if self._notifier is None:
            self._notifier = PipeNotifier(self._raft._poller, self._drain)
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            items = list(self._out)
            self._out.clear()
        for node, message in items:
            self._raft.send_raw(node, message)

    def _received(self, node: Any, message: dict[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._handler, node, message)
        except RuntimeError:  # loop closed during shutdown
            pass

    def close(self) -> None:
        self._raft.set_message_handler(None)


class ReadIndexDriver:
    """Runs ReadIndex for one node. Create on the event loop's thread after
    the ``RaftNode`` exists; every method but the tick callback is for that
    loop's thread."""

    def __init__(self, raft: RaftNode, loop: asyncio.AbstractEventLoop, resend_after: float):
        self._raft = raft
        self._loop = loop
        self._self_id = raft.selfNode.id
        self._nodes = {n.id: n for n in raft.otherNodes}
        self._tracker: ReadIndexTracker[Hashable] = ReadIndexTracker(
            self._self_id, self._nodes, resend_after=resend_after
        )
        self._resend_after = resend_after
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._keys = itertools.count(1)
        self._pending: list[tuple[int, float]] = []  # reads of this loop turn
        self._leader_term: int | None = None
        # key -> (deadline, leader asked, when asked): follower reads in flight
        self._remote: dict[int, tuple[float, str, float]] = {}
        self._apply_waits: list[tuple[int, int]] = []  # (read_index, key)
        #: The lowest index a granted read waits for, 0 if none; the tick
        #: thread reads it after applying (see :meth:`_on_tick`).
        self._apply_need = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sync_scheduled = False  # tick thread -> loop, see _on_tick
        self.reads_served = 0
        self.reads_failed = 0
        self._bridge = _TickBridge(raft, loop, self._on_message)
        transport = raft.loop_transport()
        self._direct = transport if transport is not None and transport.loop is loop else None
        if self._direct is not None:
            self._direct.set_loop_receiver(WIRE_KINDS, self._on_message)
        raft.addOnTickCallback(self._on_tick)

    # ---- public (loop thread) ------------------------------------------------

    def read(self, deadline: float) -> asyncio.Future[None]:
        """Start one linearizable read; the future resolves once the local
        table may serve it, or fails with :class:`ReadFailed`. ``deadline`` is
        ``time.monotonic()`` seconds. Loop thread only."""
        key = next(self._keys)
        fut = self._loop.create_future()
        self._futures[key] = fut
        if not self._pending:
            self._loop.call_soon(self._start_pending)
        self._pending.append((key, deadline))
        return fut

    def close(self) -> None:
        self._raft.removeOnTickCallback(self._on_tick)
        self._bridge.close()
        if self._direct is not None:
            self._direct.set_loop_receiver(WIRE_KINDS, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- loop thread -----------------------------------------------------------

    def _send(self, node: Any, message: dict[str, Any]) -> None:
        if self._direct is not None:
            self._direct.send_from_loop(node, message)  # dropped: the sender resends
        else:
            self._bridge.send(node, message)

    def _answer(self, key: int, ok: bool) -> None:
        if ok:
            self.reads_served += 1
        else:
            self.reads_failed += 1
        fut = self._futures.pop(key, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(None)
        else:
            fut.set_exception(ReadFailed("read could not be confirmed by a quorum"))

    def _sync(self) -> None:
        """Report role/term changes to the tracker before anything else."""
        raft = self._raft
        term = raft.raftCurrentTerm
        if raft.is_leader() and raft.raftCurrentTerm == term:
            if self._leader_term != term:
                self._leader_term = term
                self._handle(self._tracker.on_become_leader(term))
                self._propose_barrier(term)
        elif self._leader_term is not None:
            self._leader_term = None
            self._handle(self._tracker.on_step_down())

    def _propose_barrier(self, term: int) -> None:
        loop = self._loop

        def done(_res: Any, err: int) -> None:  # tick thread
            commit_index = int(self._raft.raftCommitIndex)
            try:
                loop.call_soon_threadsafe(self._barrier_done, term, err, commit_index)
            except RuntimeError:  # loop closed during shutdown
                pass

        self._raft.propose(encode_batch([], time.time_ns() // 1_000_000), done)

    def _barrier_done(self, term: int, err: int, commit_index: int) -> None:
        self._sync()
        if self._leader_term != term:
            return
        if err == SUCCESS:
            out = self._tracker.on_leader_ready(
                term, commit_index=commit_index, now=time.monotonic()
            )
            self._handle(out)
        else:
            self._propose_barrier(term)

    def _scheduled_sync(self) -> None:
        self._sync_scheduled = False
        self._sync()

    def _start_pending(self) -> None:
        items, self._pending = self._pending, []
        self._sync()
        now = time.monotonic()
        raft = self._raft
        if self._leader_term is not None:
            floor = raft.read_floor()
            for key, deadline in items:
                self._handle(
                    self._tracker.start_read(
                        ("L", key),
                        commit_index=floor,
                        term=self._leader_term,
                        now=now,
                        deadline=deadline,
                    )
                )
            return
        leader = raft._getLeader()
        for key, deadline in items:
            if leader is not None and leader.id in self._nodes:
                self._remote[key] = (deadline, leader.id, now)
                self._send(
                    leader, {"type": REQUEST, "id": key, "timeout": max(0.0, deadline - now)}
                )
                self._arm_timer()
            else:
                self._answer(key, False)

    def _arm_timer(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._resend_after, self._on_timer)

    def _on_timer(self) -> None:
        """While reads wait: notice step-downs, resend probes, expire reads."""
        self._timer = None
        self._sync()
        now = time.monotonic()
        self._handle(self._tracker.on_tick(now))
        # A follower read fails early (and the caller retries with a fresh
        # request) when its deadline passed, the leader changed, or the leader
        # has not answered for a while (a lost message on a lossy transport).
        leader = self._raft._getLeader()
        leader_id = leader.id if leader is not None else None
        patience = max(1.0, 8 * self._resend_after)
        for key, (deadline, asked, sent) in list(self._remote.items()):
            if deadline <= now or asked != leader_id or now - sent > patience:
                del self._remote[key]
                self._answer(key, False)
        self._release_applied()
        if self._tracker.waiting or self._remote or self._apply_waits:
            self._arm_timer()

    def _release_applied(self) -> None:
        if not self._apply_waits:
            self._apply_need = 0
            return
        applied = self._raft.raftLastApplied
        keep = []
        for read_index, key in self._apply_waits:
            if applied >= read_index:
                self._answer(key, True)
            else:
                keep.append((read_index, key))
        self._apply_waits = keep
        self._apply_need = min(ri for ri, _ in keep) if keep else 0
        if keep:
            self._arm_timer()  # a backstop if the tick thread's wake-up is missed

    def _handle(self, out: Output[Hashable]) -> None:
        nodes = self._nodes
        for probe in out.probes:
            msg = {"type": PROBE, "term": probe.term, "round": probe.round}
            for peer in probe.peers:
                self._send(nodes[peer], msg)
        granted = False
        for grant in out.grants:
            rid = grant.read_id
            if isinstance(rid, tuple) and rid[0] == "L":
                self._apply_waits.append((grant.read_index, rid[1]))
                granted = True
            elif isinstance(rid, tuple) and rid[0] == "F":
                node = nodes.get(rid[1])
                if node is not None:
                    self._send(node, {"type": GRANT, "id": rid[2], "read_index": grant.read_index})
        for rid in out.failed:
            if isinstance(rid, tuple) and rid[0] == "L":
                self._answer(rid[1], False)
            elif isinstance(rid, tuple) and rid[0] == "F":
                node = nodes.get(rid[1])
                if node is not None:
                    self._send(node, {"type": FAIL, "id": rid[2]})
        if granted:
            self._release_applied()
        if self._tracker.waiting:
            self._arm_timer()

    def _on_message(self, node: Any, msg: dict[str, Any]) -> None:
        """A ReadIndex message from a peer (loop thread). Malformed messages
        from an authenticated peer are logged and dropped."""
        try:
            kind = msg["type"]
            sender = node.id
            if sender not in self._nodes:
                return
            raft = self._raft
            if kind == PROBE:
                # Term read before and after the leader: ack only if the term
                # held still across the read of who we follow.
                term = raft.raftCurrentTerm
                leader = raft._getLeader()
                leader_id = leader.id if leader is not None else None
                if raft.raftCurrentTerm == term and should_ack(
                    int(msg["term"]), term, leader_id, sender
                ):
                    self._send(node, {"type": ACK, "term": msg["term"], "round": msg["round"]})
                return
            self._sync()
            now = time.monotonic()
            if kind == ACK:
                self._handle(self._tracker.on_ack(sender, int(msg["term"]), int(msg["round"]), now))
            elif kind == REQUEST:
                rid = ("F", sender, int(msg["id"]))
                timeout = min(float(msg["timeout"]), 60.0)
                if self._leader_term is None or self._tracker.cancel(rid):
                    # Not leader, or a restarted follower reused an id that is
                    # still waiting here: fail both; the follower retries.
                    self._send(node, {"type": FAIL, "id": rid[2]})
                else:
                    self._handle(
                        self._tracker.start_read(
                            rid,
                            commit_index=raft.read_floor(),
                            term=self._leader_term,
                            now=now,
                            deadline=now + timeout,
                        )
                    )
            elif kind == GRANT:
                key = int(msg["id"])
                if self._remote.pop(key, None) is not None:
                    self._apply_waits.append((int(msg["read_index"]), key))
                    self._release_applied()
            elif kind == FAIL:
                key = int(msg["id"])
                if self._remote.pop(key, None) is not None:
                    self._answer(key, False)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("dropping malformed ReadIndex message from %s: %s", node, exc)

    # ---- tick thread -----------------------------------------------------------

    def _on_tick(self) -> None:
        """Tick thread, after pysyncobj applied what committed: wake the loop
        once when a read waiting for the log to be applied can be answered."""
        self._bridge.on_tick()
        raft = self._raft
        if raft.is_leader() != (self._leader_term is not None) and not self._sync_scheduled:
            # Became leader (propose the barrier now, not at the first read)
            # or stepped down (fail waiting reads now, not at the next timer).
            self._sync_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._scheduled_sync)
            except RuntimeError:  # loop closed during shutdown
                pass
        need = self._apply_need
        if need and raft.raftLastApplied >= need:
            self._apply_need = 0
            try:
                self._loop.call_soon_threadsafe(self._release_applied)
            except RuntimeError:  # loop closed during shutdown
                pass
