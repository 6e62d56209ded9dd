"""Wire protocol of the ICE rendezvous service (sans-IO).

Theory of operation
-------------------
Nodes behind NATs dial one rendezvous server over TCP and trade ICE candidate
offers/answers through it (DESIGN.md, "The UDP transport", ice mode). This
module is everything in that protocol that is not I/O: framing, the key
schedule, the handshake, the sealed session, the message schema and the
server's hold store. It opens no socket, reads no clock and draws no random
numbers: nonces and ``now`` are arguments. :mod:`raftstate.transport.rendezvous`
drives it.

**Framing.** A stream of ``u32 length (big-endian) || payload`` frames with
``1 <= length <= MAX_FRAME`` (64 KiB). Any other length ends the connection.

**Keys** (HKDF-SHA256, RFC 5869)::

    okm          = HKDF(salt=LABEL, ikm=utf8(rendezvous_secret), info=LABEL || b" keys", L=64)
    mac_key      = okm[0:32]    # handshake proofs (HMAC-SHA256)
    session_salt = okm[32:64]

**Handshake.** Both sides contribute a fresh 32-byte nonce, and each proves it
knows ``mac_key`` by MACing the *other* side's fresh nonce, so a recorded
handshake replays to neither side::

    C -> S  HELLO      MAGIC 0x01 || n_c
    S -> C  CHALLENGE  MAGIC 0x02 || n_s || HMAC(mac_key, b"server" || n_c || n_s)
    C -> S  AUTH       MAGIC 0x03 || HMAC(mac_key, b"client" || n_c || n_s || id) || id
    S -> C  sealed {"t": "welcome"}

The client checks the server's proof before it sends anything keyed (a
mismatch is almost always a wrong ``rendezvous_secret``). The claimed node ``id``
(1-64 characters of ``[A-Za-z0-9._-]``) travels in clear but is covered by the
client's proof and bound into the session keys::

    k_c2s || k_s2c = HKDF(salt=session_salt, ikm=n_c || n_s,
                          info=LABEL || b" session" || id, L=64)

**Sealed frames.** After AUTH every frame in both directions is
``u64 counter || ChaCha20-Poly1305(k_dir, nonce=0^4 || counter, plaintext,
aad=counter)`` (RFC 8439). Counters start at 0 in each direction. TCP delivers
in order, so the counter must be exactly the next one: anything else is a
replay, a reordering or an attack, and ends the connection. Nothing is
JSON-decoded before the tag verifies.

**Messages** (sealed plaintext, a UTF-8 JSON object)::

    {"t": "msg", "to": ID, "from": ID, "body": {...}}   relay; the server checks
                                                        "from" and forwards the bytes
    {"t": "ping"} / {"t": "pong"}                       keepalive (client asks)
    {"t": "welcome"}                                    server: session accepted

**Hold store.** :class:`HeldMessages` keeps the latest undelivered relay per
``(from, to)`` until it expires, for delivery when ``to`` connects.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftstate.errors import ConfigError
from raftstate.transport.crypto import MIN_SECRET_LENGTH, TransportError

LABEL = b"raftstate rendezvous v1"
MAGIC = b"RZV1"
#: Largest frame payload, in bytes.
MAX_FRAME = 64 * 1024
NONCE_SIZE = 32
PROOF_SIZE = 32
COUNTER_SIZE = 8
AEAD_TAG_SIZE = 16
#: Largest sealed plaintext (one message).
MAX_PLAINTEXT = MAX_FRAME - COUNTER_SIZE - AEAD_TAG_SIZE

T_HELLO, T_CHALLENGE, T_AUTH = 1, 2, 3
_LENGTH = struct.Struct(">I")
_COUNTER = struct.Struct(">Q")
_MAX_COUNTER = (1 << 64) - 1
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HELLO_SIZE = len(MAGIC) + 1 + NONCE_SIZE
_CHALLENGE_SIZE = len(MAGIC) + 1 + NONCE_SIZE + PROOF_SIZE
#: Largest handshake frame (an AUTH with a 64-character node id).
MAX_HANDSHAKE_FRAME = len(MAGIC) + 1 + PROOF_SIZE + 64


class RendezvousError(TransportError):
    """Root of the rendezvous errors. The connection it arose on is closed."""


class ProtocolError(RendezvousError):
    """The peer sent something malformed, oversized, out of sequence or that
    failed the AEAD tag of an established session."""


class AuthenticationFailed(RendezvousError):
    """A handshake proof did not verify: the two sides hold different
    rendezvous secrets (or someone without the secret is on the line). Retriable only
    after the configuration is fixed."""


class InvalidMessage(RendezvousError, ValueError):
    """A message the caller asked to send is not acceptable (bad recipient,
    the sender itself, not JSON-serialisable or too large). Never retriable."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    retriable = False


