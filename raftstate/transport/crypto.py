"""Transport crypto: key schedule, replay window and the data-session AEAD.

Theory of operation
-------------------
Every datagram between two Raft nodes is either a handshake HELLO (see
:mod:`raftstate.transport.envelope`) or a DATA packet sealed under a
:class:`Session`. This module holds the pieces that do not depend on the
handshake state machine. Nothing here does I/O, reads a clock or calls the
global ``random``.

**Key schedule** (HKDF-SHA256, RFC 5869). The labels are part of wire version 1
and never change within it::

    psk      = HKDF(salt=LABEL_PSK_SALT, ikm=utf8(cluster_secret),
                    info=LABEL_PSK, L=32)
    pair_key = HKDF(salt=psk, ikm=X25519(s_self, s_peer) or b"",
                    info=LABEL_PAIR || id_a || id_b, L=32)
    okm      = HKDF(salt=pair_key, ikm=X25519(e_self, e_peer),
                    info=LABEL_SESSION || transcript, L=80)
    k_ab, k_ba, tag_ab, tag_ba = okm[0:32], okm[32:64], okm[64:72], okm[72:80]

``id_a``/``id_b`` are the two 64-byte node-id fields in bytewise order ("a" is
the smaller id), so both ends compute the same values; ``k_ab`` seals what
``a`` sends to ``b``. ``s`` are optional static node keys (per-node identity:
without them every member holding the cluster secret can speak for every
other; with them only the two nodes of a pair can). ``e`` are per-process
ephemeral keys, so each pair of node *processes* gets fresh keys and a
restarted process can never reuse a nonce. ``transcript`` binds both node ids,
session ids, start stamps and ephemeral public keys.

**DATA packets** (:class:`Session`): an 18-byte header, then the
ChaCha20-Poly1305 (RFC 8439) ciphertext and 16-byte tag, with the header as
associated data::

    0  u8   version (1)
    1  u8   type (2 = DATA)
    2  8B   session tag of the *receiving* direction (tag_ab or tag_ba)
    10 u64  packet number, big-endian
    18 ...  ciphertext || 16-byte Poly1305 tag

The nonce is ``4 zero bytes || packet number`` under a per-direction key, and
packet numbers start at 0 and strictly increase, so a (key, nonce) pair is
never reused; :meth:`Session.seal` refuses past :data:`MAX_PACKET_NUMBER`.
The receiver parses only this fixed header before authentication: it finds
the session by tag, checks the packet number against the replay window
(RFC 4303 §3.4.3: check before, update after the integrity check), and only
then decrypts. Nothing from the network is decoded beyond that header until
the AEAD tag verifies.

**HELLO** (:mod:`raftstate.transport.envelope` has the state machine). 220
bytes; only the fixed node-id fields are read before the MAC verifies::

    0   u8   version (1)          1   u8  type (1 = HELLO)
    2   u8   flags (bit 0: ACK_REQUESTED; others 0)
    3   u8   reserved (0)
    4   64B  sender node id, NUL-padded ASCII
    68  64B  receiver node id, NUL-padded ASCII
    132 8B   sender session id      140 u64 sender stamp_ns (big-endian)
    148 8B   echo: receiver's session id as held by sender, or zeros
    156 32B  sender ephemeral X25519 public key
    188 32B  HMAC-SHA256(pair_key, bytes 0..187)
"""

from __future__ import annotations

import enum
import re
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftstate.errors import ConfigError, RaftStateError

WIRE_VERSION = 1
TYPE_HELLO = 1
TYPE_DATA = 2

LABEL_PSK_SALT = b"raftstate/transport/v1"
LABEL_PSK = b"raftstate/transport/v1 cluster psk"
LABEL_PAIR = b"raftstate/transport/v1 pair key"
LABEL_SESSION = b"raftstate/transport/v1 session keys"

