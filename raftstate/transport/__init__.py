"""Secure datagram layer for the UDP Raft transport (sans-IO).

:mod:`~raftstate.transport.crypto` holds the key schedule, the replay window
and the DATA-packet AEAD session; :mod:`~raftstate.transport.envelope` holds
the HELLO handshake and :class:`SecureChannel`, the per-node facade a socket
driver feeds raw datagrams to. See those modules for the wire format.
"""

from raftstate.transport.crypto import (
    MAX_DATAGRAM,
    MAX_PACKET_NUMBER,
    MAX_PAYLOAD,
    OVERHEAD,
    UNAUTHENTICATED_DROPS,
    DropReason,
    NodeIdentity,
    NoSession,
    ReplayWindow,
    Session,
    SessionExhausted,
    TransportError,
    UnknownPeer,
    derive_psk,
)
from raftstate.transport.envelope import (
    HELLO_SIZE,
    ChannelMetrics,
    Delivered,
    Dropped,
    Handshake,
    HandshakeEvent,
    HandshakeResult,
    Received,
    SecureChannel,
)

__all__ = [
    "HELLO_SIZE",
    "MAX_DATAGRAM",
    "MAX_PACKET_NUMBER",
    "MAX_PAYLOAD",
    "OVERHEAD",
    "UNAUTHENTICATED_DROPS",
    "ChannelMetrics",
    "Delivered",
    "DropReason",
    "Dropped",
    "Handshake",
    "HandshakeEvent",
    "HandshakeResult",
    "NoSession",
    "NodeIdentity",
    "Received",
    "ReplayWindow",
    "SecureChannel",
    "Session",
    "SessionExhausted",
    "TransportError",
    "UnknownPeer",
    "derive_psk",
]
