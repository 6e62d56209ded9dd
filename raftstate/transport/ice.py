"""ICE reach: one aioice connection per peer, negotiated through the rendezvous.

Theory of operation
-------------------
For each pair of nodes the one with the smaller id is *controlling*: it
drives every negotiation ("attempt"), the other answers.

1. The controlling node opens an aioice ``Connection``, gathers candidates
   and sends ``offer{attempt, mode, ufrag, pwd, candidates}`` through the
   rendezvous. An attempt id is ``(boot, n)``: ``boot`` is random per process,
   so a restarted node's offers are never mistaken for old ones.
2. The controlled node, on an offer it has not seen, drops any negotiation in
   progress, opens its own connection with the same ``mode``, gathers, sends
   ``answer{attempt, ...}`` and both sides add the other's candidates, signal
   end-of-candidates (else aioice never fails) and run ``connect()`` under
   ``connect_timeout`` (aioice alone gives up only after ~63 s).
3. ``mode`` is ``direct`` (STUN only) or ``relay`` (STUN + TURN). A node
   always starts ``direct``: with TURN configured, aioice picks the relay about
   half the time when a first direct check is lost. When a ``direct`` attempt
   fails, the next is ``relay``; after a failed ``relay`` attempt, ``direct``
   again. A rebuild starts with the mode that last worked.
4. When a connection completes it becomes the peer's active path; the previous
   one is closed. The transport is told (``path_up``) so it resends its HELLO
   and anything due at once. The security session and the reliable link live
   above the path and survive the swap: nothing is lost or replayed.
5. Rebuilds: the transport calls :meth:`IceReach.suspect` when the link makes
   no progress (its ``dead_after``); aioice closes a path whose consent checks
   fail (~30 s). Either way the controlling side starts a new attempt, and the
   controlled side asks for one with ``restart``. Failed attempts back off
   from ``retry_min`` doubling to ``retry_max``. A controlled node also sends
   ``restart`` when it starts, so a restarted node gets an offer at once.

Data path: aioice's ``Connection.data_received`` is overridden to hand each
datagram straight to the transport (no queue, no task); sending writes to the
nominated pair's socket transport, which for a TURN relay binds a channel as
needed. Everything here runs on the node's event loop thread, which is the
only thread that may touch aioice objects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import aioice
from aioice import stun

from raftstate.transport.crypto import NodeIdentity
from raftstate.transport.reach import Deliver, Moved, PathUp, grow_buffers
from raftstate.transport.rendezvous import RendezvousClient
from raftstate.transport.roaming import fresh_note
from raftstate.transport.signalseal import SignalSealer
from raftstate.transport.udpconfig import IceSettings, split_hostport

log = logging.getLogger("raftstate.transport.ice")

DIRECT = "direct"
RELAY = "relay"
#: A peer's path asks STUN about our mapping at most this often, in at most
#: MAPPING_CHECK_TRIES requests of MAPPING_CHECK_TRY_S each.
MAPPING_CHECK_INTERVAL_S = 0.5
MAPPING_CHECK_TRIES = 3
MAPPING_CHECK_TRY_S = 0.25
#: A ``moved`` note is repeated after a rendezvous reconnect for this long.
MOVED_NOTE_TTL_S = 3.0
#: A ``moved`` note sent further than this from our wall clock is ignored (as
#: are replays: roaming.fresh_note). Nodes' clocks are already within the
#: rendezvous datagram window (30 s) of the server's, so within 60 s of ours.
MOVED_NOTE_WINDOW_S = 60.0
#: The ``moved`` note also goes as a rendezvous datagram, twice, this far apart.
MOVED_DATAGRAM_GAP_S = 0.03


class _DataConnection(aioice.Connection):
    """An aioice connection that hands data to a callback instead of a queue,
    with the socket and address each datagram came from (once tapped)."""

    def __init__(self, on_data: Deliver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_data = on_data
        #: ``(protocol, (host, port))`` of the datagram being delivered.
        self.last_source: tuple[Any, tuple[str, int]] | None = None
        self._tapped: set[int] = set()

    def data_received(self, data: bytes, component: int) -> None:
        self._on_data(data, (self, self.last_source))

    def tap(self, protocol: Any) -> None:
        """Record the source of every datagram ``protocol`` receives (aioice
        drops it before :meth:`data_received`). Idempotent."""
        if id(protocol) in self._tapped:
            return
        self._tapped.add(id(protocol))
        inner = protocol.datagram_received

        def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
            self.last_source = (protocol, (addr[0], addr[1]))
            try:
                inner(data, addr)
            finally:
                self.last_source = None

        protocol.datagram_received = datagram_received


class _Peer:
    __slots__ = (
        "active", "active_mode", "attempt", "built", "check_later", "checking", "controlling",
        "failures", "good_mode", "id", "kind", "last_check", "last_restart", "mapped", "mode",
        "moved_note", "moved_seen", "moves", "negotiating", "retry", "seen", "tasks", "watch",
    )  # fmt: skip

    def __init__(self, peer_id: str, controlling: bool) -> None:
        self.id = peer_id
        self.controlling = controlling
        self.active: _DataConnection | None = None
        self.active_mode = ""
        self.kind = "none"
        self.built = 0
        self.attempt: tuple[str, int] | None = None
        self.negotiating: _DataConnection | None = None
        self.mode = DIRECT
        self.good_mode = DIRECT
        self.failures = 0
        self.retry: asyncio.TimerHandle | None = None
        self.last_restart = -1e9
        self.tasks: set[asyncio.Task[None]] = set()
        self.watch: asyncio.Task[None] | None = None
        #: Our NAT's mapping of the active path's socket, as STUN last saw it.
        self.mapped: tuple[str, int] | None = None
        self.checking = False
        self.last_check = -1e9
        #: A check asked for within MAPPING_CHECK_INTERVAL_S of the last one runs then.
        self.check_later: asyncio.TimerHandle | None = None
        #: The last ``moved`` note to the peer and when it was sent (repeated
        #: on a rendezvous reconnect within MOVED_NOTE_TTL_S).
        self.moved_note: tuple[dict[str, Any], float] | None = None
        #: Send time (the peer's ``ms``) of the last ``moved`` note acted on.
        self.moved_seen: int | None = None
        #: The nominated pair and its remote candidate last seen (identities),
        #: and how often they changed under a built path (our validated moves,
        #: or aioice nominating another pair): each is a new path.
        self.seen: tuple[Any, Any] | None = None
        self.moves = 0


class IceReach:
    """:class:`~raftstate.transport.reach.Reach` over aioice; see the module doc."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        node_id: str,
        peer_ids: list[str],
        cluster_secret: str,
        settings: IceSettings,
        *,
        identity: NodeIdentity | None = None,
    ) -> None:
        """Authenticates to the rendezvous with ``settings.rendezvous_secret``
        and seals every relayed body end to end under the pair's signaling
        key (cluster secret + node keys; :mod:`raftstate.transport.signalseal`),
        so the rendezvous can neither read nor forge offers."""
        self._loop = loop
        self._node_id = node_id
        self._settings = settings
        self._secret = settings.rendezvous_secret
        self._sealer = SignalSealer(cluster_secret, node_id, peer_ids, identity)
        self._boot = secrets.token_hex(6)
        self._counter = 0
        self._peers = {pid: _Peer(pid, node_id < pid) for pid in peer_ids}
        self._deliver: Deliver | None = None
        self._path_up: PathUp | None = None
        self._moved: Moved | None = None
        self._rendezvous: RendezvousClient | None = None
        self._closed = False

    # ------------------------------------------------------------ Reach

    async def open(self, deliver: Deliver, path_up: PathUp, moved: Moved | None = None) -> None:
        self._deliver, self._path_up, self._moved = deliver, path_up, moved
        self._rendezvous = RendezvousClient(
            self._settings.rendezvous,
            self._node_id,
            self._secret,
            self._on_signal,
            on_connected=self._on_rendezvous_connected,
        )
        self._rendezvous.start()
        for peer in self._peers.values():
            if peer.controlling:
                self._start_attempt(peer)
            else:
                self._ask_restart(peer)

    def send(self, peer_id: str, datagram: bytes) -> None:
        conn = self._peers[peer_id].active
        if conn is None:
            return
        pair = conn._nominated.get(1)
        if pair is not None:
            pair.protocol.transport.sendto(datagram, pair.remote_addr)

    def path_info(self, peer_id: str) -> tuple[str, int]:
        peer = self._peers[peer_id]
        self._observe(peer)
        return peer.kind, peer.built + peer.moves

    def _observe(self, peer: _Peer) -> Any:
        """The active nominated pair (or ``None``); counts a change of it or of
        its remote since last seen as a move, and taps a new pair's socket."""
        conn = peer.active
        pair = _nominated(conn)
        if pair is None or conn is None:
            return None
        seen = peer.seen
        if seen is None or seen[0] is not pair or seen[1] is not pair.remote_candidate:
            if seen is not None:
                peer.moves += 1
                peer.kind = _pair_kind(conn)
                log.info("path to %s now %s -> %s:%d", peer.id, pair.local_candidate.type,
                         *pair.remote_addr)  # fmt: skip
            peer.seen = (pair, pair.remote_candidate)
            conn.tap(pair.protocol)
        return pair

    def suspect(self, peer_id: str) -> None:
        peer = self._peers[peer_id]
        if peer.negotiating is not None or self._closed:
            return
        log.info("path to %s (%s) suspected dead; rebuilding", peer_id, peer.kind)
        if peer.controlling:
            self._start_attempt(peer)
        else:
            self._ask_restart(peer)

    # ------------------------------------------------------------ roaming

    def remote(self, peer_id: str) -> Any | None:
        pair = _nominated(self._peers[peer_id].active)
        return None if pair is None else pair.remote_addr

    def source_of(self, peer_id: str, source: Any) -> Any | None:
        peer = self._peers[peer_id]
        conn = peer.active
        pair = self._observe(peer)
        if pair is None or not isinstance(source, tuple) or source[0] is not conn:
            return None
        tapped = source[1]
        if tapped is None or tapped[0] is not pair.protocol:
            return None  # another socket of the connection: not the data path
        return tapped[1]

    def send_to(self, peer_id: str, datagram: bytes, address: Any) -> None:
        pair = _nominated(self._peers[peer_id].active)
        if pair is not None:
            pair.protocol.transport.sendto(datagram, address)

    def move(self, peer_id: str, address: Any) -> None:
        """Point the nominated pair at ``address`` (a peer-reflexive remote):
        data and aioice's consent checks go there from now on."""
        pair = _nominated(self._peers[peer_id].active)
        if pair is None:
            return
        old = pair.remote_candidate
        pair.remote_candidate = aioice.Candidate(
            foundation=old.foundation, component=old.component, transport=old.transport,
            priority=old.priority, host=str(address[0]), port=int(address[1]), type="prflx",
        )  # fmt: skip
        self._observe(self._peers[peer_id])  # counts the move

    def check_mapping(self, peer_id: str, *, force: bool = False) -> None:
        """Ask the STUN server, from the active path's socket, where our NAT
        maps it now; if that moved, tell the peer through the rendezvous
        (sealed) so it can validate the new address, and redial the
        rendezvous (its TCP mapping moved too). At most once per
        :data:`MAPPING_CHECK_INTERVAL_S` per peer: a check asked for sooner
        runs when the interval is up (never dropped: the stall that asked
        may be the one that matters)."""
        peer = self._peers[peer_id]
        pair = _nominated(peer.active)
        now = self._loop.time()
        if (
            pair is None or self._closed or not self._settings.stun_server or peer.checking
            or pair.local_candidate.type == "relay"
        ):  # fmt: skip
            return
        if now - peer.last_check < MAPPING_CHECK_INTERVAL_S and not force:
            if peer.check_later is None:
                peer.check_later = self._loop.call_at(
                    peer.last_check + MAPPING_CHECK_INTERVAL_S, self._deferred_check, peer
                )
            return
        if peer.check_later is not None:
            peer.check_later.cancel()
            peer.check_later = None
        peer.checking, peer.last_check = True, now
        self._spawn(peer, self._check_mapping(peer, pair))

    def _deferred_check(self, peer: _Peer) -> None:
        peer.check_later = None
        self.check_mapping(peer.id)

    async def _check_mapping(self, peer: _Peer, pair: Any) -> None:
        started = self._loop.time()
        try:
            server = split_hostport(self._settings.stun_server)
            request = stun.Message(
                message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
            )
            # Our own short tries: a lost request should not cost aioice's 0.5 s RTO.
            response = None
            for _ in range(MAPPING_CHECK_TRIES):
                try:
                    response, _ = await asyncio.wait_for(
                        pair.protocol.request(request, server, retransmissions=0),
                        MAPPING_CHECK_TRY_S,
                    )
                    break
                except (TimeoutError, stun.TransactionError):
                    request = stun.Message(
                        message_method=stun.Method.BINDING,
                        message_class=stun.Class.REQUEST,
                    )
            if response is None:
                return
            host, port = response.attributes["XOR-MAPPED-ADDRESS"]
        except (OSError, KeyError, ValueError, stun.TransactionError) as exc:
            log.debug("mapping check toward %s failed: %r", peer.id, exc)
            return
        finally:
            peer.checking = False
        mapped = (str(host), int(port))
        if peer.active is None or _nominated(peer.active) is not pair:
            return  # the path changed meanwhile
        previous, peer.mapped = peer.mapped, mapped
        if previous is None or previous == mapped:
            return
        log.info("our NAT moved the path to %s from %s:%d to %s:%d; telling %s",
                 peer.id, *previous, *mapped, peer.id)  # fmt: skip
        # Open our NAT toward the peer's address from the new mapping, so its
        # challenge can come in (a STUN indication: aioice ignores it).
        indication = stun.Message(
            message_method=stun.Method.BINDING, message_class=stun.Class.INDICATION
        )
        pair.protocol.transport.sendto(bytes(indication), pair.remote_addr)
        for other in self._peers.values():
            if other is not peer:
                self.check_mapping(other.id, force=True)  # the same NAT moved them too
        rendezvous = self._rendezvous
        if rendezvous is not None:
            if rendezvous.connected_at is not None and rendezvous.connected_at < started:
                rendezvous.reconnect()  # dialled before the move: its TCP mapping is gone
            note = self._sealer.seal(
                peer.id,
                {"t": "moved", "host": mapped[0], "port": mapped[1], "ms": int(time.time() * 1000)},
            )
            peer.moved_note = (note, self._loop.time())
            # At once over UDP (our TCP session is being redialled: three
            # round trips), twice against loss; and over the new session.
            for delay in (0.0, MOVED_DATAGRAM_GAP_S):
                self._loop.call_later(delay, self._send_moved_datagram, peer, note)
            rendezvous.send(peer.id, note)

    def _send_moved_datagram(self, peer: _Peer, note: dict[str, Any]) -> None:
        moved = peer.moved_note
        if self._rendezvous is not None and not self._closed and moved and moved[0] is note:
            try:
                self._rendezvous.send_datagram(peer.id, note)
            except ValueError as exc:  # too large for a datagram: the TCP copy goes
                log.debug("moved note to %s not sent as a datagram: %r", peer.id, exc)

    def _on_moved(self, peer: _Peer, body: Mapping[str, Any]) -> None:
        host, port = body.get("host"), body.get("port")
        if not (isinstance(host, str) and _literal(host) and isinstance(port, int)
                and 0 < port < 65536):  # fmt: skip
            log.warning("malformed moved from %s ignored", peer.id)
            return
        sent = body.get("ms")
        if not fresh_note(
            sent, peer.moved_seen, int(time.time() * 1000), int(MOVED_NOTE_WINDOW_S * 1000)
        ):
            log.debug("stale or replayed moved from %s ignored", peer.id)
            return
        peer.moved_seen = sent  # an int: fresh_note checked
        if self._moved is not None and peer.active is not None:
            self._moved(peer.id, (host, port))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conns: list[_DataConnection] = []
        for peer in self._peers.values():
            for handle in (peer.retry, peer.check_later):
                if handle is not None:
                    handle.cancel()
            for task in list(peer.tasks) + ([peer.watch] if peer.watch else []):
                task.cancel()
            conns += [c for c in (peer.active, peer.negotiating) if c is not None]
            peer.active = peer.negotiating = None
            peer.kind = "none"
        rendezvous = self._rendezvous
        self._rendezvous = None

        async def shutdown() -> None:
            if rendezvous is not None:
                await rendezvous.close()
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

        self._loop.create_task(shutdown())

    # ------------------------------------------------------------ negotiation

    def _new_connection(self, peer: _Peer, mode: str) -> _DataConnection:
        s = self._settings
        stun = split_hostport(s.stun_server) if s.stun_server else None
        turn = split_hostport(s.turn_server) if (mode == RELAY and s.turn_server) else None
        return _DataConnection(
            self._on_data,
            ice_controlling=peer.controlling,
            stun_server=stun,
            turn_server=turn,
            turn_username=s.turn_username or None,
            turn_password=s.turn_password or None,
            use_ipv6=False,
        )

    def _start_attempt(self, peer: _Peer) -> None:
        """Controlling side: open a connection and offer it."""
        if peer.retry is not None:
            peer.retry.cancel()
            peer.retry = None
        self._drop_negotiation(peer)
        self._counter += 1
        peer.attempt = (self._boot, self._counter)
        conn = self._new_connection(peer, peer.mode)
        peer.negotiating = conn
        self._spawn(peer, self._offer(peer, conn, peer.attempt, peer.mode))

    async def _offer(
        self, peer: _Peer, conn: _DataConnection, attempt: tuple[str, int], mode: str
    ) -> None:
        if not await self._gather(peer, conn):
            return
        self._signal(peer.id, "offer", attempt, mode, conn)
        # The answer arrives through _on_signal, which runs _connect.
        peer.retry = self._loop.call_later(
            self._settings.connect_timeout, self._no_answer, peer, conn
        )

    async def _gather(self, peer: _Peer, conn: _DataConnection) -> bool:
        """Gather local candidates under the connect timeout; on failure the
        attempt fails (and is retried) and this returns False."""
        try:
            await asyncio.wait_for(conn.gather_candidates(), self._settings.connect_timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            log.warning("gathering candidates for %s failed: %s", peer.id, exc)
            self._attempt_failed(peer, conn, flip=False)
            return False
        return True

    def _no_answer(self, peer: _Peer, conn: _DataConnection) -> None:
        peer.retry = None
        if peer.negotiating is conn and not conn.remote_candidates:
            log.info("no answer from %s to offer %s; retrying", peer.id, peer.attempt)
            self._attempt_failed(peer, conn, flip=False)

    def _on_offer(self, peer: _Peer, attempt: tuple[str, int], body: Mapping[str, Any]) -> None:
        """Controlled side: answer a new offer."""
        if attempt == peer.attempt:
            return  # duplicate
        if peer.retry is not None:
            peer.retry.cancel()  # the offer we asked for
            peer.retry = None
        self._drop_negotiation(peer)
        peer.attempt = attempt
        mode = RELAY if body.get("mode") == RELAY else DIRECT
        conn = self._new_connection(peer, mode)
        peer.negotiating = conn
        self._spawn(peer, self._answer(peer, conn, attempt, mode, body))

    async def _answer(
        self,
        peer: _Peer,
        conn: _DataConnection,
        attempt: tuple[str, int],
        mode: str,
        offer: Mapping[str, Any],
    ) -> None:
        if not await self._gather(peer, conn):
            return
        self._signal(peer.id, "answer", attempt, mode, conn)
        await self._connect(peer, conn, mode, offer)

    async def _connect(
        self, peer: _Peer, conn: _DataConnection, mode: str, remote: Mapping[str, Any]
    ) -> None:
        try:
            conn.remote_username = str(remote["ufrag"])
            conn.remote_password = str(remote["pwd"])
            for sdp in remote.get("candidates", []):
                await conn.add_remote_candidate(aioice.Candidate.from_sdp(str(sdp)))
            await conn.add_remote_candidate(None)  # end-of-candidates
            await asyncio.wait_for(conn.connect(), self._settings.connect_timeout)
        except (TimeoutError, ConnectionError, ValueError, KeyError, OSError) as exc:
            log.info("ICE %s to %s failed: %s", mode, peer.id, exc or type(exc).__name__)
            self._attempt_failed(peer, conn, flip=True)
            return
        if peer.negotiating is not conn:
            await conn.close()  # superseded meanwhile
            return
        self._activate(peer, conn, mode)

    def _activate(self, peer: _Peer, conn: _DataConnection, mode: str) -> None:
        old = peer.active
        peer.negotiating = None
        peer.active, peer.active_mode = conn, mode
        peer.kind = _pair_kind(conn)
        pair = conn._nominated.get(1)
        peer.mapped = peer.seen = None
        if pair is not None:
            grow_buffers(pair.protocol.transport)
            conn.tap(pair.protocol)
            peer.seen = (pair, pair.remote_candidate)
            local = pair.local_candidate
            for c in conn.local_candidates:  # our NAT's mapping of that socket
                if c.type == "srflx" and (c.related_address, c.related_port) == pair.local_addr:
                    peer.mapped = (c.host, c.port)
            if local.type == "srflx":
                peer.mapped = pair.local_addr
        peer.built += 1
        peer.good_mode = peer.mode = mode
        peer.failures = 0
        if peer.retry is not None:
            peer.retry.cancel()
            peer.retry = None
        if peer.watch is not None:
            peer.watch.cancel()
        peer.watch = self._loop.create_task(self._watch(peer, conn))
        if old is not None:
            self._loop.create_task(old.close())
        log.info("ICE path to %s up: %s (%s mode)", peer.id, peer.kind, mode)
        if self._path_up is not None:
            self._path_up(peer.id)

    async def _watch(self, peer: _Peer, conn: _DataConnection) -> None:
        """Notice aioice closing the active path (consent expired)."""
        while await conn.get_event() is not None:
            if conn._closed:
                break
        if peer.active is conn and not self._closed:
            log.warning("ICE path to %s closed (consent lost)", peer.id)
            peer.active, peer.kind = None, "none"
            self.suspect(peer.id)

    def _attempt_failed(self, peer: _Peer, conn: _DataConnection, *, flip: bool) -> None:
        if peer.negotiating is not conn:
            self._loop.create_task(conn.close())
            return
        self._drop_negotiation(peer)
        if self._closed:
            return
        if flip and self._settings.turn_server:
            peer.mode = RELAY if peer.mode == DIRECT else DIRECT
        peer.failures += 1
        delay = min(self._settings.retry_max, self._settings.retry_min * 2 ** (peer.failures - 1))
        if flip and peer.failures == 1:
            delay = 0.0  # the first fallback (direct -> relay) goes at once
        if peer.retry is not None:
            peer.retry.cancel()
        peer.retry = self._loop.call_later(delay, self._retry, peer)

    def _retry(self, peer: _Peer) -> None:
        peer.retry = None
        if self._closed or peer.negotiating is not None:
            return
        if peer.controlling:
            self._start_attempt(peer)
        else:
            self._ask_restart(peer, force=True)

    def _drop_negotiation(self, peer: _Peer) -> None:
        conn, peer.negotiating = peer.negotiating, None
        for task in list(peer.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if conn is not None:
            self._loop.create_task(conn.close())

    def _ask_restart(self, peer: _Peer, *, force: bool = False) -> None:
        """Controlled side: ask for an offer, and ask again (backing off)
        until one arrives; the request or the offer may be lost with a
        rendezvous connection."""
        now = self._loop.time()
        if not force and now - peer.last_restart < self._settings.connect_timeout:
            return
        peer.last_restart = now
        if self._rendezvous is not None:
            self._rendezvous.send(peer.id, self._sealer.seal(peer.id, {"t": "restart"}))
        if peer.retry is None:
            peer.failures += 1
            delay = min(self._settings.retry_max, self._settings.connect_timeout * peer.failures)
            peer.retry = self._loop.call_later(delay, self._retry, peer)

    # ------------------------------------------------------------ signalling

    def _signal(
        self, to: str, kind: str, attempt: tuple[str, int], mode: str, conn: _DataConnection
    ) -> None:
        if self._rendezvous is None:
            return
        body = {
            "t": kind,
            "attempt": list(attempt),
            "mode": mode,
            "ufrag": conn.local_username,
            "pwd": conn.local_password,
            "candidates": [c.to_sdp() for c in conn.local_candidates],
        }
        self._rendezvous.send(to, self._sealer.seal(to, body))

    def _on_signal(self, sender: str, wire: dict[str, Any]) -> None:
        peer = self._peers.get(sender)
        if peer is None or self._closed:
            log.warning("rendezvous message from unknown member %r ignored", sender)
            return
        opened = self._sealer.open(sender, wire)
        if opened is None:
            n = self._sealer.rejected
            if n & (n - 1):  # log the 1st, 2nd, 4th, 8th, ...: the sender may be hostile
                return
            log.warning(
                "rendezvous message claiming to be from %s failed authentication "
                "(forged or altered, or cluster secret/node keys differ): dropped (%d so far)",
                sender, self._sealer.rejected,
            )  # fmt: skip
            return
        body = opened
        kind = body.get("t")
        if kind == "moved":
            self._on_moved(peer, body)
            return
        if kind == "restart":
            if not peer.controlling:
                return
            conn = peer.negotiating
            if conn is None:
                self._start_attempt(peer)
            elif conn.remote_username is None and conn.local_candidates and peer.attempt:
                # Our offer is out but unanswered: it may have been lost.
                self._signal(peer.id, "offer", peer.attempt, peer.mode, conn)
            return
        raw = body.get("attempt")
        if not (isinstance(raw, list) and len(raw) == 2):
            log.warning("malformed %s from %s ignored", kind, sender)
            return
        attempt = (str(raw[0]), int(raw[1]))
        if kind == "offer" and not peer.controlling:
            self._on_offer(peer, attempt, body)
        elif kind == "answer" and peer.controlling:
            conn = peer.negotiating
            if conn is None or attempt != peer.attempt or conn.remote_username is not None:
                return  # stale or duplicate answer
            if peer.retry is not None:
                peer.retry.cancel()
                peer.retry = None
            self._spawn(peer, self._connect(peer, conn, peer.mode, body))

    def _on_rendezvous_connected(self, sessions: int) -> None:
        """A reconnect to the rendezvous: what was sent on the broken
        connection may be lost, so repeat what is still pending: offers
        nobody answered yet and requests for an offer."""
        if sessions == 1 or self._closed:
            return  # the first connection carries what open() queued
        now = self._loop.time()
        for peer in self._peers.values():
            # The client's outbox keeps one message per peer: an ICE restart
            # request sent meanwhile may have replaced the moved note.
            if peer.moved_note is not None and now - peer.moved_note[1] < MOVED_NOTE_TTL_S:
                if self._rendezvous is not None:
                    self._rendezvous.send(peer.id, peer.moved_note[0])
            conn = peer.negotiating
            if peer.controlling and conn is not None and conn.remote_username is None:
                if peer.attempt is not None and conn.local_candidates:
                    self._signal(peer.id, "offer", peer.attempt, peer.mode, conn)
            elif not peer.controlling and peer.retry is not None:
                self._ask_restart(peer, force=True)

    # ------------------------------------------------------------ plumbing

    def _on_data(self, data: bytes, conn: Any) -> None:
        if self._deliver is not None:
            self._deliver(data, conn)

    def _spawn(self, peer: _Peer, coro: Any) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)
        peer.tasks.add(task)
        task.add_done_callback(peer.tasks.discard)


def _literal(host: str) -> bool:
    """Whether ``host`` is an IP address (a name would need a blocking lookup)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _nominated(conn: _DataConnection | None) -> Any:
    return None if conn is None else conn._nominated.get(1)


def _pair_kind(conn: _DataConnection) -> str:
    """``relay`` if either end of the nominated pair is a TURN relay, else
    ``srflx`` if either is NAT-reflexive, else ``host``."""
    pair = conn._nominated.get(1)
    if pair is None:
        return "none"
    kinds = {pair.local_candidate.type, pair.remote_candidate.type}
    if "relay" in kinds:
        return "relay"
    if kinds & {"srflx", "prflx"}:
        return "srflx"
    return "host"


__all__ = ["DIRECT", "RELAY", "IceReach"]