NODE_ID_SIZE = 64
SESSION_ID_SIZE = 8
TAG_SIZE = 8
KEY_SIZE = 32
AEAD_TAG_SIZE = 16
DATA_HEADER_SIZE = 2 + TAG_SIZE + 8
#: Bytes a sealed DATA datagram adds to its payload (header + Poly1305 tag).
OVERHEAD = DATA_HEADER_SIZE + AEAD_TAG_SIZE
#: Datagram size the transport targets (see DESIGN.md, "The UDP transport").
MAX_DATAGRAM = 1200
#: Largest payload that fits one :data:`MAX_DATAGRAM`-byte DATA datagram.
MAX_PAYLOAD = MAX_DATAGRAM - OVERHEAD
#: Packet numbers at or above this are never sealed nor accepted.
MAX_PACKET_NUMBER = 1 << 62
MIN_SECRET_LENGTH = 16
DEFAULT_REPLAY_WINDOW = 1024

_DATA_HEADER = struct.Struct(">BB8sQ")
_DATA_PREFIX = bytes((WIRE_VERSION, TYPE_DATA))
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TransportError(RaftStateError):
    """Root of the transport's errors. Peers are unreachable while one
    persists, so they travel as UNAVAILABLE."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class NoSession(TransportError):
    """There is no established session with the peer yet (or any more): the
    driver sends the peer a HELLO and retries."""


class SessionExhausted(TransportError):
    """The session has sealed :data:`MAX_PACKET_NUMBER` packets; its nonces are
    used up. The driver must start a new session (a new channel)."""


class UnknownPeer(TransportError):
    """The node id is not one of this channel's configured peers."""

    retriable = False


class DropReason(enum.StrEnum):
    """Why a datagram was dropped. All but the last two are decided before
    the datagram is authenticated."""

    MALFORMED = "malformed"  # wrong size, version, type or reserved bits
    UNKNOWN_SESSION = "unknown_session"  # DATA for no current session
    BAD_TAG = "bad_tag"  # AEAD authentication failed
    REPLAY = "replay"  # packet number already accepted
    TOO_OLD = "too_old"  # packet number below the replay window
    UNKNOWN_PEER = "unknown_peer"  # HELLO from a non-peer, or not addressed to us
    BAD_MAC = "bad_mac"  # HELLO MAC failed: wrong cluster_secret or node key
    STALE_HELLO = "stale_hello"  # authentic HELLO older than the current session
    BAD_HELLO = "bad_hello"  # authentic HELLO that contradicts itself


#: Drop reasons decided before authentication succeeded.
UNAUTHENTICATED_DROPS = frozenset(DropReason) - {DropReason.STALE_HELLO, DropReason.BAD_HELLO}


