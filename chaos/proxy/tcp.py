"""TCP data path: accept, dial upstream, and run each chunk through the toxics.

Theory of operation
-------------------
1. :class:`TcpProxy` listens on the proxy's address. Each accepted client gets
   a :class:`_Link`, which dials ``upstream`` and holds the client's reads
   until that connection is up (a failed dial closes the client).
2. Each direction has a :class:`~chaos.proxy.toxics.StreamPipe`. A chunk read
   at ``loop.time()`` becomes timed ``Send``/``Close`` actions. Actions due now
   with nothing queued are written at once (the no-toxic fast path); the rest
   wait in a per-direction queue that a single ``call_at`` timer drains in
   order.
3. Back-pressure: when the far side's transport buffer is full, or more than
   ``_MAX_QUEUED`` bytes wait in a queue, the near side stops reading.
4. An EOF from one side half-closes the other (after queued data and any
   ``slow_close`` delay); the link ends when both directions finished or a
   toxic/disable closes it. ``reset_peer`` sets ``SO_LINGER`` to 0 so the close
   is a RST.
5. :meth:`TcpProxy.toxics_changed` re-rolls toxicity and re-installs the toxics
   on every live link, so toxics apply to connections already open.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
from typing import TYPE_CHECKING, cast

from chaos.proxy.toxics import Close, Send, Stream, StreamPipe, ToxicityRoll

if TYPE_CHECKING:
    from chaos.proxy.registry import Proxy

__all__ = ["TcpProxy"]

_MAX_QUEUED = 1 << 20


class TcpProxy:
    """The listener of one TCP proxy; see the module docstring."""

    def __init__(
        self, proxy: Proxy, host: str, port: int, up_host: str, up_port: int, rng: random.Random
    ) -> None:
        self.proxy = proxy
        self._addr = (host, port)
        self.upstream = (up_host, up_port)
        self.rng = rng
        self._server: asyncio.Server | None = None
        self.links: set[_Link] = set()

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Side(self, None), self._addr[0], self._addr[1], reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self.links):
            link.close(abort=True)
        if server is not None:
            await server.wait_closed()

    def toxics_changed(self) -> None:
        for link in list(self.links):
            link.update_toxics()


class _Side(asyncio.Protocol):
    """One socket of a link: the accepted client (``link is None`` until made)
    or the dialled upstream."""

    def __init__(self, owner: TcpProxy, link: _Link | None) -> None:
        self.owner = owner
        self.link = link
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.link is None:
            self.link = _Link(self.owner, self)

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.received(self, data)

    def eof_received(self) -> bool:
        if self.link is not None:
            self.link.eof(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.lost(self)

    def pause_writing(self) -> None:
        if self.link is not None:
            self.link.peer_of(self).pause()

    def resume_writing(self) -> None:
        if self.link is not None:
            self.link.peer_of(self).resume()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class _Direction:
    """Queue of timed actions from ``source`` to ``target``."""

    def __init__(self, link: _Link, stream: Stream, source: _Side, target: _Side) -> None:
        self.link = link
        self.stream = stream
        self.source = source
        self.target = target
        self.pipe = StreamPipe(link.owner.rng)
        self.queue: collections.deque[Send | Close] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.early: list[bytes] = []
        self.eof_early = False
        self.done = False

    def submit(self, actions: list[Send | Close], now: float) -> None:
        for action in actions:
            if not self.queue and action.at <= now:
                self._do(action)
            else:
                self.queue.append(action)
                if isinstance(action, Send):
                    self.queued_bytes += len(action.data)
        if self.queued_bytes > _MAX_QUEUED:
            self.source.pause()
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None or not self.queue:
            return
        self.timer = self.link.loop.call_at(self.queue[0].at, self._drain)

    def _drain(self) -> None:
        self.timer = None
        now = self.link.loop.time()
        while self.queue and self.queue[0].at <= now:
            action = self.queue.popleft()
            if isinstance(action, Send):
                self.queued_bytes -= len(action.data)
            self._do(action)
        if self.queued_bytes <= _MAX_QUEUED // 2:
            self.source.resume()
        self._arm()

    def _do(self, action: Send | Close) -> None:
        transport = self.target.transport
        if isinstance(action, Send):
            if transport is None:  # upstream still dialling (uvloop may read before resume)
                self.early.append(action.data)
            elif not transport.is_closing():
                transport.write(action.data)
        elif self.pipe.closed and not action.reset and self.link.eof_pending(self):
            if transport is None:
                self.eof_early = True
            else:
                self.finish()
        else:
            self.link.close(reset=action.reset)

    def finish(self) -> None:
        """This direction ended: half-close the target (or close the link if a
        socket is already gone)."""
        self.done = True
        if self.link.lost_any:
            self.link.close()
            return
        transport = self.target.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self.link.maybe_finish()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, owner: TcpProxy, client: _Side) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.server = _Side(owner, self)
        self.roll = ToxicityRoll(owner.rng)
        self.up = _Direction(self, Stream.UPSTREAM, client, self.server)
        self.down = _Direction(self, Stream.DOWNSTREAM, self.server, client)
        self.timers: list[asyncio.TimerHandle] = []
        self.closed = False
        self._eofs: set[Stream] = set()
        self.lost_any = False
        owner.links.add(self)
        client.pause()
        self.update_toxics()
        self.dial = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: self.server, *self.owner.upstream)
        except OSError:
            self.close(abort=True)
            return
        if self.closed:
            self.close(abort=True)
            return
        transport = self.server.transport
        if transport is not None and self.up.early:
            transport.writelines(self.up.early)
            self.up.early.clear()
        if self.up.eof_early:
            self.up.finish()
        self.client.resume()

    def peer_of(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client

    def _direction_from(self, side: _Side) -> _Direction:
        return self.up if side is self.client else self.down

    def update_toxics(self) -> None:
        now = self.loop.time()
        toxics = self.roll.filter(self.owner.proxy.toxics)
        for direction in (self.up, self.down):
            mine = [t for t in toxics if t.stream is direction.stream]
            for close in direction.pipe.set_toxics(now, mine):
                self.timers.append(self.loop.call_at(close.at, self.close, False, close.reset))

    def received(self, side: _Side, data: bytes) -> None:
        direction = self._direction_from(side)
        now = self.loop.time()
        direction.submit(direction.pipe.feed(now, data), now)

    def eof(self, side: _Side) -> None:
        direction = self._direction_from(side)
        self._eofs.add(direction.stream)
        now = self.loop.time()
        direction.submit(direction.pipe.on_eof(now), now)

    def eof_pending(self, direction: _Direction) -> bool:
        return direction.stream in self._eofs

    def maybe_finish(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def lost(self, side: _Side) -> None:
        if self.closed:
            return
        self.lost_any = True
        direction = self._direction_from(side)
        if direction.stream not in self._eofs:
            self.eof(side)
        elif direction.done:
            self.close()

    def close(self, abort: bool = False, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.links.discard(self)
        for timer in self.timers:
            timer.cancel()
        self.up.cancel()
        self.down.cancel()
        for side in (self.client, self.server):
            transport = side.transport
            if transport is None or transport.is_closing():
                continue
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            elif abort:
                transport.abort()
            else:
                transport.close()
