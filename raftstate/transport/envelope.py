"""The session handshake and the per-node secure channel (sans-IO).

Theory of operation
-------------------
Each node process keeps one :class:`Handshake` per configured peer. At
creation it draws a local *offer*: an 8-byte session id, an ephemeral X25519
key pair, and the process start time ``stamp_ns`` (passed in, never read from
a clock). The offer is fixed for the life of the process, so a HELLO for a
given state is byte-identical and resending it is idempotent; a restarted
process draws a new offer, which is how peers detect the restart.

A HELLO carries the sender's offer, the session id it holds for the receiver
(``echo``, zeros if none) and an ACK_REQUESTED flag, MACed with the pair key.
A session is fully determined by the two offers (see the key schedule in
:mod:`raftstate.transport.crypto`), so there is nothing to negotiate and a
simultaneous open cannot yield two sessions: both sides derive the same one.
On an authentic HELLO from peer P:

1. Same session id as the held peer offer: nothing to install (a resend or a
   reply); a different stamp or key under that id is ``bad_hello``.
2. New session id: accepted only if its ``stamp_ns`` is *later* than the held
   offer's (as WireGuard §5.1 uses its timestamp), else ``stale_hello``, so a
   replayed HELLO of an earlier process cannot displace the live session.
   Accepting derives a new :class:`Session` that replaces the old one; the
   old session's tags are forgotten and its datagrams drop as
   ``unknown_session``.
3. ``echo`` equal to our session id means P holds our offer, hence the same
   session: we are *confirmed* (an authentic DATA packet also confirms).
4. Reply with our HELLO if P lacks our offer (``echo`` differs) or asked
   (ACK_REQUESTED, set while unconfirmed).

Typical open (x, y are session ids)::

    X -> Y  HELLO(x, echo=0, ack)      Y installs (x,y), replies
    Y -> X  HELLO(y, echo=x, ack)      X installs (x,y), confirmed, replies
    X -> Y  HELLO(x, echo=y)           Y confirmed; nothing further

Once both sides are confirmed, any HELLO draws at most one reply, which draws
none. The driver resends :meth:`Handshake.hello` with backoff while
:attr:`Handshake.needs_hello`; lost HELLOs only delay convergence.

Limits: a restarted node whose wall clock went back behind its previous start
is refused (``stale_hello``) by peers holding the old session until its clock
passes that start. Without :class:`NodeIdentity`, any holder of the cluster
secret can speak for any member.

The HELLO wire layout is in :mod:`raftstate.transport.crypto`.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from raftstate.errors import ConfigError
from raftstate.transport.crypto import (
    DEFAULT_REPLAY_WINDOW,
    KEY_SIZE,
    MAX_DATAGRAM,
    NODE_ID_SIZE,
    OVERHEAD,
    SESSION_ID_SIZE,
    TAG_SIZE,
    TYPE_DATA,
    TYPE_HELLO,
    UNAUTHENTICATED_DROPS,
    WIRE_VERSION,
    DropReason,
    NodeIdentity,
    NoSession,
    Offer,
    Session,
    UnknownPeer,
    derive_pair_key,
    derive_psk,
    derive_session_keys,
    encode_node_id,
)

RandomBytes = Callable[[int], bytes]

FLAG_ACK_REQUESTED = 0x01
_HELLO_BODY = struct.Struct(f">BBBB{NODE_ID_SIZE}s{NODE_ID_SIZE}s8sQ8s32s")
MAC_SIZE = 32
HELLO_SIZE = _HELLO_BODY.size + MAC_SIZE
_SENDER = slice(4, 4 + NODE_ID_SIZE)
_RECEIVER = slice(4 + NODE_ID_SIZE, 4 + 2 * NODE_ID_SIZE)
_NO_SESSION = bytes(SESSION_ID_SIZE)


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What one incoming HELLO did. ``reply`` goes back to the peer;
    ``session`` is set when the HELLO installed a new session, and
    ``replaced`` is the session it displaced. ``drop``/``detail`` say why a
    HELLO was rejected; ``detail`` is a log line for the driver to rate-limit."""

    reply: bytes | None = None
    session: Session | None = None
    replaced: Session | None = None
    drop: DropReason | None = None
    detail: str = ""


