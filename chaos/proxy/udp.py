"""UDP data path (our extension; Toxiproxy itself is TCP-only).

Theory of operation
-------------------
1. One socket is bound on the proxy's ``listen`` address.
2. The first datagram from a client address creates a *mapping*: a socket
   connected to ``upstream`` that belongs to that client alone, so the
   upstream's replies arrive on it and are sent back to that client from the
   listen socket. Datagrams that arrive while the mapping's socket is being
   opened are queued in order.
3. Each mapping has one :class:`~chaos.proxy.toxics.DatagramPipe` per
   direction; toxicity is rolled per mapping (a mapping plays the role of a
   connection). Each datagram becomes zero, one or two timed sends.
4. A mapping that has carried no datagram for ``idle_timeout_s`` is closed.
5. Disabling the proxy *blackholes* it: the listen socket stays bound (so
   clients see silence, not ICMP port-unreachable) and every datagram is
   dropped; mappings are closed. Re-enabling resumes forwarding.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from chaos.proxy.toxics import DatagramPipe, Send, Stream, ToxicityRoll

if TYPE_CHECKING:
    from chaos.proxy.registry import Proxy

__all__ = ["UdpProxy"]

Address = tuple[str, int]
_Deliver = Callable[[bytes], None]


class UdpProxy:
    """The listen socket and client mappings of one UDP proxy."""

    def __init__(
        self,
        proxy: Proxy,
        host: str,
        port: int,
        up_host: str,
        up_port: int,
        rng: random.Random,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.proxy = proxy
        self._addr = (host, port)
        self.upstream = (up_host, up_port)
        self.rng = rng
        self.idle_timeout_s = idle_timeout_s
        self.blackholed = False
        self.transport: asyncio.DatagramTransport | None = None
        self.mappings: dict[Address, _Mapping] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.blackholed = False
        if self.transport is None:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _ListenProtocol(self), local_addr=self._addr
            )
            self._schedule_sweep()
        sockname = self.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def blackhole(self) -> None:
        """Drop everything from now on and forget the client mappings."""
        self.blackholed = True
        self._close_mappings()

    async def stop(self) -> None:
        """Release the listen socket."""
        self._close_mappings()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()

    def toxics_changed(self) -> None:
        for mapping in self.mappings.values():
            mapping.update_toxics()

    def from_client(self, data: bytes, client: Address) -> None:
        if self.blackholed:
            return
        mapping = self.mappings.get(client)
        if mapping is None:
            mapping = self.mappings[client] = _Mapping(self, client)
        mapping.send_upstream(data)

    def _close_mappings(self) -> None:
        for mapping in list(self.mappings.values()):
            mapping.close()
        self.mappings.clear()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(0.05, self.idle_timeout_s / 2), self._sweep)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for client, mapping in list(self.mappings.items()):
            if now - mapping.last_seen > self.idle_timeout_s:
                mapping.close()
                del self.mappings[client]
        self._schedule_sweep()


class _ListenProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpProxy) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.owner.from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about a client are not ours to act on


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, mapping: _Mapping) -> None:
        self.mapping = mapping

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.mapping.send_downstream(data)

    def error_received(self, exc: Exception) -> None:
        pass  # upstream not listening (ICMP refused): UDP just loses the datagram


class _Mapping:
    """One client address and its private upstream socket."""

    def __init__(self, owner: UdpProxy, client: Address) -> None:
        self.owner = owner
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.last_seen = self.loop.time()
        self.roll = ToxicityRoll(owner.rng)
        self.up = DatagramPipe(owner.rng)
        self.down = DatagramPipe(owner.rng)
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        self.timers: set[asyncio.TimerHandle] = set()
        self.closed = False
        self.update_toxics()
        self.opening = self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self), remote_addr=self.owner.upstream
            )
        except OSError:
            self.pending.clear()
            return
        if self.closed:
            transport.close()
            return
        self.transport = transport
        for data in self.pending:
            transport.sendto(data)
        self.pending.clear()

    def update_toxics(self) -> None:
        toxics = self.roll.filter(self.owner.proxy.toxics)
        self.up.set_toxics([t for t in toxics if t.stream is Stream.UPSTREAM])
        self.down.set_toxics([t for t in toxics if t.stream is Stream.DOWNSTREAM])

    def send_upstream(self, data: bytes) -> None:
        now = self.last_seen = self.loop.time()
        for send in self.up.feed(now, data):
            self._at(send, self._to_upstream)

    def send_downstream(self, data: bytes) -> None:
        now = self.last_seen = self.loop.time()
        for send in self.down.feed(now, data):
            self._at(send, self._to_client)

    def _at(self, send: Send, deliver: _Deliver) -> None:
        if send.at <= self.loop.time():
            deliver(send.data)
            return
        handle: asyncio.TimerHandle

        def fire() -> None:
            self.timers.discard(handle)
            deliver(send.data)

        handle = self.loop.call_at(send.at, fire)
        self.timers.add(handle)

    def _to_upstream(self, data: bytes) -> None:
        if self.closed or self.owner.blackholed:
            return
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def _to_client(self, data: bytes) -> None:
        listen = self.owner.transport
        if not self.closed and not self.owner.blackholed and listen is not None:
            listen.sendto(data, self.client)

    def close(self) -> None:
        self.closed = True
        for handle in self.timers:
            handle.cancel()
        self.timers.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        elif not self.opening.done():
            self.opening.cancel()
