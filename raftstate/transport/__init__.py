"""Secure datagram layer for the UDP Raft transport (sans-IO).

:mod:`~raftstate.transport.crypto` holds the key schedule, the replay window
and the DATA-packet AEAD session; :mod:`~raftstate.transport.envelope` holds
the HELLO handshake and :class:`SecureChannel`, the per-node facade a socket
driver feeds raw datagrams to. See those modules for the wire format.

Inside the sealed payloads, :class:`ReliableLink`
(:mod:`~raftstate.transport.reliable`; frames in
:mod:`~raftstate.transport.frames`) gives each peer pair ordered,
exactly-once message delivery. :mod:`~raftstate.transport.simnet` is the
deterministic in-memory lossy network for tests.
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
from raftstate.transport.linkconfig import LinkConfig, LinkStats
from raftstate.transport.reliable import MessageTooLarge, ReliableLink
from raftstate.transport.simnet import DirectionStats, LinkProfile, SimLinkHost, SimNetwork

__all__ = [
    "HELLO_SIZE",
    "MAX_DATAGRAM",
    "MAX_PACKET_NUMBER",
    "MAX_PAYLOAD",
    "OVERHEAD",
    "UNAUTHENTICATED_DROPS",
    "ChannelMetrics",
    "Delivered",
    "DirectionStats",
    "DropReason",
    "Dropped",
    "Handshake",
    "HandshakeEvent",
    "HandshakeResult",
    "LinkConfig",
    "LinkProfile",
    "LinkStats",
    "MessageTooLarge",
    "NoSession",
    "NodeIdentity",
    "Received",
    "ReliableLink",
    "ReplayWindow",
    "SecureChannel",
    "Session",
    "SessionExhausted",
    "SimLinkHost",
    "SimNetwork",
    "TransportError",
    "UnknownPeer",
    "derive_psk",
]