class Handshake:
    """Handshake state with one peer, for the life of this process (see the
    module docstring). Pure and deterministic given ``random_bytes``; not
    thread-safe."""

    def __init__(
        self,
        local_id: str,
        peer_id: str,
        pair_key: bytes,
        *,
        stamp_ns: int,
        random_bytes: RandomBytes = os.urandom,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        """Raises :class:`ConfigError` for a bad node id, ``stamp_ns`` outside
        1..2**64-1, or a ``random_bytes`` that returns the wrong length."""
        self.local_id = local_id
        self.peer_id = peer_id
        self._peer_wire = encode_node_id(peer_id)
        if not 0 < stamp_ns < 1 << 64:
            raise ConfigError(f"now: start time {stamp_ns} ns is out of range")
        session_id = _NO_SESSION
        while session_id == _NO_SESSION:
            session_id = _draw(random_bytes, SESSION_ID_SIZE)
        self._ephemeral = X25519PrivateKey.from_private_bytes(_draw(random_bytes, KEY_SIZE))
        public = self._ephemeral.public_key().public_bytes_raw()
        self.offer = Offer(encode_node_id(local_id), session_id, stamp_ns, public)
        self._pair_key = pair_key
        self._replay_window = replay_window
        self._peer: Offer | None = None
        #: The current session with the peer, once a peer offer is held.
        self.session: Session | None = None
        #: True once the peer is known to hold our offer (same session).
        self.confirmed = False

    @property
    def needs_hello(self) -> bool:
        """Whether the driver should (re)send :meth:`hello` to the peer."""
        return not self.confirmed

    def hello(self) -> bytes:
        """Our HELLO for the current state. Same bytes until the state
        changes, so sending it again is always safe."""
        flags = 0 if self.confirmed else FLAG_ACK_REQUESTED
        o = self.offer
        echo = self._peer.session_id if self._peer is not None else _NO_SESSION
        body = _HELLO_BODY.pack(
            WIRE_VERSION, TYPE_HELLO, flags, 0, o.node_id, self._peer_wire,
            o.session_id, o.stamp_ns, echo, o.public_key,
        )  # fmt: skip
        return body + hmac.digest(self._pair_key, body, sha256)

    def confirm(self) -> None:
        """Record that an authentic DATA packet arrived under :attr:`session`."""
        if self.session is not None:
            self.confirmed = True

    def receive(self, datagram: bytes) -> HandshakeResult:
        """Process one HELLO datagram from the network. Never raises."""
        if len(datagram) != HELLO_SIZE or datagram[:2] != bytes((WIRE_VERSION, TYPE_HELLO)):
            return HandshakeResult(drop=DropReason.MALFORMED)
        if datagram[_SENDER] != self._peer_wire or datagram[_RECEIVER] != self.offer.node_id:
            return HandshakeResult(
                drop=DropReason.UNKNOWN_PEER, detail=_misrouted(datagram, self.local_id)
            )
        body, mac = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
        if not hmac.compare_digest(mac, hmac.digest(self._pair_key, body, sha256)):
            return HandshakeResult(
                drop=DropReason.BAD_MAC,
                detail=f"bad MAC on HELLO from {self.peer_id!r}: "
                "wrong cluster_secret (or node key)?",
            )
        # Authentic from here on.
        _, _, flags, reserved, _, _, sid, stamp, echo, public = _HELLO_BODY.unpack(body)
        if flags & ~FLAG_ACK_REQUESTED or reserved or sid == _NO_SESSION or stamp == 0:
            return self._bad(f"HELLO from {self.peer_id!r} has reserved bits or a zero id")
        offer = Offer(self._peer_wire, sid, stamp, public)
        new: Session | None = None
        replaced: Session | None = None
        held = self._peer
        if held is not None and sid == held.session_id:
            if offer != held:
                return self._bad(f"HELLO from {self.peer_id!r} reuses a session id")
        elif held is not None and stamp <= held.stamp_ns:
            return HandshakeResult(
                drop=DropReason.STALE_HELLO,
                detail=f"stale HELLO from {self.peer_id!r}: it started no later than the "
                "current session (a replay, or its clock went back)",
            )
        else:
            try:
                keys = derive_session_keys(self._pair_key, self._ephemeral, self.offer, offer)
            except ValueError:
                return self._bad(f"HELLO from {self.peer_id!r} has an unusable X25519 key")
            replaced = self.session
            new = Session(
                self.peer_id, keys, local_session_id=self.offer.session_id,
                peer_session_id=sid, replay_window=self._replay_window,
            )  # fmt: skip
            self._peer, self.session, self.confirmed = offer, new, False
        if echo == self.offer.session_id:
            self.confirmed = True
        wants_reply = echo != self.offer.session_id or flags & FLAG_ACK_REQUESTED
        return HandshakeResult(
            reply=self.hello() if wants_reply else None, session=new, replaced=replaced
        )

    def _bad(self, detail: str) -> HandshakeResult:
        return HandshakeResult(drop=DropReason.BAD_HELLO, detail=detail)


@dataclass(frozen=True, slots=True)
class Delivered:
    """An authentic, fresh DATA payload from ``peer_id`` (may be empty)."""

    peer_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class HandshakeEvent:
    """An authentic HELLO from ``peer_id`` was processed. Send ``reply`` (if
    any) to the peer. ``established``: a new session was installed;
    ``replaced``: it displaced an older one (the peer restarted)."""

    peer_id: str
    reply: bytes | None
    established: bool
    replaced: bool


@dataclass(frozen=True, slots=True)
class Dropped:
    """A datagram was dropped. ``peer_id`` is set only when authenticated or
    matched to a session; ``detail`` is a log line (empty for routine drops)."""

    reason: DropReason
    peer_id: str | None = None
    detail: str = ""


Received = Delivered | HandshakeEvent | Dropped


@dataclass(frozen=True, slots=True)
class ChannelMetrics:
    """Counters since the channel was created."""

    sealed: int = 0
    delivered: int = 0
    sessions_established: int = 0
    sessions_replaced: int = 0
    drops: Mapping[DropReason, int] = field(default_factory=dict)

    @property
    def dropped_unauthenticated(self) -> int:
        """Datagrams dropped before they were authenticated."""
        return sum(n for r, n in self.drops.items() if r in UNAUTHENTICATED_DROPS)


class SecureChannel:
    """All secure-transport state of one local node: a :class:`Handshake`
    per configured peer and a routing table from receiver tags to sessions.

    Routes each raw datagram by its type byte to the handshake or to a
    session, reading only fixed-size header fields before authentication.
    Pure and deterministic given ``now`` and ``random_bytes``; not
    thread-safe (use it from the transport's event loop)."""

    def __init__(
        self,
        node_id: str,
        peers: Iterable[str],
        cluster_secret: str,
        *,
        now: float,
        random_bytes: RandomBytes = os.urandom,
        identity: NodeIdentity | None = None,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        """``now`` is this process's start time (Unix seconds): peers accept a
        restarted process only if it is later than the previous one's.
        ``random_bytes`` must be a CSPRNG; inject a seeded one only in tests.

        Raises :class:`ConfigError` for a short secret, bad or duplicate node
        ids, a peer equal to ``node_id``, or a missing peer public key."""
        psk = derive_psk(cluster_secret)
        local_wire = encode_node_id(node_id)
        stamp_ns = round(now * 1_000_000_000)
        self.node_id = node_id
        self._handshakes: dict[str, Handshake] = {}
        self._by_wire: dict[bytes, Handshake] = {}
        for peer_id in peers:
            peer_wire = encode_node_id(peer_id)
            if peer_id == node_id or peer_id in self._handshakes:
                raise ConfigError(f"peers: {peer_id!r} is this node or listed twice")
            shared = identity.shared_with(peer_id) if identity is not None else b""
            hs = Handshake(
                node_id, peer_id, derive_pair_key(psk, local_wire, peer_wire, shared),
                stamp_ns=stamp_ns, random_bytes=random_bytes, replay_window=replay_window,
            )  # fmt: skip
            self._handshakes[peer_id] = hs
            self._by_wire[peer_wire] = hs
        self._by_tag: dict[bytes, Handshake] = {}
        self._sealed = 0
        self._delivered = 0
        self._established = 0
        self._replaced = 0
        self._drops: Counter[DropReason] = Counter()

    @property
    def peers(self) -> tuple[str, ...]:
        """The configured peer ids."""
        return tuple(self._handshakes)

    @staticmethod
    def max_payload(datagram_size: int = MAX_DATAGRAM) -> int:
        """Largest payload whose sealed datagram fits ``datagram_size`` bytes."""
        return datagram_size - OVERHEAD

    def handshake(self, peer_id: str) -> Handshake:
        """The handshake state for ``peer_id``. Raises :class:`UnknownPeer`."""
        hs = self._handshakes.get(peer_id)
        if hs is None:
            raise UnknownPeer(f"{peer_id!r} is not a configured peer of {self.node_id!r}")
        return hs

    def session(self, peer_id: str) -> Session | None:
        """The current session with ``peer_id``, if any. Raises :class:`UnknownPeer`."""
        return self.handshake(peer_id).session

    def hello(self, peer_id: str) -> bytes:
        """A HELLO to send to ``peer_id`` (idempotent). Raises :class:`UnknownPeer`."""
        return self.handshake(peer_id).hello()

    def hellos_due(self) -> list[tuple[str, bytes]]:
        """``(peer_id, HELLO)`` for every peer whose handshake is unconfirmed;
        the driver sends these at start and resends them with backoff."""
        return [(p, hs.hello()) for p, hs in self._handshakes.items() if hs.needs_hello]

    def seal(self, peer_id: str, payload: bytes) -> bytes:
        """``payload`` sealed for the current session with ``peer_id``.

        Raises :class:`UnknownPeer`, :class:`NoSession` (send :meth:`hello`
        and retry later) or ``SessionExhausted``."""
        session = self.handshake(peer_id).session
        if session is None:
            raise NoSession(f"no session with {peer_id!r} yet")
        datagram = session.seal(payload)
        self._sealed += 1
        return datagram

    def receive(self, datagram: bytes) -> Received:
        """Route and process one datagram from the network. Never raises."""
        kind = datagram[1] if len(datagram) >= 2 and datagram[0] == WIRE_VERSION else None
        if kind == TYPE_DATA:
            return self._receive_data(datagram)
        if kind == TYPE_HELLO:
            return self._receive_hello(datagram)
        return self._drop(DropReason.MALFORMED)

    def metrics(self) -> ChannelMetrics:
        """A snapshot of the counters."""
        return ChannelMetrics(
            sealed=self._sealed,
            delivered=self._delivered,
            sessions_established=self._established,
            sessions_replaced=self._replaced,
            drops=dict(self._drops),
        )

    def _receive_data(self, datagram: bytes) -> Received:
        if len(datagram) < OVERHEAD:
            return self._drop(DropReason.MALFORMED)
        hs = self._by_tag.get(datagram[2 : 2 + TAG_SIZE])
        if hs is None or hs.session is None:
            return self._drop(DropReason.UNKNOWN_SESSION)
        result = hs.session.try_open(datagram)
        if isinstance(result, DropReason):
            return self._drop(result, hs.peer_id)
        hs.confirm()
        self._delivered += 1
        return Delivered(hs.peer_id, result)

    def _receive_hello(self, datagram: bytes) -> Received:
        if len(datagram) != HELLO_SIZE:
            return self._drop(DropReason.MALFORMED)
        hs = self._by_wire.get(datagram[_SENDER])
        if hs is None:
            return self._drop(DropReason.UNKNOWN_PEER, detail=_misrouted(datagram, self.node_id))
        result = hs.receive(datagram)
        if result.drop is not None:
            authentic = result.drop not in UNAUTHENTICATED_DROPS
            return self._drop(result.drop, hs.peer_id if authentic else None, result.detail)
        if result.session is not None:
            self._established += 1
            if result.replaced is not None:
                self._replaced += 1
                self._by_tag.pop(result.replaced.recv_tag, None)
            self._by_tag[result.session.recv_tag] = hs
        return HandshakeEvent(
            hs.peer_id, result.reply, result.session is not None, result.replaced is not None
        )

    def _drop(self, reason: DropReason, peer_id: str | None = None, detail: str = "") -> Dropped:
        self._drops[reason] += 1
        return Dropped(reason, peer_id, detail)


def _draw(random_bytes: RandomBytes, n: int) -> bytes:
    data = random_bytes(n)
    if len(data) != n:
        raise ConfigError(f"random_bytes: returned {len(data)} bytes, wanted {n}")
    return bytes(data)


def _misrouted(datagram: bytes, local_id: str) -> str:
    # Unauthenticated bytes: shown only through repr(), never decoded.
    sender = datagram[_SENDER].rstrip(b"\x00")
    receiver = datagram[_RECEIVER].rstrip(b"\x00")
    if receiver != local_id.encode("ascii"):
        return f"HELLO for {receiver!r} reached {local_id!r}: stale peer address?"
    return f"HELLO from {sender!r}, which is not a configured peer of {local_id!r}"