def encode_node_id(node_id: str) -> bytes:
    """The 64-byte, NUL-padded wire form of ``node_id``.

    Raises :class:`ConfigError` unless ``node_id`` is 1-64 characters from
    ``[A-Za-z0-9._-]`` (the rule ``NodeConfig.validate`` applies)."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ConfigError(f"node_id: {node_id!r} must be 1-64 characters from [A-Za-z0-9._-]")
    return node_id.encode("ascii").ljust(NODE_ID_SIZE, b"\x00")


def derive_psk(cluster_secret: str) -> bytes:
    """The 32-byte cluster PSK for ``cluster_secret``.

    Raises :class:`ConfigError` if the secret is not a string of at least
    :data:`MIN_SECRET_LENGTH` characters."""
    if not isinstance(cluster_secret, str) or len(cluster_secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"cluster_secret: must be at least {MIN_SECRET_LENGTH} characters")
    return _hkdf(LABEL_PSK_SALT, cluster_secret.encode("utf-8"), LABEL_PSK, KEY_SIZE)


def derive_pair_key(psk: bytes, id_a: bytes, id_b: bytes, static_shared: bytes = b"") -> bytes:
    """The key that MACs HELLOs between two nodes and salts their sessions.

    ``id_a``/``id_b`` are wire node ids in either order (they are sorted
    here). ``static_shared`` is X25519(own static key, peer static key) when
    node identities are configured, else empty."""
    lo, hi = sorted((id_a, id_b))
    return _hkdf(psk, static_shared, LABEL_PAIR + lo + hi, KEY_SIZE)


@dataclass(frozen=True, slots=True)
class Offer:
    """The public half of one side's handshake state: who, which process
    (``session_id`` and ``stamp_ns``, the process's start time) and its
    ephemeral X25519 public key. Sent in every HELLO."""

    node_id: bytes
    session_id: bytes
    stamp_ns: int
    public_key: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Per-direction AEAD keys and receiver tags for one session."""

    send_key: bytes
    recv_key: bytes
    send_tag: bytes
    recv_tag: bytes


def derive_session_keys(
    pair_key: bytes, ephemeral: X25519PrivateKey, local: Offer, peer: Offer
) -> SessionKeys:
    """Both directions' keys for the session between ``local`` and ``peer``.

    Raises ``ValueError`` if the peer's public key is a low-order point (the
    shared secret would be all zeros)."""
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(peer.public_key))
    a, b = (local, peer) if local.node_id < peer.node_id else (peer, local)
    transcript = b"".join(
        (a.node_id, b.node_id, a.session_id, b.session_id,
         a.stamp_ns.to_bytes(8, "big"), b.stamp_ns.to_bytes(8, "big"),
         a.public_key, b.public_key)
    )  # fmt: skip
    okm = _hkdf(pair_key, shared, LABEL_SESSION + transcript, 2 * KEY_SIZE + 2 * TAG_SIZE)
    k_ab, k_ba = okm[:KEY_SIZE], okm[KEY_SIZE : 2 * KEY_SIZE]
    tag_ab, tag_ba = okm[2 * KEY_SIZE : 2 * KEY_SIZE + TAG_SIZE], okm[2 * KEY_SIZE + TAG_SIZE :]
    if a is local:
        return SessionKeys(send_key=k_ab, recv_key=k_ba, send_tag=tag_ab, recv_tag=tag_ba)
    return SessionKeys(send_key=k_ba, recv_key=k_ab, send_tag=tag_ba, recv_tag=tag_ab)


class ReplayWindow:
    """Sliding anti-replay window over packet numbers (RFC 4303 §3.4.3,
    WireGuard §5.4.6).

    Accepts each packet number at most once, accepts any number above the
    highest seen so far, and rejects numbers at or below ``highest - size``.
    Use :meth:`check` before authenticating a packet and :meth:`accept` only
    after, so forged packets cannot move the window. Not thread-safe."""

    __slots__ = ("_bits", "_highest", "_mask", "size")

    def __init__(self, size: int = DEFAULT_REPLAY_WINDOW) -> None:
        if size < 1:
            raise ConfigError(f"replay_window: must be positive, got {size}")
        self.size = size
        self._mask = (1 << size) - 1
        self._highest = -1
        # Bit i set <=> packet number (highest - i) was accepted.
        self._bits = 0

    @property
    def highest(self) -> int:
        """Highest packet number accepted so far, or -1."""
        return self._highest

    def check(self, pn: int) -> DropReason | None:
        """``None`` if ``pn`` would be accepted, else why not. No side effects."""
        if pn < 0 or pn >= MAX_PACKET_NUMBER:
            return DropReason.MALFORMED
        if pn > self._highest:
            return None
        offset = self._highest - pn
        if offset >= self.size:
            return DropReason.TOO_OLD
        if self._bits >> offset & 1:
            return DropReason.REPLAY
        return None

    def accept(self, pn: int) -> bool:
        """Record ``pn`` as seen. Returns ``False`` (and records nothing) if
        :meth:`check` would reject it."""
        if self.check(pn) is not None:
            return False
        if pn > self._highest:
            shift = pn - self._highest
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self._highest = pn
        else:
            self._bits |= 1 << (self._highest - pn)
        return True