def is_node_id(value: object) -> bool:
    """Whether ``value`` is a valid node id (1-64 characters of ``[A-Za-z0-9._-]``)."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


# ---- framing ------------------------------------------------------------------


def encode_frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix. Raises :class:`ProtocolError` if it
    is empty or longer than :data:`MAX_FRAME`."""
    if not 0 < len(payload) <= MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes is outside 1..{MAX_FRAME}")
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads. ``max_frame`` may be changed
    between feeds (a server keeps it small until the peer authenticates).
    Not thread-safe."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by ``data``, in order. Raises
        :class:`ProtocolError` on a length of 0 or above the maximum, before
        buffering that frame's body."""
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buf, pos)
            if not 0 < length <= self.max_frame:
                raise ProtocolError(f"frame length {length} is outside 1..{self.max_frame}")
            end = pos + _LENGTH.size + length
            if end > len(buf):
                break
            out.append(bytes(buf[pos + _LENGTH.size : end]))
            pos = end
        del buf[:pos]
        return out


# ---- keys, handshake and the sealed session -----------------------------------


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True, slots=True, repr=False)
class RendezvousKeys:
    """The long-term keys derived from the rendezvous secret (see the module
    doc). The rendezvous secret is separate from the cluster secret: the
    rendezvous host can authenticate nodes but not decrypt Raft traffic, and
    relayed bodies are sealed end to end (:mod:`raftstate.transport.signalseal`)."""

    mac_key: bytes
    session_salt: bytes

    @classmethod
    def from_secret(cls, rendezvous_secret: str) -> RendezvousKeys:
        """Raises :class:`ConfigError` (naming ``rendezvous_secret``) unless
        the secret is a string of at least 16 characters (strength is checked
        where it is configured)."""
        if not isinstance(rendezvous_secret, str) or len(rendezvous_secret) < MIN_SECRET_LENGTH:
            raise ConfigError(f"rendezvous_secret: must be at least {MIN_SECRET_LENGTH} characters")
        okm = _hkdf(LABEL, rendezvous_secret.encode("utf-8"), LABEL + b" keys", 64)
        return cls(mac_key=okm[:32], session_salt=okm[32:])

    def proof(self, role: bytes, *parts: bytes) -> bytes:
        return hmac.digest(self.mac_key, role + b"".join(parts), "sha256")

    def channel(self, n_c: bytes, n_s: bytes, node_id: str, *, server: bool) -> SealedChannel:
        okm = _hkdf(self.session_salt, n_c + n_s, LABEL + b" session" + node_id.encode(), 64)
        c2s, s2c = okm[:32], okm[32:]
        return SealedChannel(send_key=s2c, recv_key=c2s) if server else SealedChannel(c2s, s2c)


class SealedChannel:
    """One established connection's two directions: seals outgoing plaintexts
    and opens incoming sealed frames, each with its own counter. Not
    thread-safe (the event loop owns it)."""

    __slots__ = ("_opener", "_recv_counter", "_sealer", "_send_counter")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._sealer = ChaCha20Poly1305(send_key)
        self._opener = ChaCha20Poly1305(recv_key)
        self._send_counter = 0
        self._recv_counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        """The frame payload carrying ``plaintext``. Raises
        :class:`ProtocolError` if it exceeds :data:`MAX_PLAINTEXT` or the
        counter is exhausted."""
        if len(plaintext) > MAX_PLAINTEXT:
            raise ProtocolError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
        if self._send_counter >= _MAX_COUNTER:
            raise ProtocolError("send counter exhausted")
        header = _COUNTER.pack(self._send_counter)
        self._send_counter += 1
        return header + self._sealer.encrypt(b"\0\0\0\0" + header, plaintext, header)

    def open(self, payload: bytes) -> bytes:
        """The plaintext of the next sealed frame. Raises :class:`ProtocolError`
        if the counter is not exactly the next one or the tag fails."""
        if len(payload) < COUNTER_SIZE + AEAD_TAG_SIZE:
            raise ProtocolError(f"sealed frame of {len(payload)} bytes is too short")
        header = payload[:COUNTER_SIZE]
        (counter,) = _COUNTER.unpack(header)
        if counter != self._recv_counter:
            raise ProtocolError(f"frame counter {counter}, expected {self._recv_counter}")
        try:
            plaintext = self._opener.decrypt(b"\0\0\0\0" + header, payload[COUNTER_SIZE:], header)
        except InvalidTag:
            raise ProtocolError(f"frame {counter} failed authentication") from None
        self._recv_counter += 1
        return plaintext


