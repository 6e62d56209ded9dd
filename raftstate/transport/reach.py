"""How the UDP transport reaches its peers: the :class:`Reach` interface and
its static implementation.

:class:`~raftstate.transport.udp.UdpTransport` owns the security channel and
the reliable links; a ``Reach`` owns the sockets and knows, per peer id, where
a datagram goes. It never looks inside a datagram: everything it delivers goes
through the channel's authentication first, so a path carrying a datagram
proves nothing about who sent it.

* :class:`StaticReach`: one socket, each peer at a configured ``host:port``
  (LAN, chaos proxies, the local cluster).
* :class:`~raftstate.transport.ice.IceReach`: one aioice connection per peer,
  negotiated through the rendezvous service (nodes behind NATs).

All methods run on the transport's event loop thread.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from raftstate.transport.udpconfig import split_hostport

#: ``deliver(datagram, source)``: ``source`` is for log lines only.
Deliver = Callable[[bytes, Any], None]
#: ``path_up(peer_id)``: a new path to the peer can carry datagrams.
PathUp = Callable[[str], None]
#: ``moved(peer_id, address)``: the peer says (sealed, through the rendezvous)
#: that its NAT moved it to ``address``; the transport validates it.
Moved = Callable[[str, Any], None]


class Reach(Protocol):
    async def open(self, deliver: Deliver, path_up: PathUp, moved: Moved | None = None) -> None:
        """Bind/start; afterwards ``deliver`` receives every datagram."""

    def send(self, peer_id: str, datagram: bytes) -> None:
        """Send one datagram to the peer, or drop it if there is no path."""

    def path_info(self, peer_id: str) -> tuple[str, int]:
        """The current path's kind (``static``, ``host``, ``srflx``, ``relay``
        or ``none``) and how many paths to the peer there were so far: each
        build, and each move to a new address (roaming), adds one."""

    def suspect(self, peer_id: str) -> None:
        """The transport's link to the peer stopped making progress."""

    def close(self) -> None:
        """Stop; idempotent."""

    # Roaming (raftstate.transport.roaming): the transport validates a new
    # source address of a peer before it moves the peer's path there.

    def remote(self, peer_id: str) -> Any | None:
        """Where datagrams to the peer go now (``None``: no path)."""

    def source_of(self, peer_id: str, source: Any) -> Any | None:
        """The address a datagram delivered with ``source`` came from, if it
        came in over the peer's current path (its socket), else ``None``
        (then it says nothing about where the peer is now)."""

    def send_to(self, peer_id: str, datagram: bytes, address: Any) -> None:
        """Send one datagram over the peer's current path socket to
        ``address`` instead of the path's remote address."""

    def move(self, peer_id: str, address: Any) -> None:
        """Send to the peer at ``address`` from now on (it was validated)."""

    def check_mapping(self, peer_id: str) -> None:
        """The link to the peer has stalled briefly: find out (cheaply) whether
        our own NAT mapping moved, and if so tell the peer where we are now."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._deliver(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while a peer is down: HELLO backoff covers it


class StaticReach:
    """One UDP socket bound to ``bind``; peer ``id`` lives at ``addresses[id]``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind: str,
        addresses: Mapping[str, str],
        *,
        bind_retries: int = 25,
        bind_retry_s: float = 0.2,
        proxied: frozenset[str] = frozenset(),
    ) -> None:
        """``proxied``: peers reached through a per-link proxy, which never roam."""
        self._loop = loop
        self._proxied = proxied
        self._moves: dict[str, int] = {}
        self._bind = bind
        self._addresses = {pid: split_hostport(a) for pid, a in addresses.items()}
        self._retries = bind_retries
        self._retry_s = bind_retry_s
        self._socket: asyncio.DatagramTransport | None = None

    async def open(self, deliver: Deliver, path_up: PathUp, moved: Moved | None = None) -> None:
        host, port = split_hostport(self._bind)
        for attempt in range(self._retries):
            try:
                sock, _ = await self._loop.create_datagram_endpoint(
                    lambda: _Protocol(deliver), local_addr=(host, port)
                )
                break
            except OSError:
                if attempt + 1 >= self._retries:
                    raise
                await asyncio.sleep(self._retry_s)
        self._socket = sock
        grow_buffers(sock)
        for peer_id in self._addresses:
            path_up(peer_id)

    def send(self, peer_id: str, datagram: bytes) -> None:
        if self._socket is not None:
            self._socket.sendto(datagram, self._addresses[peer_id])

    def path_info(self, peer_id: str) -> tuple[str, int]:
        return "static", 1 + self._moves.get(peer_id, 0)

    def suspect(self, peer_id: str) -> None:
        pass  # nothing to rebuild: the address is fixed

    def remote(self, peer_id: str) -> Any | None:
        return self._addresses[peer_id]

    def source_of(self, peer_id: str, source: Any) -> Any | None:
        # A peer behind a per-link proxy (send_to) answers from the proxy's
        # other socket: its source says nothing about where to send.
        if peer_id in self._proxied or not isinstance(source, tuple) or len(source) < 2:
            return None
        return (source[0], source[1])

    def send_to(self, peer_id: str, datagram: bytes, address: Any) -> None:
        if self._socket is not None:
            self._socket.sendto(datagram, address)

    def move(self, peer_id: str, address: Any) -> None:
        self._addresses[peer_id] = (str(address[0]), int(address[1]))
        self._moves[peer_id] = self._moves.get(peer_id, 0) + 1

    def check_mapping(self, peer_id: str) -> None:
        pass  # no NAT between static peers that we could ask about

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


__all__ = ["Deliver", "Moved", "PathUp", "Reach", "StaticReach"]


#: Socket buffers the transport asks for. A burst of a link's in-flight
#: window from each peer lands while the loop may be busy elsewhere; with
#: Linux's default 208 KiB receive buffer a loaded loopback node dropped
#: datagrams (thousands of retransmissions in a large-payload flood).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def grow_buffers(transport: asyncio.BaseTransport) -> None:
    """Ask for :data:`SOCKET_BUFFER_BYTES` send and receive buffers on a
    datagram transport's socket (the kernel caps them at ``rmem_max`` /
    ``wmem_max``; failures are ignored)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