class Session:
    """An established session with one peer process: seals DATA packets to it
    and opens DATA packets from it.

    Created by the handshake (:class:`~raftstate.transport.envelope.Handshake`).
    Not thread-safe: one thread (the transport's event loop) uses it."""

    def __init__(
        self,
        peer_id: str,
        keys: SessionKeys,
        *,
        local_session_id: bytes,
        peer_session_id: bytes,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        self.peer_id = peer_id
        self.local_session_id = local_session_id
        self.peer_session_id = peer_session_id
        self.send_tag = keys.send_tag
        self.recv_tag = keys.recv_tag
        self._sealer = ChaCha20Poly1305(keys.send_key)
        self._opener = ChaCha20Poly1305(keys.recv_key)
        self._next_pn = 0
        self._window = ReplayWindow(replay_window)
        self.packets_opened = 0
        #: Datagrams :meth:`open` dropped, by reason.
        self.drops: Counter[DropReason] = Counter()

    @property
    def next_packet_number(self) -> int:
        """The packet number the next :meth:`seal` uses."""
        return self._next_pn

    def seal(self, payload: bytes) -> bytes:
        """Encrypt and authenticate ``payload`` as one DATA datagram of
        ``len(payload) + OVERHEAD`` bytes.

        Raises :class:`SessionExhausted` once :data:`MAX_PACKET_NUMBER`
        packets were sealed. The caller keeps datagrams within
        :data:`MAX_DATAGRAM` (payload at most :data:`MAX_PAYLOAD`)."""
        pn = self._next_pn
        if pn >= MAX_PACKET_NUMBER:
            raise SessionExhausted(f"session with {self.peer_id!r} used all packet numbers")
        self._next_pn = pn + 1
        header = _DATA_HEADER.pack(WIRE_VERSION, TYPE_DATA, self.send_tag, pn)
        pn_bytes = header[DATA_HEADER_SIZE - 8 :]
        return header + self._sealer.encrypt(_NONCE_PREFIX + pn_bytes, payload, header)

    def try_open(self, datagram: bytes) -> bytes | DropReason:
        """The payload of an authentic, fresh DATA datagram, else why it was
        dropped. Only the fixed header is read before the AEAD tag verifies;
        the replay window moves only for authentic packets. Never raises."""
        if len(datagram) < OVERHEAD or datagram[:2] != _DATA_PREFIX:
            return DropReason.MALFORMED
        if datagram[2 : 2 + TAG_SIZE] != self.recv_tag:
            return DropReason.UNKNOWN_SESSION
        header = datagram[:DATA_HEADER_SIZE]
        pn = int.from_bytes(header[DATA_HEADER_SIZE - 8 :], "big")
        refused = self._window.check(pn)
        if refused is not None:
            return refused
        nonce = _NONCE_PREFIX + header[DATA_HEADER_SIZE - 8 :]
        try:
            payload = self._opener.decrypt(nonce, datagram[DATA_HEADER_SIZE:], header)
        except InvalidTag:
            return DropReason.BAD_TAG
        self._window.accept(pn)
        self.packets_opened += 1
        return payload

    def open(self, datagram: bytes) -> bytes | None:
        """The payload of an authentic, fresh DATA datagram, or ``None`` if it
        was dropped (counted in :attr:`drops`). Never raises."""
        result = self.try_open(datagram)
        if isinstance(result, DropReason):
            self.drops[result] += 1
            return None
        return result


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Optional per-node identity: this node's static X25519 private key and
    every peer's static public key (32 raw bytes each). With it, a HELLO is
    MACed under a key only the two nodes of the pair can compute, so a member
    that knows the cluster secret cannot impersonate another member."""

    private_key: bytes
    peer_public_keys: Mapping[str, bytes]

    @staticmethod
    def public_key_of(private_key: bytes) -> bytes:
        """The raw public key to distribute for ``private_key``.

        Raises :class:`ConfigError` if it is not 32 bytes."""
        return _static_key(private_key).public_key().public_bytes_raw()

    def shared_with(self, peer_id: str) -> bytes:
        """X25519(own static key, ``peer_id``'s static key).

        Raises :class:`ConfigError` if the peer's key is missing or unusable."""
        public = self.peer_public_keys.get(peer_id)
        if public is None or len(public) != KEY_SIZE:
            raise ConfigError(f"peer_public_keys: no 32-byte public key for peer {peer_id!r}")
        try:
            return _static_key(self.private_key).exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:
            raise ConfigError(f"peer_public_keys: key of {peer_id!r} is unusable") from exc


def _static_key(private_key: bytes) -> X25519PrivateKey:
    if len(private_key) != KEY_SIZE:
        raise ConfigError("private_key: must be 32 raw bytes")
    return X25519PrivateKey.from_private_bytes(private_key)


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