def _expect(payload: bytes, kind: int, what: str) -> bytes:
    if payload[: len(MAGIC)] != MAGIC or len(payload) <= len(MAGIC):
        raise ProtocolError(f"expected a rendezvous {what}; not a rendezvous peer")
    if payload[len(MAGIC)] != kind:
        raise ProtocolError(f"expected a rendezvous {what}, got type {payload[len(MAGIC)]}")
    return payload[len(MAGIC) + 1 :]


class ClientHandshake:
    """The client's side of the handshake. Call :meth:`hello`, then
    :meth:`on_challenge` with the server's answer; after that only sealed
    frames flow (the first from the server is ``Control.WELCOME``)."""

    __slots__ = ("_keys", "_nonce", "node_id")

    def __init__(self, keys: RendezvousKeys, node_id: str, nonce: bytes) -> None:
        """``nonce``: 32 fresh random bytes. Raises ``ValueError`` for a bad
        node id or nonce."""
        if not is_node_id(node_id) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"node_id {node_id!r} or a nonce of {len(nonce)} bytes is invalid")
        self._keys = keys
        self.node_id = node_id
        self._nonce = bytes(nonce)

    def hello(self) -> bytes:
        return MAGIC + bytes((T_HELLO,)) + self._nonce

    def on_challenge(self, payload: bytes) -> tuple[bytes, SealedChannel]:
        """The AUTH payload to send and the session channel. Raises
        :class:`ProtocolError` if ``payload`` is no CHALLENGE, and
        :class:`AuthenticationFailed` if the server's proof is wrong."""
        rest = _expect(payload, T_CHALLENGE, "CHALLENGE")
        if len(payload) != _CHALLENGE_SIZE:
            raise ProtocolError(f"CHALLENGE of {len(payload)} bytes, expected {_CHALLENGE_SIZE}")
        n_s, proof = rest[:NONCE_SIZE], rest[NONCE_SIZE:]
        if not hmac.compare_digest(proof, self._keys.proof(b"server", self._nonce, n_s)):
            raise AuthenticationFailed("the server's proof did not verify")
        node = self.node_id.encode("ascii")
        mine = self._keys.proof(b"client", self._nonce, n_s, node)
        channel = self._keys.channel(self._nonce, n_s, self.node_id, server=False)
        return MAGIC + bytes((T_AUTH,)) + mine + node, channel


class ServerHandshake:
    """The server's side: :meth:`on_hello`, then :meth:`on_auth`."""

    __slots__ = ("_keys", "_n_c", "_nonce")

    def __init__(self, keys: RendezvousKeys, nonce: bytes) -> None:
        """``nonce``: 32 fresh random bytes (``ValueError`` otherwise)."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._keys = keys
        self._nonce = bytes(nonce)
        self._n_c: bytes | None = None

    def on_hello(self, payload: bytes) -> bytes:
        """The CHALLENGE payload to send. Raises :class:`ProtocolError`."""
        rest = _expect(payload, T_HELLO, "HELLO")
        if self._n_c is not None or len(payload) != _HELLO_SIZE:
            raise ProtocolError(f"HELLO of {len(payload)} bytes or out of sequence")
        self._n_c = rest
        proof = self._keys.proof(b"server", rest, self._nonce)
        return MAGIC + bytes((T_CHALLENGE,)) + self._nonce + proof

    def on_auth(self, payload: bytes) -> tuple[str, SealedChannel]:
        """The authenticated node id and the session channel. Raises
        :class:`ProtocolError` if malformed or out of sequence and
        :class:`AuthenticationFailed` if the client's proof is wrong."""
        rest = _expect(payload, T_AUTH, "AUTH")
        n_c = self._n_c
        if n_c is None:
            raise ProtocolError("AUTH before HELLO")
        proof, node = rest[:PROOF_SIZE], rest[PROOF_SIZE:]
        if len(proof) != PROOF_SIZE or not _NODE_ID.fullmatch(node.decode("latin-1")):
            raise ProtocolError("AUTH is malformed (bad node id)")
        if not hmac.compare_digest(proof, self._keys.proof(b"client", n_c, self._nonce, node)):
            raise AuthenticationFailed("the client's proof did not verify")
        node_id = node.decode("ascii")
        return node_id, self._keys.channel(n_c, self._nonce, node_id, server=True)


