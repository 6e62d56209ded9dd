"""pysyncobj over authenticated UDP: static peer addresses or ICE paths.

Theory of operation
-------------------
pysyncobj's tick thread owns Raft; an asyncio loop owns the sockets (through
a :class:`~raftstate.transport.reach.Reach`: static addresses or ICE), the
:class:`~raftstate.transport.envelope.SecureChannel` and one
:class:`~raftstate.transport.reliable.ReliableLink` per peer. Neither blocks
on the other (DESIGN.md, "Threads and loops"):

* tick -> loop: :meth:`UdpTransport.send` encodes the message
  (:mod:`~raftstate.transport.wirecodec`, a fixed schema, never a pickle) into a bounded
  outbox and schedules one flush with ``call_soon_threadsafe``. The flush
  queues every message on its peer's link (messages queued together share
  datagrams), then transmits what the link has due, each payload sealed for
  the peer's current session.
* loop -> tick: a datagram goes through ``SecureChannel.receive``; only an
  authentic DATA payload reaches the link, and only the messages the link
  delivers (in order, exactly once) are queued for the tick thread, which is
  woken through pysyncobj's poller (a ``PipeNotifier``) and decodes them.
  Nothing is ever unpickled; a message that does not decode (a buggy or
  hostile peer holding the secret) is counted as ``undecodable``, logged at
  most every ``DROP_LOG_INTERVAL`` and dropped.
* Sessions: HELLOs go out when a path comes up (at start for static peers)
  and are resent with backoff (50 ms doubling to 1 s) while a handshake is
  unconfirmed. Each new session gets a new link; the peer is reported
  connected to pysyncobj then (after a "disconnected" when it replaced an
  older session, i.e. the peer restarted).
* Liveness: when a link is :meth:`~ReliableLink.dead` the peer is reported
  disconnected and the reach is told: ICE rebuilds the path; the session and
  link live above the path and survive the swap, so nothing is lost or
  replayed. The channel cannot start a fresh session without a process
  restart (a handshake's offer is fixed for the life of the process), so the
  link keeps its state and keeps probing; it is reported connected again when
  ACKs make progress, or replaced when the peer restarts. A half-reset link
  is never fed.

Connection events and messages reach the tick thread through one queue, in
the order they happened, so pysyncobj never sees a message from a peer it
believes disconnected by a later event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.transport import Transport, TransportNotReadyError

from raftstate.errors import DecodeError
from raftstate.ratelog import LogThrottle, held_suffix
from raftstate.transport import wirecodec
from raftstate.transport.crypto import OVERHEAD, DropReason
from raftstate.transport.envelope import Delivered, Dropped, HandshakeEvent, SecureChannel
from raftstate.transport.reach import Reach, StaticReach
from raftstate.transport.reliable import MessageTooLarge, ReliableLink
from raftstate.transport.roaming import (
    CHALLENGE_SIZE,
    NONCE_SIZE,
    Challenge,
    PathValidator,
    RoamingConfig,
    challenge_payload,
    is_path_payload,
    response_to,
)
from raftstate.transport.udpconfig import (
    DATAGRAM_SIZE,
    DROP_LOG_INTERVAL,
    HELLO_MAX_INTERVAL,
    HELLO_MIN_INTERVAL,
    MAPPING_CHECK_MIN_S,
    MAPPING_CHECK_RTTS,
    SILENCE_MIN_S,
    SILENCE_PROBE_FOR_S,
    SILENCE_RTTS,
    SILENCE_TICK_S,
    SUSPECT_MIN_S,
    SUSPECT_RTTS,
    PeerLinkStats,
    UdpSettings,
)
from raftstate.transport.wirecodec import travels_ordered

log = logging.getLogger("raftstate.transport.udp")
#: ``handler(node, message)`` for messages handled on the loop thread.
LoopHandler = Callable[[Any, dict[str, Any]], None]
_AUTH_DROPS = (DropReason.BAD_MAC, DropReason.UNKNOWN_PEER, DropReason.STALE_HELLO)
#: A sealed path challenge's size: smaller authentic datagrams never trigger one.
_ROAMING = RoamingConfig(min_trigger_size=CHALLENGE_SIZE + OVERHEAD)


class _Peer:
    __slots__ = (
        "backlog", "backlog_bytes", "heard", "hello_handle", "hello_interval", "hinted", "id",
        "link", "link_buffered", "mapping_checked", "node", "outbox_bytes", "paused", "probe_gap",
        "probe_next", "refused", "reported_up", "roam", "roam_timer", "roamed", "sessions",
        "suspected", "timer", "timer_when",
    )  # fmt: skip

    def __init__(self, peer_id: str, node: Any) -> None:
        self.id = peer_id
        self.node = node
        self.link: ReliableLink | None = None
        #: Accepted messages the link had no room for yet (loop thread), in order.
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        #: Bytes of this peer's messages in the outbox (under ``_out_lock``).
        self.outbox_bytes = 0
        #: The link's queued-or-unacked bytes, published by the loop.
        self.link_buffered = 0
        #: Tick thread: AppendEntries to this peer are paused (backlog high).
        self.paused = False
        #: Set by the tick thread when ``send`` refused this peer and reported
        #: it down; the loop reports it up again once the backlog drained.
        self.refused = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when: float | None = None
        self.hello_handle: asyncio.TimerHandle | None = None
        self.hello_interval = HELLO_MIN_INTERVAL
        self.reported_up = False
        self.suspected = False
        self.sessions = 0
        #: Validates a new source address before the path moves there.
        self.roam = PathValidator(None, _ROAMING)
        #: The address the peer said (sealed) it moved to, while validating
        #: it: link datagrams go there too meanwhile (duplicated, not moved).
        self.hinted: Any = None
        self.roam_timer: asyncio.TimerHandle | None = None
        self.roamed = 0
        #: The reach was asked once, in this stall, whether our mapping moved.
        self.mapping_checked = False
        #: Loop time of the last authentic link datagram from the peer.
        self.heard: float | None = None
        #: Silence probes: when the next may go, and the gap after it.
        self.probe_next = 0.0
        self.probe_gap = 0.0


class UdpTransport(Transport):  # type: ignore[misc]
    """pysyncobj ``Transport`` over :class:`SecureChannel` + :class:`ReliableLink`.

    ``loop``: a running asyncio loop to own the socket (the node's uvloop).
    With ``None`` the transport runs its own loop in a daemon thread. Either
    way the constructor must not run on that loop's thread (``waitReady``
    waits for the bind on it). :meth:`send` and the callbacks belong to the
    tick thread; :meth:`peer_stats` is safe from any thread."""

    def __init__(
        self,
        syncObj: Any,  # noqa: N803 - pysyncobj's names
        selfNode: Any,  # noqa: N803
        otherNodes: Any,  # noqa: N803
        *,
        settings: UdpSettings,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._syncObj = syncObj
        self._settings = settings
        self._own_thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._own_thread = threading.Thread(
                target=loop.run_forever, name="raftstate-udp", daemon=True
            )
            self._own_thread.start()
        self._loop = loop
        by_address = {n.address: n for n in otherNodes}
        self._peers: dict[str, _Peer] = {}
        for peer_id, address in settings.peers:
            node = by_address.get(address)
            if node is not None:
                self._peers[peer_id] = _Peer(peer_id, node)
        self._reach = _make_reach(loop, settings, list(self._peers))
        self._node_peer = {p.node: p.id for p in self._peers.values()}
        self._channel = SecureChannel(
            settings.node_id, list(self._peers), settings.cluster_secret, now=time.time(),
            identity=settings.identity,
        )  # fmt: skip
        self._open_done = False
        self._closed = False
        self._drop_logged = LogThrottle(DROP_LOG_INTERVAL)  # bounded: keys come off the wire
        #: Peers whose links received this loop turn and still need a poll.
        self._dirty: dict[str, _Peer] = {}
        # tick -> loop
        self._out_lock = threading.Lock()
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._flush_pending = False
        self._refused = 0
        self._refuse_logged = float("-inf")
        self._max_message = settings.link.max_message_bytes
        # loop -> tick: ("msg", peer, bytes) | ("up", peer, b"") | ("down", peer, b"")
        self._inbox: deque[tuple[str, str, bytes]] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._notifier: PipeNotifier | None = None
        self._connected: set[str] = set()  # tick thread's view
        self._undecodable = 0  # authenticated messages that failed to decode
        self._undecodable_logged = -DROP_LOG_INTERVAL
        # Loop-side messages (set_loop_receiver): wire kinds and their handler.
        self._loop_kinds: frozenset[int] = frozenset()
        self._loop_handler: LoopHandler | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._ready = False
        self._bound = asyncio.run_coroutine_threadsafe(self._open(), loop)
        syncObj.addOnTickCallback(self._on_tick)

    # ------------------------------------------------------- pysyncobj contract

    @property
    def ready(self) -> bool:
        # pysyncobj asks every tick (three times); a bound socket stays bound,
        # so after the first yes the three locked future checks are skipped.
        if self._ready:
            return True
        bound = self._bound
        self._ready = bound.done() and not bound.cancelled() and not bound.exception()
        return self._ready

    def tryGetReady(self) -> None:  # noqa: N802
        """Raises ``TransportNotReadyError`` once binding has failed for good."""
        if self._bound.done() and not self.ready:
            raise TransportNotReadyError

    def waitReady(self) -> None:  # noqa: N802
        """Wait for the socket to bind. Not on the loop's thread."""
        try:
            self._bound.result()
        except Exception as exc:
            raise TransportNotReadyError from exc

    def addNode(self, node: Any) -> None:  # noqa: N802
        pass  # static membership: peers come from the settings

    def dropNode(self, node: Any) -> None:  # noqa: N802
        pass

    def send(self, node: Any, message: Any) -> bool:
        """Queue ``message`` for ``node``. Tick thread. ``False`` when the peer
        is not connected or the outbox is full (pysyncobj resends)."""
        peer_id = self._node_peer.get(node)
        if peer_id is None or peer_id not in self._connected or self._closed:
            return False
        data = wirecodec.encode(message)  # EncodeError: a bug in the sender
        peer = self._peers[peer_id]
        with self._out_lock:
            held = peer.outbox_bytes + peer.backlog_bytes + peer.link_buffered
            if held + len(data) > self._settings.max_peer_bytes or len(data) > self._max_message:
                self._refuse(peer, held, len(data))
                return False
            self._outbox.append((peer_id, data))
            peer.outbox_bytes += len(data)
            if self._flush_pending:
                return True
            self._flush_pending = True
        try:
            self._loop.call_soon_threadsafe(self._flush_outbox)
        except RuntimeError:  # loop closed: shutting down
            return False
        return True

    def paused_nodes(self) -> set[Any]:
        """Tick thread: the pysyncobj nodes whose unacknowledged backlog is
        above ``pause_bytes`` (until it falls below ``resume_bytes``). The
        leader sends them no AppendEntries meanwhile (RaftNode), so a catch-up
        or a snapshot transfer to a slow peer cannot outrun its link; nothing
        already accepted is dropped."""
        out: set[Any] = set()
        cfg = self._settings
        for peer in self._peers.values():
            held = peer.outbox_bytes + peer.backlog_bytes + peer.link_buffered
            if peer.paused:
                peer.paused = held > cfg.resume_bytes
            else:
                peer.paused = held > cfg.pause_bytes
            if peer.paused:
                out.add(peer.node)
        return out

    def _refuse(self, peer: _Peer, held: int, size: int) -> None:
        """Tick thread, under ``_out_lock``: ``send`` cannot take a message for
        ``peer``. Report the peer disconnected at once (pysyncobj stops
        sending to it and, as leader, resends from nextIndex once it is back),
        so a refused message is never mistaken for a delivered one; the loop
        reports it up again when its backlog has drained."""
        self._refused += 1
        peer.refused = True
        now = time.monotonic()
        if now - self._refuse_logged >= DROP_LOG_INTERVAL:
            self._refuse_logged = now
            log.warning(
                "peer %s holds %d unacknowledged bytes (limit %d; message %d bytes): "
                "reporting it disconnected until its backlog drains",
                peer.id, held, self._settings.max_peer_bytes, size,
            )  # fmt: skip
        self._connected.discard(peer.id)
        self._onNodeDisconnected(peer.node)

    def destroy(self) -> None:
        """Stop timers and close the socket. Waits up to 2 s for the loop."""
        self.setOnMessageReceivedCallback(None)
        self.setOnNodeConnectedCallback(None)
        self.setOnNodeDisconnectedCallback(None)
        self._closed = True
        self._syncObj.removeOnTickCallback(self._on_tick)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def close() -> None:
            self._close()
            done.set_result(None)

        try:
            self._loop.call_soon_threadsafe(close)
            done.result(timeout=2.0)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass
        if self._own_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._own_thread.join(timeout=2.0)
            if not self._own_thread.is_alive():
                self._loop.close()

    def peer_stats(self) -> dict[str, PeerLinkStats]:
        """Per-peer path stats keyed by member id. Safe from any thread."""
        if _on_loop(self._loop):
            return self._stats_now()
        done: concurrent.futures.Future[dict[str, PeerLinkStats]] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(lambda: done.set_result(self._stats_now()))
        return done.result(timeout=2.0)

    def drop_counts(self) -> dict[str, int]:
        """Datagrams dropped by the secure channel, by reason, plus authenticated
        messages that failed to decode (``undecodable``). Safe from any thread."""
        if _on_loop(self._loop):
            return self._drops_now()
        done: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(lambda: done.set_result(self._drops_now()))
        return done.result(timeout=2.0)

    def _drops_now(self) -> dict[str, int]:
        drops = {r.value: n for r, n in self._channel.metrics().drops.items() if n}
        if self._undecodable:
            drops["undecodable"] = self._undecodable
        return drops

    # ------------------------------------------------------- tick thread

    def _on_tick(self) -> None:
        if self._notifier is None:
            self._notifier = PipeNotifier(self._syncObj._poller, self._drain)
        self._drain()

    def _drain(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        while self._inbox and not self._closed:
            kind, peer_id, data = self._inbox.popleft()
            node = self._peers[peer_id].node
            if kind == "up":
                self._connected.add(peer_id)
                self._onNodeConnected(node)
            elif kind == "down":
                self._connected.discard(peer_id)
                self._onNodeDisconnected(node)
            else:
                # Authenticated by the channel and delivered by the link.
                try:
                    message = wirecodec.decode(data)
                except DecodeError as exc:
                    self._on_undecodable(peer_id, exc)
                    continue
                self._onMessageReceived(node, message)

    # ------------------------------------------------------- loop-side messages

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop that owns the socket (and runs :meth:`send_from_loop`)."""
        return self._loop

    def set_loop_receiver(self, kinds: frozenset[int], handler: LoopHandler | None) -> None:
        """Loop thread: authenticated messages whose wire kind is in ``kinds``
        are decoded and handed to ``handler(node, message)`` on the loop, as
        they arrive, instead of to the tick thread; their order relative to
        other messages is not kept. ``None`` undoes it. For messages that need
        no Raft state change (ReadIndex probes and acks): no thread hop."""
        self._loop_handler = handler
        self._loop_kinds = kinds if handler is not None else frozenset()

    def send_from_loop(self, node: Any, message: dict[str, Any]) -> bool:
        """Loop thread: queue ``message`` for ``node`` and transmit it at the
        end of this loop turn (with whatever else is due), without the tick
        thread. ``False`` (dropped: the sender retransmits) when there is no
        live session with the peer or its backlog is full. Its order relative
        to messages sent with :meth:`send` is not kept."""
        peer_id = self._node_peer.get(node)
        if peer_id is None or self._closed:
            return False
        peer = self._peers[peer_id]
        if peer.link is None or not peer.reported_up:
            return False
        data = wirecodec.encode(message)  # EncodeError: a bug in the sender
        with self._out_lock:
            held = peer.outbox_bytes + peer.backlog_bytes + peer.link_buffered
            if held + len(data) > self._settings.max_peer_bytes:
                return False
            peer.backlog.append(data)
            peer.backlog_bytes += len(data)
        self._transmit_soon(peer)
        return True

    def _divert(self, peer: _Peer, messages: list[bytes]) -> list[bytes]:
        """Loop thread: hand the loop-side messages to their handler; return
        the rest (for the tick thread), in order."""
        kinds, handler = self._loop_kinds, self._loop_handler
        rest: list[bytes] = []
        for m in messages:
            if handler is None or len(m) < 2 or m[1] not in kinds:
                rest.append(m)
                continue
            try:
                message = wirecodec.decode(m)
            except DecodeError as exc:
                self._on_undecodable(peer.id, exc)
                continue
            try:
                handler(peer.node, message)
            except Exception:  # a handler bug must not break the transport
                log.exception("loop-side handler failed for %s", message.get("type"))
        return rest

    def _on_undecodable(self, peer_id: str, exc: DecodeError) -> None:
        self._undecodable += 1
        now = time.monotonic()
        if now - self._undecodable_logged >= DROP_LOG_INTERVAL:
            self._undecodable_logged = now
            log.warning(
                "dropped an undecodable message from %s (%d so far): %s",
                peer_id, self._undecodable, exc.message,
            )  # fmt: skip

    # ------------------------------------------------------- loop thread

    async def _open(self) -> None:
        await self._reach.open(self._on_datagram, self._on_path_up, self._on_peer_moved)
        self._silence_timer = self._loop.call_later(SILENCE_TICK_S, self._on_silence_tick)
        self._open_done = True

    def _on_path_up(self, peer_id: str) -> None:
        """A (new) path to the peer: say HELLO if needed, resend what is due."""
        peer = self._peers[peer_id]
        peer.roam.reset(self._reach.remote(peer_id))  # the path below proved this address
        if self._channel.handshake(peer_id).needs_hello:
            if peer.hello_handle is not None:
                peer.hello_handle.cancel()
                peer.hello_handle = None
            peer.hello_interval = HELLO_MIN_INTERVAL
            self._send_hello(peer)
        if peer.link is not None:
            peer.link.path_changed(self._loop.time())
            peer.suspected = False  # a new path gets its own stall allowance
            self._transmit(peer)

    def _close(self) -> None:
        for peer in self._peers.values():
            for handle in (peer.timer, peer.hello_handle, peer.roam_timer):
                if handle is not None:
                    handle.cancel()
            peer.timer = peer.hello_handle = peer.roam_timer = None
        self._open_done = False
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        self._reach.close()

    def _wake_tick(self) -> None:
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        notifier = self._notifier
        if notifier is not None:
            try:
                notifier.notify()
            except OSError:
                pass  # pipe full: a wake-up is already pending

    def _flush_outbox(self) -> None:
        touched: dict[str, _Peer] = {}
        with self._out_lock:
            batch = list(self._outbox)
            self._outbox.clear()
            self._flush_pending = False
            for peer_id, data in batch:
                peer = self._peers[peer_id]
                peer.outbox_bytes -= len(data)
                if peer.link is None:
                    continue  # no session yet: pysyncobj was never told it is up
                peer.backlog.append(data)
                peer.backlog_bytes += len(data)
                touched[peer_id] = peer
        for peer in touched.values():
            self._transmit(peer)

    def _feed(self, peer: _Peer, link: ReliableLink) -> None:
        """Move the peer's backlog into its link, in order, while the link's
        send buffer has room. A message leaves the backlog only once the link
        took it: nothing accepted is dropped, cut or reordered."""
        now = self._loop.time()
        backlog = peer.backlog
        while backlog:
            data = backlog[0]
            try:
                if not link.send(data, now, ordered=travels_ordered(data)):
                    break
            except MessageTooLarge as exc:  # send() refuses these: unreachable
                log.error("message to %s not sent: %s", peer.id, exc)
            backlog.popleft()
            with self._out_lock:
                peer.backlog_bytes -= len(data)
        peer.link_buffered = link.buffered

    def _transmit(self, peer: _Peer) -> None:
        """Send what the peer's link has due, check liveness, re-arm its timer."""
        link = peer.link
        if link is None or not self._open_done:
            return
        if peer.backlog:
            self._feed(peer, link)
        now = self._loop.time()
        send, seal = self._reach.send, self._channel.seal
        hinted = peer.hinted
        if hinted is not None and peer.roam.pending != hinted:
            hinted = peer.hinted = None  # validated (now current) or failed
        for payload in link.poll_transmit(now):
            datagram = seal(peer.id, payload)
            send(peer.id, datagram)
            if hinted is not None:
                self._reach.send_to(peer.id, datagram, hinted)
        peer.link_buffered = link.buffered
        if peer.refused and peer.reported_up and self._drained(peer):
            peer.refused = False
            self._report(peer, True)
        dead = link.dead(now)
        if dead and peer.reported_up:
            reason = link.failure or "no ACKs"
            log.warning("link to %s is dead (%s); still probing", peer.id, reason)
            self._report(peer, False)
            self._reach.suspect(peer.id)
        elif not dead and not peer.reported_up:
            self._report(peer, True)
        stall = link.stalled(now)
        check_at: float | None = None
        if stall == 0.0:
            peer.suspected = peer.mapping_checked = False
        else:
            if not peer.suspected and stall >= max(SUSPECT_MIN_S, SUSPECT_RTTS * (link.srtt or 0)):
                peer.suspected = True  # once per stall; the reach rebuilds the path
                self._reach.suspect(peer.id)
            if not peer.mapping_checked:
                check = max(MAPPING_CHECK_MIN_S, MAPPING_CHECK_RTTS * (link.srtt or 0))
                if stall >= check:
                    peer.mapping_checked = True  # once per stall: did our NAT move?
                    self._reach.check_mapping(peer.id)
                else:
                    check_at = now + check - stall
        when = link.next_timeout()
        if check_at is not None and (when is None or check_at < when):
            when = check_at
        if when is None or (peer.timer_when is not None and peer.timer_when <= when):
            return  # a timer at least as early is armed; waking early only re-checks
        if peer.timer is not None:
            peer.timer.cancel()
        peer.timer_when = when
        peer.timer = self._loop.call_at(when, self._on_timer, peer)

    def _transmit_soon(self, peer: _Peer) -> None:
        """Transmit for ``peer`` once the datagrams of this loop turn are in:
        one ACK (and one poll) covers all of them."""
        if not self._dirty:
            self._loop.call_soon(self._transmit_dirty)
        self._dirty[peer.id] = peer

    def _transmit_dirty(self) -> None:
        peers = list(self._dirty.values())
        self._dirty.clear()
        for peer in peers:
            self._transmit(peer)

    def _on_timer(self, peer: _Peer) -> None:
        peer.timer = peer.timer_when = None
        self._transmit(peer)

    def _drained(self, peer: _Peer) -> bool:
        held = peer.outbox_bytes + peer.backlog_bytes + peer.link_buffered
        return held <= self._settings.resume_bytes

    def _report(self, peer: _Peer, up: bool) -> None:
        peer.reported_up = up
        self._inbox.append(("up" if up else "down", peer.id, b""))
        self._wake_tick()

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if not self._open_done:
            return
        event = self._channel.receive(data)
        if isinstance(event, Delivered):
            peer = self._peers[event.peer_id]
            if self._roam(peer, event.payload, len(data), addr):
                return
            if peer.link is None:
                return
            peer.heard = self._loop.time()
            messages = peer.link.receive(event.payload, self._loop.time())
            if messages and self._loop_kinds:
                messages = self._divert(peer, messages)
            if messages:
                self._inbox.extend(("msg", peer.id, m) for m in messages)
                self._wake_tick()
            self._transmit_soon(peer)
        elif isinstance(event, HandshakeEvent):
            peer = self._peers[event.peer_id]
            if event.reply is not None:
                self._reach.send(peer.id, event.reply)
            if event.established:
                self._new_session(peer)
            self._arm_hello(peer)
        elif isinstance(event, Dropped):
            self._log_drop(event, addr)

    # ------------------------------------------------------- roaming

    def _roam(self, peer: _Peer, payload: bytes, size: int, addr: Any) -> bool:
        """Loop thread: roaming for one authentic, fresh DATA datagram from
        ``peer`` (:mod:`~raftstate.transport.roaming`): challenge a new source
        address, answer a challenge, switch on a valid response. Returns
        whether ``payload`` was a path challenge/response (not for the link)."""
        now = self._loop.time()
        source = self._reach.source_of(peer.id, addr)
        current = peer.roam.current
        if source is not None and current is not None and source != current and (
            source == self._reach.remote(peer.id)
        ):
            # The reach itself moved the path here (ICE nominated another pair,
            # e.g. on the peer's checks from its new mapping; ICE checks are
            # authenticated): nothing to validate, but it is a new path.
            log.info("path to %s moved %s -> %s (by ICE)", peer.id, current, source)
            peer.roam.adopt(source)
        if source is not None:
            challenge = peer.roam.on_authentic(source, size, now)
            if challenge is not None:
                log.debug("%s sent from a new address %s; validating it", peer.id, source)
                self._send_path(peer, challenge.payload, challenge.address)
        if not is_path_payload(payload):
            return False
        link = peer.link
        if link is not None and link.stalled(now) > 0.0:
            # The peer got through to us: the path works (again); resend now
            # rather than after the backed-off retransmission timer.
            link.path_changed(now, new_path=False)
            self._transmit_soon(peer)
        reply = response_to(payload)
        if reply is not None:
            # To where the challenge came from (the path being validated).
            if source is not None:
                self._send_path(peer, reply, source)
            elif self._open_done:
                self._reach.send(peer.id, self._channel.seal(peer.id, reply))
        elif source is not None:
            switch = peer.roam.on_response(source, payload, now)
            if switch is not None:
                self._reach.move(peer.id, switch.address)
                peer.roamed += 1
                log.info("path to %s moved %s -> %s (validated)", peer.id,
                         switch.previous, switch.address)  # fmt: skip
                if peer.link is not None:
                    peer.link.path_changed(now)
                peer.suspected = peer.mapping_checked = False
                self._transmit_soon(peer)
        return True

    def _send_path(self, peer: _Peer, payload: bytes, address: Any) -> None:
        if not self._open_done:
            return
        self._reach.send_to(peer.id, self._channel.seal(peer.id, payload), address)
        self._arm_roam(peer)

    def _on_peer_moved(self, peer_id: str, address: Any) -> None:
        """Loop thread: the reach heard (through the rendezvous, sealed by the
        peer) that the peer's NAT moved it to ``address``: challenge it there.
        Only a valid response moves the path, so a false hint costs one
        rate-limited challenge."""
        peer = self._peers.get(peer_id)
        if peer is None or self._channel.session(peer_id) is None:
            return
        now = self._loop.time()
        challenge = peer.roam.hint(address, now)
        if challenge is not None:
            log.info("%s says its NAT moved it to %s; validating", peer_id, address)
            self._send_path(peer, challenge.payload, challenge.address)
            # The note is the peer's own word (sealed end to end): while the
            # challenge is out, send link data there as well as on the old
            # path, so the validation's round trip is not on the critical
            # path. Nothing moves until the echo (a replayed or old note
            # never gets here: the reach acts on each note once, while it is
            # fresh; roaming.fresh_note).
            peer.hinted = address
            if peer.link is not None and peer.link.stalled(now) > 0.0:
                peer.link.path_changed(now, new_path=False)
                self._transmit_soon(peer)

    def _arm_roam(self, peer: _Peer) -> None:
        when = peer.roam.next_timeout()
        if when is None:
            return
        if peer.roam_timer is not None:
            peer.roam_timer.cancel()
        peer.roam_timer = self._loop.call_at(when + 0.001, self._on_roam_timer, peer)

    def _on_roam_timer(self, peer: _Peer) -> None:
        peer.roam_timer = None
        due = peer.roam.poll(self._loop.time())
        if isinstance(due, Challenge):
            self._send_path(peer, due.payload, due.address)
            return  # _send_path re-armed the timer
        if due is not None:
            # Rebuild only a path that does not work: a failed validation of
            # a stray source while the link makes progress changes nothing.
            link = peer.link
            if link is not None and link.stalled(self._loop.time()) > 0.0:
                log.info("no valid answer from %s at %s; rebuilding the path",
                         peer.id, due.address)  # fmt: skip
                self._reach.suspect(peer.id)
        self._arm_roam(peer)

    def _on_silence_tick(self) -> None:
        """Loop thread, every SILENCE_TICK_S: probe peers that went silent
        (see ``SILENCE_*`` in :mod:`~raftstate.transport.udpconfig`)."""
        if not self._open_done:
            return
        now = self._loop.time()
        for peer in self._peers.values():
            link = peer.link
            if link is None or peer.heard is None:
                continue
            silence = now - peer.heard
            threshold = max(SILENCE_MIN_S, SILENCE_RTTS * (link.srtt or 0.0))
            if silence < threshold:
                peer.probe_gap = 0.0
                continue
            if silence > SILENCE_PROBE_FOR_S or now < peer.probe_next:
                continue
            first = peer.probe_gap == 0.0
            peer.probe_gap = threshold if first else 2 * peer.probe_gap
            peer.probe_next = now + peer.probe_gap
            payload = challenge_payload(os.urandom(NONCE_SIZE))
            self._reach.send(peer.id, self._channel.seal(peer.id, payload))
            if first:
                self._reach.check_mapping(peer.id)
        self._silence_timer = self._loop.call_later(SILENCE_TICK_S, self._on_silence_tick)

    def _new_session(self, peer: _Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
        peer.timer = peer.timer_when = None
        if peer.reported_up:
            self._report(peer, False)  # the peer restarted: pysyncobj sees a reconnect
        with self._out_lock:  # the old session's messages mean nothing to the new process
            peer.backlog.clear()
            peer.backlog_bytes = 0
            peer.link_buffered = 0
            peer.refused = False
        peer.sessions += 1
        peer.link = ReliableLink(
            SecureChannel.max_payload(DATAGRAM_SIZE), config=self._settings.link
        )
        peer.hello_interval = HELLO_MIN_INTERVAL
        self._report(peer, True)
        log.info("session %d with %s established", peer.sessions, peer.id)

    def _send_hello(self, peer: _Peer) -> None:
        if self._open_done:
            self._reach.send(peer.id, self._channel.hello(peer.id))
        self._arm_hello(peer)

    def _arm_hello(self, peer: _Peer) -> None:
        if not self._channel.handshake(peer.id).needs_hello or peer.hello_handle is not None:
            return
        peer.hello_handle = self._loop.call_later(peer.hello_interval, self._on_hello_timer, peer)
        peer.hello_interval = min(peer.hello_interval * 2, HELLO_MAX_INTERVAL)

    def _on_hello_timer(self, peer: _Peer) -> None:
        peer.hello_handle = None
        if self._channel.handshake(peer.id).needs_hello:
            self._send_hello(peer)

    def _log_drop(self, event: Dropped, addr: Any) -> None:
        if event.reason not in _AUTH_DROPS or not event.detail:
            return
        held = self._drop_logged.admit((event.peer_id or addr, event.reason), self._loop.time())
        if held is not None:
            log.warning("dropped datagram from %s: %s%s", addr, event.detail, held_suffix(held))

    def _stats_now(self) -> dict[str, PeerLinkStats]:
        out = {}
        for peer in self._peers.values():
            st = peer.link.stats() if peer.link is not None else None
            kind, built = self._reach.path_info(peer.id)
            out[peer.id] = PeerLinkStats(
                peer_id=peer.id,
                path=kind,
                connected=peer.reported_up,
                srtt=st.srtt if st else None,
                retransmissions=st.retransmissions if st else 0,
                loss_rate=st.loss_measured if st else None,
                sessions=peer.sessions,
                paths=built,
                link=st,
            )
        return out


def _make_reach(
    loop: asyncio.AbstractEventLoop, settings: UdpSettings, peer_ids: list[str]
) -> Reach:
    if settings.ice is not None:
        from raftstate.transport.ice import IceReach  # aioice only when used

        return IceReach(
            loop, settings.node_id, peer_ids, settings.cluster_secret, settings.ice,
            identity=settings.identity,
        )  # fmt: skip
    addresses = dict(settings.peers)
    addresses.update(settings.send_to)
    return StaticReach(
        loop,
        settings.bind,
        {pid: addresses[pid] for pid in peer_ids},
        bind_retries=settings.bind_retries,
        bind_retry_s=settings.bind_retry_s,
        proxied=frozenset(pid for pid, _ in settings.send_to),
    )


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


__all__ = ["UdpTransport"]
