"""The ICE rendezvous service: a TCP relay for candidate offers/answers.

Theory of operation
-------------------
Nodes behind NATs cannot reach each other before ICE has run, so each dials
*out* to a rendezvous server and trades its ICE offers/answers (RFC 8445 §5.3)
through it. Signaling is latest-state (a newer offer voids older ones), so
both ends keep only the newest undelivered message per destination and
nothing retransmits. The wire protocol is the sans-IO
:mod:`raftstate.transport.rendezvous_codec`; this module drives it on asyncio.

Server, per TCP connection:

0. Admission: at most ``max_connections`` connections at once, and at most
   ``max_per_source`` from one source IP; a connection beyond either cap is
   closed at once, before reading anything (rate-limited log line).
1. Handshake within ``handshake_timeout_s`` (default ``HANDSHAKE_TIMEOUT_S``),
   or the connection is cut. A failed proof or a malformed
   frame closes the connection with a log line, rate-limited before
   authentication (anyone can cause those): one per ``REJECT_LOG_INTERVAL_S``
   per kind, then a count.
2. Register the node id, closing any older connection of that id (newest
   wins); send WELCOME, then the messages held for that id, oldest first.
3. Answer PING with PONG. Forward a relay whose ``from`` is the session's id,
   byte for byte, to ``to`` if connected, else hold it (latest per
   ``(from, to)``, for ``hold_s``). Close a connection silent for
   ``IDLE_TIMEOUT_S`` or whose send buffer passes ``MAX_WRITE_BUFFER``.

Client: connect, handshake, await WELCOME, flush the outbox, relay; ping every
``PING_INTERVAL_S``; treat a server silent for ``SERVER_SILENT_S`` as gone.
After any failure reconnect with jittered exponential backoff in
``[reconnect_min_s, reconnect_max_s]`` until :meth:`RendezvousClient.close`.
A message written to a connection that then breaks is lost; the ICE agent
retries. Both classes live on one asyncio loop and are not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

from raftstate.errors import ConfigError
from raftstate.transport.rendezvous_codec import (
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    NONCE_SIZE,
    AuthenticationFailed,
    ClientHandshake,
    Control,
    FrameDecoder,
    HeldMessages,
    InvalidMessage,
    ProtocolError,
    Relay,
    RendezvousKeys,
    SealedChannel,
    ServerHandshake,
    decode_message,
    encode_frame,
    encode_message,
    is_node_id,
)
from raftstate.transport.rendezvous_dgram import (
    NonceCache,
    open_datagram,
    seal_datagram,
)

log = logging.getLogger("raftstate.transport.rendezvous")

PING_INTERVAL_S = 10.0
IDLE_TIMEOUT_S = 30.0
SERVER_SILENT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1024
MAX_PER_SOURCE = 64
CONNECT_TIMEOUT_S = 10.0
#: A dial not connected after this long gets a second one racing it (the
#: first to connect wins): a lost SYN otherwise costs the kernel's 1 s
#: retransmission, and the reconnect after a NAT remap is on the critical path.
DIAL_RACE_S = 0.3
MAX_WRITE_BUFFER = 1 << 20
REJECT_LOG_INTERVAL_S = 10.0
CLIENT_LOG_INTERVAL_S = 60.0
_READ_SIZE = 1 << 16
_PING = encode_message(Control.PING)
_PONG = encode_message(Control.PONG)
_WELCOME = encode_message(Control.WELCOME)


class _Throttle:
    """Logs at most one line per key per ``interval`` seconds (loop time) and
    says how many it held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, key: str, level: int, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next.get(key, -math.inf):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._next[key] = now + self.interval
        held = self._held.pop(key, 0)
        log.log(level, message + (f" ({held} more like this not logged)" if held else ""), *args)


