"""Settings and stats types of the UDP transport (:mod:`raftstate.transport.udp`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raftstate.transport.crypto import NodeIdentity
from raftstate.transport.linkconfig import LinkConfig, LinkStats

DATAGRAM_SIZE = 1200
HELLO_MIN_INTERVAL = 0.05
HELLO_MAX_INTERVAL = 1.0
#: A link whose data waits this long without ACK progress (at least
#: SUSPECT_MIN_S, or SUSPECT_RTTS smoothed RTTs) has its path rebuilt (ICE);
#: well before it is declared dead (``dead_after``) and reported to Raft.
SUSPECT_MIN_S = 0.6
SUSPECT_RTTS = 4
#: A link stalled this long (at least MAPPING_CHECK_MIN_S, or MAPPING_CHECK_RTTS
#: smoothed RTTs) asks the reach whether our own NAT mapping moved (ICE: one
#: STUN request); much earlier than a rebuild, since the check costs one
#: datagram and a false alarm changes nothing.
MAPPING_CHECK_MIN_S = 0.1
MAPPING_CHECK_RTTS = 1.5
#: A peer that sent link data until recently and has been silent this long
#: (at least SILENCE_MIN_S, or SILENCE_RTTS smoothed RTTs) gets a path
#: challenge on its current address, again with doubling gaps, until
#: SILENCE_PROBE_FOR_S of silence (then the link is idle, or dead_after and
#: ICE take over). The probe re-opens our NAT's mapping towards the peer after
#: a conntrack flush, and the peer, on an authentic path datagram while its
#: link to us is stalled, resends at once.
SILENCE_MIN_S = 0.1
SILENCE_RTTS = 1.5
SILENCE_PROBE_FOR_S = 3.0
SILENCE_TICK_S = 0.05
#: Wrong-secret (and other authentication) drops are logged at most this often per source.
DROP_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class IceSettings:
    """Where the rendezvous, STUN and TURN servers are (``host:port``), and
    the credential for the rendezvous (never the cluster secret)."""

    rendezvous: str
    stun_server: str
    rendezvous_secret: str = ""
    turn_server: str = ""
    turn_username: str = ""
    turn_password: str = ""
    connect_timeout: float = 5.0
    retry_min: float = 0.5
    retry_max: float = 10.0


@dataclass(frozen=True, slots=True)
class UdpSettings:
    """What the transport needs besides pysyncobj's nodes. ``peers`` maps each
    peer's member id to its ``host:port`` (which is also its pysyncobj node
    address); ``bind`` is this node's listen ``host:port``. ``send_to``
    overrides, per peer id, where datagrams for that peer are sent (a per-link
    proxy); peers are recognised by their keys, never by source address."""

    node_id: str
    bind: str
    peers: tuple[tuple[str, str], ...]
    cluster_secret: str
    link: LinkConfig = LinkConfig()
    send_to: tuple[tuple[str, str], ...] = ()
    #: Per peer: bytes accepted by ``send`` and not yet acknowledged by the
    #: peer (waiting for the loop, for room in the link, or in flight) at
    #: which the leader stops sending it AppendEntries (:meth:`paused_nodes`),
    #: and below which it resumes. Nothing already accepted is dropped. Keep
    #: it a few in-flight windows (``LinkConfig.max_inflight_bytes``): deeper
    #: queues only delay the heartbeats behind them (measured: at 4 MiB a
    #: CPU-starved loopback link took over an election timeout to drain, and
    #: the followers kept starting elections).
    pause_bytes: int = 1024 * 1024
    resume_bytes: int = 256 * 1024
    #: Per peer: beyond this ``send`` refuses and reports the peer
    #: disconnected to pysyncobj (which then starts over from its nextIndex
    #: or snapshot once the backlog has drained and the peer is reported up).
    max_peer_bytes: int = 32 * 1024 * 1024
    bind_retries: int = 25
    bind_retry_s: float = 0.2
    #: Reach peers over ICE (rendezvous, STUN, TURN) instead of ``peers``'
    #: static addresses; ``bind`` and ``send_to`` are then unused.
    ice: IceSettings | None = None
    #: Static node keys (``node_key_file`` + ``peer_keys``): HELLOs then need
    #: this node's private key, not just the cluster secret.
    identity: NodeIdentity | None = None


@dataclass(frozen=True, slots=True)
class PeerLinkStats:
    """One peer's path as this node sees it. Times in seconds."""

    peer_id: str
    path: str  # "static", or over ICE "host" | "srflx" | "relay" | "none"
    connected: bool
    srtt: float | None  # None: no RTT sample yet (an idle link)
    retransmissions: int
    loss_rate: float | None  # measured fraction lost; None: too few frames yet
    sessions: int  # sessions established with this peer since start
    #: Paths to this peer since start: each ICE (re)build and each validated
    #: move to a new address of the peer (roaming) adds one.
    paths: int
    #: The current session's link counters (reset when a new session starts).
    link: LinkStats | None = None


def split_hostport(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def settings_for(
    node_id: str,
    bind: str,
    members: Sequence[tuple[str, str]],
    cluster_secret: str,
    *,
    dead_after: float,
    send_to: Mapping[str, str] | None = None,
    ice: IceSettings | None = None,
    identity: NodeIdentity | None = None,
    congestion_control: bool = True,
) -> UdpSettings:
    """Settings for ``node_id`` among ``members`` (``(id, raft address)``);
    ``send_to``: per-peer send addresses overriding the member address."""
    peers = tuple((mid, addr) for mid, addr in members if mid != node_id)
    link = LinkConfig(dead_after=dead_after, congestion_control=congestion_control)
    overrides = tuple(sorted((send_to or {}).items()))
    return UdpSettings(
        node_id, bind, peers, cluster_secret, link=link, send_to=overrides, ice=ice,
        identity=identity,
    )  # fmt: skip


__all__ = ["IceSettings", "PeerLinkStats", "UdpSettings", "settings_for", "split_hostport"]
