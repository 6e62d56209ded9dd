"""End-to-end sealing of ICE signaling relayed through the rendezvous.

Theory of operation
-------------------
The rendezvous relays ICE offers and answers (candidate addresses, ICE
ufrag/pwd) between nodes. It authenticates nodes with ``rendezvous_secret``
only, so it must be assumed able to read, drop, replay or inject relayed
messages and to claim any node id towards it. To keep it from *forging or
altering* an offer (and so steering a node's traffic to an address of its
choice) or reading ICE passwords, every relayed body is sealed end to end
under a key only the two nodes can compute::

    signal_key(a, b) = HKDF(salt=pair_key(a, b), ikm=b"",
                            info=LABEL_SIGNAL, L=32)
    wire body        = {"s": base64url(nonce12 || ChaCha20-Poly1305(
                              signal_key, nonce12, json(body), aad=from || 0 || to))}

``pair_key`` is the transport's (:func:`raftstate.transport.crypto.derive_pair_key`):
it needs the cluster secret and, with node keys configured, the two nodes'
static keys, none of which the rendezvous has. The AAD binds sender and
receiver, so a body sealed for one pair or direction does not open for
another. Nonces are random (a handful of messages per connection attempt).
A replayed body opens again; ICE attempt ids make it stale, and the Raft
session above ICE is authenticated independently, so a replay can at most
delay a connection. Pure given ``random_bytes``; no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftstate.transport.crypto import NodeIdentity, derive_pair_key, derive_psk, encode_node_id

LABEL_SIGNAL = b"raftstate/transport/v1 ice signaling"
NONCE_SIZE = 12


def signal_key(
    cluster_secret: str, node_id: str, peer_id: str, identity: NodeIdentity | None = None
) -> bytes:
    """The 32-byte signaling key of the pair (same on both ends)."""
    shared = identity.shared_with(peer_id) if identity is not None else b""
    pair = derive_pair_key(
        derive_psk(cluster_secret), encode_node_id(node_id), encode_node_id(peer_id), shared
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=pair, info=LABEL_SIGNAL).derive(b"")


class SignalSealer:
    """Seals bodies to peers and opens bodies from them (see the module doc).
    Raises ``ConfigError`` at construction like the transport would."""

    def __init__(
        self,
        cluster_secret: str,
        node_id: str,
        peer_ids: Iterable[str],
        identity: NodeIdentity | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_id = node_id
        self._random = random_bytes
        self._aead = {
            pid: ChaCha20Poly1305(signal_key(cluster_secret, node_id, pid, identity))
            for pid in peer_ids
        }
        #: Bodies that did not open (forged, altered, wrong pair), by sender.
        self.rejected = 0

    def seal(self, to: str, body: dict[str, Any]) -> dict[str, Any]:
        """The wire body carrying ``body`` to ``to`` (a configured peer)."""
        nonce = self._random(NONCE_SIZE)
        plain = json.dumps(body, separators=(",", ":")).encode()
        sealed = self._aead[to].encrypt(nonce, plain, _aad(self.node_id, to))
        return {"s": base64.urlsafe_b64encode(nonce + sealed).decode("ascii")}

    def open(self, sender: str, wire: dict[str, Any]) -> dict[str, Any] | None:
        """The body ``sender`` sealed for us, or ``None`` (counted in
        :attr:`rejected`) if it is not authentic. Never raises."""
        aead = self._aead.get(sender)
        raw = wire.get("s")
        try:
            blob = base64.urlsafe_b64decode(raw) if isinstance(raw, str) else b""
        except (binascii.Error, ValueError):
            blob = b""
        if aead is None or len(blob) < NONCE_SIZE + 16:
            self.rejected += 1
            return None
        try:
            plain = aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _aad(sender, self.node_id))
            body = json.loads(plain)
        except (InvalidTag, ValueError):
            self.rejected += 1
            return None
        if not isinstance(body, dict):
            self.rejected += 1
            return None
        return body


def _aad(sender: str, to: str) -> bytes:
    return sender.encode() + b"\0" + to.encode()


__all__ = ["SignalSealer", "signal_key"]