# ---- messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Relay:
    """A signaling message from ``sender`` (wire ``"from"``) to ``to``."""

    to: str
    sender: str
    body: dict[str, Any]


class Control(enum.Enum):
    """The messages without content."""

    PING = "ping"  # client keepalive
    PONG = "pong"  # the server's answer to PING
    WELCOME = "welcome"  # the server's first sealed message: session accepted


Message = Relay | Control


def encode_message(msg: Message) -> bytes:
    """The sealed plaintext for ``msg``. Raises :class:`InvalidMessage` if a
    relay's ids are invalid, its body is not a JSON-serialisable dict, or the
    result exceeds :data:`MAX_PLAINTEXT`."""
    if isinstance(msg, Control):
        return json.dumps({"t": msg.value}).encode()
    if not (is_node_id(msg.to) and is_node_id(msg.sender)):
        raise InvalidMessage(f"to/from: {msg.to!r}/{msg.sender!r} must be valid node ids")
    if not isinstance(msg.body, dict):
        raise InvalidMessage(f"body: must be a dict, got {type(msg.body).__name__}")
    wire = {"t": "msg", "to": msg.to, "from": msg.sender, "body": msg.body}
    try:
        data = json.dumps(wire, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"body: not JSON-serialisable: {exc}") from None
    if len(data) > MAX_PLAINTEXT:
        raise InvalidMessage(f"body: encodes to {len(data)} bytes, more than {MAX_PLAINTEXT}")
    return data


def decode_message(plaintext: bytes) -> Message:
    """Parse an authenticated plaintext. Raises :class:`ProtocolError`."""
    try:
        obj = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise ProtocolError("message is not JSON") from None
    kind = obj.get("t") if isinstance(obj, dict) else None
    if kind == "msg":
        to, sender, body = obj.get("to"), obj.get("from"), obj.get("body")
        if is_node_id(to) and is_node_id(sender) and isinstance(body, dict):
            return Relay(to=to, sender=sender, body=body)
        raise ProtocolError("relay needs node ids 'to' and 'from' and an object 'body'")
    try:
        return Control(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind!r}") from None


# ---- the server's hold store --------------------------------------------------


class HeldMessages:
    """The latest undelivered relay per ``(sender, to)``, each kept for
    ``hold_s`` after it arrived; at most ``max_entries`` (oldest evicted).
    Values are opaque (the server keeps the sealed plaintext). ``now`` is any
    monotonic clock in seconds. Not thread-safe."""

    __slots__ = ("_entries", "hold_s", "max_entries")

    def __init__(self, hold_s: float, max_entries: int = 4096) -> None:
        if hold_s < 0 or max_entries < 1:
            raise ConfigError("hold_s: must be >= 0 (and max_entries >= 1)")
        self.hold_s = hold_s
        self.max_entries = max_entries
        # Insertion order == arrival order == expiry order (``now`` never decreases).
        self._entries: dict[tuple[str, str], tuple[float, bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, sender: str, to: str, value: bytes, now: float) -> None:
        """Keep ``value``, replacing any earlier one from ``sender`` to ``to``."""
        self.expire(now)
        self._entries.pop((sender, to), None)
        self._entries[(sender, to)] = (now + self.hold_s, value)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def take(self, to: str, now: float) -> list[tuple[str, bytes]]:
        """Remove and return ``(sender, value)`` of every unexpired entry for
        ``to``, oldest first."""
        self.expire(now)
        keys = [key for key in self._entries if key[1] == to]
        return [(key[0], self._entries.pop(key)[1]) for key in keys]

    def expire(self, now: float) -> int:
        """Drop entries whose time is up (at ``now >= arrival + hold_s``).
        Returns how many."""
        dropped = 0
        while self._entries:
            key = next(iter(self._entries))
            if self._entries[key][0] > now:
                break
            del self._entries[key]
            dropped += 1
        return dropped
