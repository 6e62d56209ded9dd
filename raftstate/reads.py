"""The ReadIndex driver: linearizable reads without log writes (Raft thesis §6.4).

Theory of operation
-------------------
The sans-IO :class:`~raftstate.readindex.ReadIndexTracker` decides *when* a
read is confirmed; this driver feeds it from pysyncobj and carries its
messages. Everything Raft-related runs on pysyncobj's tick thread; the event
loop only enqueues reads and receives answers.

1. ``read()`` (loop thread) queues ``(key, deadline)`` in a thread-safe inbox
   and wakes the tick thread through a pipe on pysyncobj's poller.
2. On the tick thread, a **leader** starts the read in the tracker with
   ``read_index = commit_index`` (the last log index when followers commit
   on their own, see ``RaftNode.read_floor``). A **follower** sends ``rs_ri_req`` to the
   leader, which runs it as an ordinary read and answers ``rs_ri_grant``
   (with the read index) or ``rs_ri_fail``. A node that knows no leader
   fails the read at once; the caller retries until its deadline.
3. The tracker asks for quorum rounds; the driver sends ``rs_ri_probe`` with
   ``(term, round)`` to peers. A follower acks (``rs_ri_ack``) only if its
   current term equals the probe's and it follows the sender.
4. Own-term commit: when this node becomes leader it proposes an empty
   ``HeartbeatBatch`` (a barrier). Once that entry is applied in the same
   term, the tracker is told ``on_leader_ready``; reads wait until then.
5. A granted read waits on the tick thread until ``last_applied >=
   read_index`` and is then answered to the loop, which reads the local
   ``DeviceTable``.
6. Before any event is fed to the tracker, the driver compares pysyncobj's
   role and term with what it last reported (``_sync``), so a step-down or a
   new term always reaches the tracker before a later ack. Check-quorum is
   pysyncobj's ``leaderFallbackTimeout`` (``leader_step_down_ms``).

Messages travel inside pysyncobj's transport (see ``RaftNode``), which on the
TCP transport is authenticated with the cluster secret.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Hashable
from typing import Any

from pysyncobj.pipe_notifier import PipeNotifier

from raftstate.raftnode import SUCCESS, RaftNode
from raftstate.readindex import Output, ReadIndexTracker, should_ack
from raftstate.statemachine import encode_batch

log = logging.getLogger("raftstate.reads")

PROBE = "rs_ri_probe"
ACK = "rs_ri_ack"
REQUEST = "rs_ri_req"
GRANT = "rs_ri_grant"
FAIL = "rs_ri_fail"
MESSAGE_TYPES = frozenset({PROBE, ACK, REQUEST, GRANT, FAIL})


class ReadFailed(Exception):
    """The read could not be confirmed (no leader, leadership lost, expired)."""


class ReadIndexDriver:
    """Runs ReadIndex for one node. Create after the ``RaftNode`` and the
    event loop exist; :meth:`read` is the only method for the loop thread."""

    def __init__(self, raft: RaftNode, loop: asyncio.AbstractEventLoop, resend_after: float):
        self._raft = raft
        self._loop = loop
        self._self_id = raft.selfNode.id
        self._nodes = {n.id: n for n in raft.otherNodes}
        self._tracker: ReadIndexTracker[Hashable] = ReadIndexTracker(
            self._self_id, self._nodes, resend_after=resend_after
        )
        # loop -> tick
        self._inbox: collections.deque[tuple[int, float]] = collections.deque()
        self._lock = threading.Lock()
        self._futures: dict[int, asyncio.Future[None]] = {}  # loop thread only
        self._keys = itertools.count(1)
        # tick-thread state
        self._leader_term: int | None = None
        # key -> (deadline, leader asked, when asked): follower reads in flight
        self._remote: dict[int, tuple[float, str, float]] = {}
        self._resend_after = resend_after
        self._apply_waits: list[tuple[int, int]] = []  # (read_index, key)
        self._answers: list[tuple[int, bool]] = []
        self.reads_served = 0
        self.reads_failed = 0
        # Created on the tick thread: pysyncobj's poller is not safe to
        # subscribe to from another thread while it polls.
        self._notifier: PipeNotifier | None = None
        raft.set_message_handler(self._on_message)
        raft.addOnTickCallback(self._on_tick)

    # ---- loop thread ------------------------------------------------------

    def read(self, deadline: float) -> asyncio.Future[None]:
        """Start one linearizable read; the future resolves once the local
        table may serve it, or fails with :class:`ReadFailed`. ``deadline`` is
        ``time.monotonic()`` seconds. Loop thread only."""
        key = next(self._keys)
        fut = self._loop.create_future()
        self._futures[key] = fut
        with self._lock:
            wake = not self._inbox
            self._inbox.append((key, deadline))
        notifier = self._notifier
        if wake and notifier is not None:  # one wake-up drains every queued read
            notifier.notify()
        return fut

    def _resolve(self, answers: list[tuple[int, bool]]) -> None:
        for key, ok in answers:
            fut = self._futures.pop(key, None)
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(None)
            else:
                fut.set_exception(ReadFailed("read could not be confirmed by a quorum"))

    def close(self) -> None:
        self._raft.removeOnTickCallback(self._on_tick)
        self._raft.set_message_handler(None)

    # ---- tick thread ------------------------------------------------------

    def _answer(self, key: int, ok: bool) -> None:
        """Queue an answer; :meth:`_flush` hands all queued answers to the
        loop in one ``call_soon_threadsafe`` (one loop wake-up per batch)."""
        if ok:
            self.reads_served += 1
        else:
            self.reads_failed += 1
        self._answers.append((key, ok))

    def _flush(self) -> None:
        if not self._answers:
            return
        answers, self._answers = self._answers, []
        try:
            self._loop.call_soon_threadsafe(self._resolve, answers)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _sync(self) -> None:
        """Report role/term changes to the tracker before anything else."""
        raft = self._raft
        if raft.is_leader():
            term = raft.raftCurrentTerm
            if self._leader_term != term:
                self._leader_term = term
                self._handle(self._tracker.on_become_leader(term))
                self._propose_barrier(term)
        elif self._leader_term is not None:
            self._leader_term = None
            self._handle(self._tracker.on_step_down())

    def _propose_barrier(self, term: int) -> None:

        def done(_res: Any, err: int) -> None:  # tick thread
            self._sync()
            if self._leader_term != term:
                return
            if err == SUCCESS:
                out = self._tracker.on_leader_ready(
                    term, commit_index=self._raft.raftCommitIndex, now=time.monotonic()
                )
                self._handle(out)
                self._flush()
            else:
                self._propose_barrier(term)

        self._raft.propose(encode_batch([], time.time_ns() // 1_000_000), done)

    def _drain_inbox(self) -> None:
        try:
            self._drain_inbox_once()
        finally:
            self._flush()

    def _drain_inbox_once(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        if not items:
            return
        self._sync()
        now = time.monotonic()
        raft = self._raft
        leader = raft._getLeader()
        for key, deadline in items:
            if self._leader_term is not None:
                out = self._tracker.start_read(
                    ("L", key),
                    commit_index=raft.read_floor(),
                    term=self._leader_term,
                    now=now,
                    deadline=deadline,
                )
                self._handle(out)
            elif leader is not None and leader.id in self._nodes:
                self._remote[key] = (deadline, leader.id, now)
                raft.send_raw(
                    leader, {"type": REQUEST, "id": key, "timeout": max(0.0, deadline - now)}
                )
            else:
                self._answer(key, False)

    def _on_tick(self) -> None:
        if self._notifier is None:
            self._notifier = PipeNotifier(self._raft._poller, self._drain_inbox)
        self._drain_inbox_once()
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
        self._flush()

    def _release_applied(self) -> None:
        if not self._apply_waits:
            return
        applied = self._raft.raftLastApplied
        keep = []
        for read_index, key in self._apply_waits:
            if applied >= read_index:
                self._answer(key, True)
            else:
                keep.append((read_index, key))
        self._apply_waits = keep

    def _handle(self, out: Output[Hashable]) -> None:
        raft = self._raft
        for probe in out.probes:
            msg = {"type": PROBE, "term": probe.term, "round": probe.round}
            for peer in probe.peers:
                raft.send_raw(self._nodes[peer], msg)
        for grant in out.grants:
            rid = grant.read_id
            if isinstance(rid, tuple) and rid[0] == "L":
                self._apply_waits.append((grant.read_index, rid[1]))
            elif isinstance(rid, tuple) and rid[0] == "F":
                node = self._nodes.get(rid[1])
                if node is not None:
                    raft.send_raw(
                        node, {"type": GRANT, "id": rid[2], "read_index": grant.read_index}
                    )
        for rid in out.failed:
            if isinstance(rid, tuple) and rid[0] == "L":
                self._answer(rid[1], False)
            elif isinstance(rid, tuple) and rid[0] == "F":
                node = self._nodes.get(rid[1])
                if node is not None:
                    raft.send_raw(node, {"type": FAIL, "id": rid[2]})
        self._release_applied()

    def _on_message(self, node: Any, msg: dict[str, Any]) -> None:
        """A ReadIndex message from a peer (tick thread). Malformed messages
        from an authenticated peer are logged and dropped."""
        try:
            self._on_message_once(node, msg)
        finally:
            self._flush()

    def _on_message_once(self, node: Any, msg: dict[str, Any]) -> None:
        try:
            kind = msg["type"]
            sender = node.id
            if sender not in self._nodes:
                return
            self._sync()
            now = time.monotonic()
            raft = self._raft
            if kind == PROBE:
                leader = raft._getLeader()
                leader_id = leader.id if leader is not None else None
                if should_ack(int(msg["term"]), raft.raftCurrentTerm, leader_id, sender):
                    raft.send_raw(node, {"type": ACK, "term": msg["term"], "round": msg["round"]})
            elif kind == ACK:
                self._handle(self._tracker.on_ack(sender, int(msg["term"]), int(msg["round"]), now))
            elif kind == REQUEST:
                rid = ("F", sender, int(msg["id"]))
                timeout = min(float(msg["timeout"]), 60.0)
                if self._leader_term is None or self._tracker.cancel(rid):
                    # Not leader, or a restarted follower reused an id that is
                    # still waiting here: fail both; the follower retries.
                    raft.send_raw(node, {"type": FAIL, "id": rid[2]})
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
