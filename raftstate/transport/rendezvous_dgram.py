"""Rendezvous relay datagrams: one relay message over UDP, without a session (sans-IO).

Theory of operation
-------------------
After a NAT remap the node's TCP connection to the rendezvous is dead with
its old mapping, and dialling again costs a TCP handshake plus the
two-message authentication (three round trips to the public site; ~0.15-0.45 s
on the lab's ``weak`` profile). The one message that is urgent then, the
sealed ``moved`` hint for a peer (see :mod:`raftstate.transport.roaming`), can
instead go to the server as a single UDP datagram, which the server forwards
over the *peer's* live TCP session.

Wire format (all of it authenticated)::

    MAGIC(4) | time_ms(8, big endian) | nonce(16) | relay message | tag(32)

``relay message`` is :func:`~raftstate.transport.rendezvous_codec.encode_message`
of a :class:`~raftstate.transport.rendezvous_codec.Relay`; ``tag`` is
HMAC-SHA256 under the rendezvous ``mac_key`` (the rendezvous secret, never the
cluster's) over the label and everything before it. The server accepts a
datagram only if the tag is right, ``time_ms`` is within :data:`WINDOW_S` of
its clock, and the nonce has not been seen within that window
(:class:`NonceCache`, bounded): a recorded datagram cannot be replayed. The
body inside stays sealed end to end by the sending node
(:mod:`~raftstate.transport.signalseal`), so the server learns no more than
over TCP, and a body is only ever a *hint* to the receiver: a forged or
replayed ``moved`` note costs one rate-limited path challenge, never a path
change. Nothing here reads a clock or draws random bytes: ``now_s`` and the
nonce are inputs. Not thread-safe.
"""

from __future__ import annotations

import hmac
import struct
from collections import OrderedDict

from raftstate.transport.rendezvous_codec import RendezvousKeys

MAGIC = b"RZD1"
NONCE_SIZE = 16
TAG_SIZE = 32
#: Largest datagram the server reads (a ``moved`` note is ~200 bytes).
MAX_DATAGRAM = 1200
#: A datagram more than this far from the server's clock is refused.
WINDOW_S = 30.0
#: Nonces remembered (each for WINDOW_S); beyond this the oldest is forgotten
#: early, which only matters to a sender with the secret sending this many.
MAX_NONCES = 4096
_LABEL = b"raftstate rendezvous datagram"
_HEADER = struct.Struct(">4sQ16s")


def seal_datagram(keys: RendezvousKeys, message: bytes, now_s: float, nonce: bytes) -> bytes:
    """The datagram carrying ``message`` (an encoded relay message). Raises
    ``ValueError`` for a nonce that is not :data:`NONCE_SIZE` bytes or a
    datagram that would exceed :data:`MAX_DATAGRAM`."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce: must be {NONCE_SIZE} bytes, got {len(nonce)}")
    head = _HEADER.pack(MAGIC, max(0, int(now_s * 1000)), nonce) + message
    if len(head) + TAG_SIZE > MAX_DATAGRAM:
        raise ValueError(f"message: {len(message)} bytes is too large for one datagram")
    return head + hmac.digest(keys.mac_key, _LABEL + head, "sha256")


class NonceCache:
    """Nonces of datagrams whose time still passes the window, at most ``limit``."""

    def __init__(self, limit: int = MAX_NONCES) -> None:
        #: nonce -> until when it must be remembered (insertion order).
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._limit = limit

    def add(self, nonce: bytes, now_s: float, sent_s: float | None = None) -> bool:
        """Remember ``nonce``; ``False`` if it was already seen (a replay).
        ``sent_s``: the datagram's own time. Its time check passes until
        ``sent_s + WINDOW_S``, which is later than ``now_s + WINDOW_S`` for a
        sender whose clock is ahead, so the nonce is kept until the later of
        the two (forgotten earlier only beyond ``limit``)."""
        seen = self._seen
        # Front first: an entry behind one that expires later waits for it
        # (kept longer, never shorter).
        while seen and next(iter(seen.values())) < now_s:
            seen.popitem(last=False)
        if nonce in seen:
            return False
        if len(seen) >= self._limit:
            seen.popitem(last=False)
        seen[nonce] = max(now_s, now_s if sent_s is None else sent_s) + WINDOW_S
        return True

    def __len__(self) -> int:
        return len(self._seen)


def open_datagram(
    keys: RendezvousKeys, data: bytes, now_s: float, nonces: NonceCache
) -> bytes | None:
    """The relay message inside ``data``, or ``None`` if it is malformed,
    forged, outside the time window, or a replay (a nonce seen before).
    ``now_s`` is the server's wall clock in seconds."""
    if not _HEADER.size + TAG_SIZE < len(data) <= MAX_DATAGRAM:
        return None
    head, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    magic, time_ms, nonce = _HEADER.unpack_from(head)
    if magic != MAGIC:
        return None
    if not hmac.compare_digest(hmac.digest(keys.mac_key, _LABEL + head, "sha256"), tag):
        return None
    if abs(now_s - time_ms / 1000.0) > WINDOW_S:
        return None
    if not nonces.add(nonce, now_s, time_ms / 1000.0):
        return None
    return head[_HEADER.size :]


__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "NONCE_SIZE",
    "WINDOW_S",
    "NonceCache",
    "open_datagram",
    "seal_datagram",
]