class _Frames:
    """Frame payloads from a stream; cancel-safe between frames."""

    def __init__(self, reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> None:
        self._reader = reader
        self.decoder = FrameDecoder(max_frame)
        self._ready: deque[bytes] = deque()

    async def next(self) -> bytes:
        """The next payload. Raises ``ConnectionError`` at EOF and
        :class:`ProtocolError` on a bad length."""
        while not self._ready:
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise ConnectionResetError("connection closed by peer")
            self._ready.extend(self.decoder.feed(data))
        return self._ready.popleft()


@dataclass(slots=True, eq=False)
class _Conn:
    """One authenticated connection."""

    node_id: str
    channel: SealedChannel
    writer: asyncio.StreamWriter
    peer: str
    replaced: bool = False

    def send(self, plaintext: bytes) -> bool:
        """Seal and queue ``plaintext``; ``False`` if the connection is closing."""
        if self.writer.is_closing():
            return False
        self.writer.write(encode_frame(self.channel.seal(plaintext)))
        return True


def _prepare(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def _source_ip(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address: {address!r} must be HOST:PORT")
    return host, int(port)


class _DatagramServer(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data, addr)


class RendezvousServer:
    """The rendezvous relay. Use on one asyncio loop; not thread-safe."""

    def __init__(
        self,
        rendezvous_secret: str,
        *,
        hold_s: float = 60.0,
        max_connections: int = MAX_CONNECTIONS,
        max_per_source: int = MAX_PER_SOURCE,
        handshake_timeout_s: float | None = None,
    ) -> None:
        """``rendezvous_secret`` is the rendezvous credential, never the
        cluster secret. Raises :class:`ConfigError` for a secret under 16
        characters, a negative ``hold_s`` or caps/timeouts that are not
        positive. ``handshake_timeout_s`` defaults to ``HANDSHAKE_TIMEOUT_S``."""
        if handshake_timeout_s is None:
            handshake_timeout_s = HANDSHAKE_TIMEOUT_S
        if max_connections < 1 or max_per_source < 1 or not handshake_timeout_s > 0:
            raise ConfigError(
                "max_connections, max_per_source, handshake_timeout_s: must be positive"
            )
        self._keys = RendezvousKeys.from_secret(rendezvous_secret)
        self._held = HeldMessages(hold_s)
        self._sessions: dict[str, _Conn] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._rejections = _Throttle(REJECT_LOG_INTERVAL_S)
        self._idle_timeout_s = IDLE_TIMEOUT_S
        self._handshake_timeout_s = handshake_timeout_s
        self._max_connections = max_connections
        self._max_per_source = max_per_source
        self._open = 0
        self._per_source: dict[str, int] = {}
        #: Connections closed at once for exceeding a cap.
        self.refused = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._nonces = NonceCache()
        #: Relay datagrams (rendezvous_dgram) forwarded / refused.
        self.datagrams_relayed = 0
        self.datagrams_refused = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: an ephemeral port) and return the bound
        address. Raises ``OSError`` if it cannot bind, ``RuntimeError`` if
        already started."""
        if self._server is not None:
            raise RuntimeError("RendezvousServer.start called twice")
        self._server = await asyncio.start_server(self._handle, host, port)
        bound = self._server.sockets[0].getsockname()
        log.debug("rendezvous: listening on %s:%s", bound[0], bound[1])
        try:  # relay datagrams (rendezvous_dgram) on the same port number
            self._udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _DatagramServer(self._on_datagram), local_addr=(bound[0], bound[1])
            )
        except OSError as exc:
            log.warning("rendezvous: no relay datagrams (UDP %s:%s: %r)", bound[0], bound[1], exc)
        return str(bound[0]), int(bound[1])

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        """One relay datagram: forward its message to the target's session if
        it is connected (never held: the sender repeats it over TCP)."""
        message = open_datagram(self._keys, data, time.time(), self._nonces)
        msg = None
        if message is not None:
            with contextlib.suppress(InvalidMessage, ProtocolError, ValueError):
                msg = decode_message(message)
        if message is None or not isinstance(msg, Relay) or msg.to == msg.sender:
            self.datagrams_refused += 1
            self._rejections.log("datagram", INFO, "rendezvous: refused a datagram from %s", addr)
            return
        target = self._sessions.get(msg.to)
        if target is not None and target.send(message):
            self.datagrams_relayed += 1

    @property
    def open_connections(self) -> int:
        """TCP connections open now, authenticated or not."""
        return self._open

    def connected(self) -> set[str]:
        """Node ids with an authenticated session now."""
        return {node_id for node_id, conn in self._sessions.items() if not conn.writer.is_closing()}

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, self._server = self._server, None
        self._closing = True
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if server is not None:
            server.close()
        tasks = list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._closing:  # accepted as we closed
            writer.close()
            return
        source = _source_ip(writer)
        if (
            self._open >= self._max_connections
            or self._per_source.get(source, 0) >= self._max_per_source
        ):
            self.refused += 1
            self._rejections.log(
                "cap", WARNING, "rendezvous: refused a connection from %s: %d open "
                "(max_connections %d), %d from that source (max_per_source %d)",
                source, self._open, self._max_connections, self._per_source.get(source, 0),
                self._max_per_source,
            )  # fmt: skip
            writer.transport.abort()
            return
        self._open += 1
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._handlers.add(task)
        peer = _prepare(writer)
        conn: _Conn | None = None
        challenged = False
        try:
            frames = _Frames(reader, MAX_HANDSHAKE_FRAME)  # buffer little for strangers
            handshake = ServerHandshake(self._keys, os.urandom(NONCE_SIZE))
            async with asyncio.timeout(self._handshake_timeout_s):
                writer.write(encode_frame(handshake.on_hello(await frames.next())))
                challenged = True
                node_id, channel = handshake.on_auth(await frames.next())
            conn = _Conn(node_id, channel, writer, peer)
            frames.decoder.max_frame = MAX_FRAME
            self._admit(conn)
            while True:
                async with asyncio.timeout(self._idle_timeout_s):
                    payload = await frames.next()
                self._on_frame(conn, payload)
        except AuthenticationFailed:
            self._rejections.log(
                "auth", WARNING, "rendezvous: rejected %s: its proof did not verify "
                "(wrong rendezvous secret?)", peer,
            )  # fmt: skip
        except ProtocolError as exc:
            if conn is None:
                self._rejections.log(
                    "protocol", WARNING, "rendezvous: closing %s before authentication: %s",
                    peer, exc,
                )  # fmt: skip
            else:  # a holder of the secret misbehaving: always worth a line
                log.warning("rendezvous: closing node %s at %s: %s", conn.node_id, peer, exc)
        except TimeoutError:
            what = f"node {conn.node_id} silent" if conn else "no handshake"
            log.info("rendezvous: closing %s: %s for too long", peer, what)
        except OSError as exc:
            if conn is not None and not conn.replaced:
                log.info("rendezvous: node %s at %s disconnected (%s)", conn.node_id, peer, exc)
            elif conn is None and challenged:
                # A client hangs up here when our proof fails it: secrets differ.
                self._rejections.log(
                    "auth", WARNING, "rendezvous: rejected by %s: it refused our proof "
                    "(wrong rendezvous secret?)", peer,
                )  # fmt: skip
        except Exception:
            log.exception("rendezvous: unexpected error on the connection from %s", peer)
        finally:
            if conn is not None and self._sessions.get(conn.node_id) is conn:
                del self._sessions[conn.node_id]
            await _close(writer)
            self._handlers.discard(task)
            self._open -= 1
            left = self._per_source.pop(source) - 1
            if left:
                self._per_source[source] = left

    def _admit(self, conn: _Conn) -> None:
        old = self._sessions.get(conn.node_id)
        self._sessions[conn.node_id] = conn
        if old is not None:
            old.replaced = True
            old.writer.close()
            log.info(
                "rendezvous: node %s reconnected from %s; closed its connection from %s",
                conn.node_id, conn.peer, old.peer,
            )  # fmt: skip
        conn.send(_WELCOME)
        held = self._held.take(conn.node_id, asyncio.get_running_loop().time())
        for _sender, plaintext in held:
            conn.send(plaintext)
        log.info(
            "rendezvous: node %s connected from %s (%d held messages delivered)",
            conn.node_id, conn.peer, len(held),
        )  # fmt: skip

    def _on_frame(self, conn: _Conn, payload: bytes) -> None:
        plaintext = conn.channel.open(payload)
        msg = decode_message(plaintext)
        if msg is Control.PING:
            conn.send(_PONG)
        elif isinstance(msg, Relay):
            if msg.sender != conn.node_id or msg.to == msg.sender:
                raise ProtocolError(f"relay from {msg.sender!r} to {msg.to!r} on this session")
            target = self._sessions.get(msg.to)
            if target is not None and target.writer.transport.get_write_buffer_size() > (
                MAX_WRITE_BUFFER
            ):
                log.warning("rendezvous: node %s is not reading; dropping it", target.node_id)
                target.writer.transport.abort()
                target = None
            if target is None or not target.send(plaintext):
                self._held.hold(msg.sender, msg.to, plaintext, asyncio.get_running_loop().time())
        else:
            raise ProtocolError(f"unexpected {msg!r} from a client")


class RendezvousClient:
    """One node's connection to the rendezvous server. Use on one asyncio
    loop's thread; not thread-safe."""

    def __init__(
        self,
        address: str,
        node_id: str,
        rendezvous_secret: str,
        on_message: Callable[[str, dict[str, Any]], None],
        *,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 5.0,
        on_connected: Callable[[int], None] | None = None,
    ) -> None:
        """``address``: the server's ``HOST:PORT``. ``on_message(from_id, body)``
        runs on the loop thread; what it raises is logged and dropped.
        ``on_connected(n)`` runs there after the ``n``-th session is
        established (messages sent on a connection that broke may be lost;
        this is the cue to repeat what still matters). Raises
        :class:`ConfigError` for a bad address, node id, secret or backoff."""
        self._host, self._port = _split_address(address)
        if not is_node_id(node_id):
            raise ConfigError(f"node_id: {node_id!r} must be 1-64 characters of [A-Za-z0-9._-]")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ConfigError("reconnect_min_s: must be > 0 and <= reconnect_max_s")
        self._keys = RendezvousKeys.from_secret(rendezvous_secret)
        self.node_id = node_id
        self._on_message = on_message
        self._on_connected = on_connected
        self._sessions = 0
        self._min_s, self._max_s = reconnect_min_s, reconnect_max_s
        self._outbox: dict[str, bytes] = {}
        self._conn: _Conn | None = None
        self._udp: socket.socket | None = None
        self._redial = False
        self._wake = asyncio.Event()
        #: Loop time at which the current session was established (``None``: none).
        self.connected_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._failures = _Throttle(CLIENT_LOG_INTERVAL_S)
        self._ping_interval_s = PING_INTERVAL_S
        self._server_silent_s = SERVER_SILENT_S

    def start(self) -> None:
        """Connect, and keep reconnecting until :meth:`close`. Call on the
        running loop. Raises ``RuntimeError`` off the loop or if started twice."""
        loop = asyncio.get_running_loop()
        if self._task is not None:
            raise RuntimeError("RendezvousClient.start called twice")
        self._task = loop.create_task(self._run(), name=f"rendezvous-client-{self.node_id}")

    def send(self, to: str, body: dict[str, Any]) -> None:
        """Relay ``body`` to node ``to``; never blocks. While disconnected only
        the latest body per destination is kept and sent on reconnect. Raises
        :class:`InvalidMessage` (a ``ValueError``) when ``to`` is this node or
        not a node id, or ``body`` is not a JSON object under 64 KiB."""
        if to == self.node_id:
            raise InvalidMessage("to: a node cannot send to itself")
        plaintext = encode_message(Relay(to=to, sender=self.node_id, body=body))
        conn = self._conn
        if conn is None or not conn.send(plaintext):
            self._outbox.pop(to, None)
            self._outbox[to] = plaintext

    def send_datagram(self, to: str, body: dict[str, Any]) -> None:
        """Relay ``body`` to ``to`` in one UDP datagram (rendezvous_dgram),
        without waiting for a session: for what is urgent while the TCP
        session is being re-established. Best effort (it may be lost, and the
        server drops it if ``to`` is not connected; not sent at all when the
        server's address is a host name): send it with :meth:`send` too.
        Raises like :meth:`send`, and ``ValueError`` for a body too large for
        a datagram."""
        if to == self.node_id:
            raise InvalidMessage("to: a node cannot send to itself")
        message = encode_message(Relay(to=to, sender=self.node_id, body=body))
        datagram = seal_datagram(self._keys, message, time.time(), os.urandom(16))
        try:
            if self._udp is None:
                try:  # a literal address only: a name lookup would block the loop
                    v6 = ipaddress.ip_address(self._host).version == 6
                except ValueError:
                    return  # a host name: the TCP copy goes
                sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._udp = sock
                sock.connect((self._host, self._port))
            self._udp.send(datagram)
        except OSError as exc:  # best effort; the TCP copy follows
            log.debug("rendezvous: datagram to %s not sent: %r", self._host, exc)

    def reconnect(self) -> None:
        """Our NAT moved (its mappings, the TCP one included, may be gone):
        drop the connection and dial again at once, without backoff. What
        :meth:`send` gets meanwhile waits for the new session. While not
        connected it cuts a pending backoff short (the next dial goes now)."""
        conn = self._conn
        if conn is None:
            self._wake.set()  # between dials: cut the backoff short
            return
        self._conn = self.connected_at = None
        self._redial = True
        conn.writer.transport.abort()

    @property
    def connected(self) -> bool:
        """Whether an authenticated session with the server is open now."""
        return self._conn is not None and not self._conn.writer.is_closing()

    async def close(self) -> None:
        """Stop reconnecting and close the connection. Queued messages are
        dropped. Idempotent."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._conn = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    async def _run(self) -> None:
        where = f"{self._host}:{self._port}"
        failures = 0
        while True:
            try:
                await self._session()
            except AuthenticationFailed as exc:
                self._failures.log(
                    "auth", ERROR,
                    "rendezvous rejected: wrong rendezvous secret? %s (server %s, node %s); "
                    "check rendezvous_secret on both sides", exc, where, self.node_id,
                )  # fmt: skip
            except ProtocolError as exc:
                self._failures.log("protocol", WARNING, "rendezvous %s: %s", where, exc)
            except OSError as exc:  # includes TimeoutError and ConnectionError
                level = INFO if self._conn is not None else WARNING
                self._failures.log("io", level, "rendezvous %s unreachable or lost: %r", where, exc)
            except Exception:  # a bug; keep the promise to reconnect until close()
                log.exception("rendezvous: unexpected error talking to %s", where)
            self.connected_at = None
            if self._redial:
                self._redial, failures = False, 0
                continue  # reconnect(): dial again at once
            if self._conn is not None:
                failures = 0
                self._conn = None
            else:
                failures += 1
            base = min(self._max_s, self._min_s * 2.0 ** max(0, failures - 1))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), min(self._max_s, base * (1.0 + 0.5 * self._rng.random()))
                )

    async def _session(self) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await self._dial()
        pinger: asyncio.Task[None] | None = None
        try:
            peer = _prepare(writer)
            frames = _Frames(reader)
            handshake = ClientHandshake(self._keys, self.node_id, os.urandom(NONCE_SIZE))
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                writer.write(encode_frame(handshake.hello()))
                auth, channel = handshake.on_challenge(await frames.next())
                writer.write(encode_frame(auth))
                welcome = decode_message(channel.open(await frames.next()))
                if welcome is not Control.WELCOME:
                    raise ProtocolError(f"expected a welcome, got {welcome!r}")
            conn = self._conn = _Conn(self.node_id, channel, writer, peer)
            self.connected_at = asyncio.get_running_loop().time()
            self._failures = _Throttle(CLIENT_LOG_INTERVAL_S)  # log the next failure at once
            log.info("rendezvous: connected to %s as %s", peer, self.node_id)
            outbox, self._outbox = self._outbox, {}
            for plaintext in outbox.values():
                conn.send(plaintext)
            self._sessions += 1
            if self._on_connected is not None:
                try:
                    self._on_connected(self._sessions)
                except Exception:
                    log.exception("rendezvous: on_connected raised")
            pinger = asyncio.get_running_loop().create_task(self._ping(conn))
            while True:
                async with asyncio.timeout(self._server_silent_s):
                    msg = decode_message(channel.open(await frames.next()))
                if isinstance(msg, Relay):
                    if msg.to != self.node_id:
                        raise ProtocolError(f"got a relay addressed to {msg.to!r}")
                    self._deliver(msg)
                elif msg is not Control.PONG:
                    raise ProtocolError(f"unexpected {msg!r} from the server")
        finally:
            if pinger is not None:
                pinger.cancel()
            await _close(writer)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection to the server, starting a second attempt if
        the first has not connected within :data:`DIAL_RACE_S`; the first to
        connect wins and the other is cancelled (or closed, if it connected
        too). Raises the last ``OSError`` when every attempt failed."""
        loop = asyncio.get_running_loop()
        dials = [loop.create_task(asyncio.open_connection(self._host, self._port))]
        winner: asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        try:
            done, _ = await asyncio.wait(dials, timeout=DIAL_RACE_S)
            if not done:
                dials.append(loop.create_task(asyncio.open_connection(self._host, self._port)))
            pending = list(dials)
            while winner is None:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((t for t in done if t.exception() is None), None)
                pending = [t for t in pending if not t.done()]
                if winner is None and not pending:
                    raise next(iter(done)).exception()  # type: ignore[misc]
            return winner.result()
        finally:
            for t in dials:
                if not t.done():
                    t.cancel()
                elif t is not winner and not t.cancelled() and t.exception() is None:
                    t.result()[1].close()

    async def _ping(self, conn: _Conn) -> None:
        while conn.send(_PING):
            await asyncio.sleep(self._ping_interval_s)

    def _deliver(self, msg: Relay) -> None:
        try:
            self._on_message(msg.sender, msg.body)
        except Exception:
            log.exception("rendezvous: on_message raised for a message from %s", msg.sender)


__all__ = ["RendezvousClient", "RendezvousServer"]
