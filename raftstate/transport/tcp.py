"""pysyncobj's TCP transport, speaking :mod:`~raftstate.transport.tcpframe`
instead of pickle + zlib.

pysyncobj's ``TcpConnection`` unpickles every frame (after Fernet only when
the cluster has a password) and buffers any length a peer announces. We keep
its sockets, poller integration, handshake order and Fernet encryptor and
replace exactly three steps, by overriding its (name-mangled) methods in
:class:`CodecTcpConnection`:

* ``send``: encode with :func:`tcpframe.encode_body` (a schema, never a pickle);
* ``__processRead``: read no further once the buffered frame header announces
  more than :data:`tcpframe.MAX_FRAME_BYTES` (close) or a whole frame is
  buffered (parse it first; the rest waits in the kernel, the poller is
  level-triggered), so a connection buffers at most one frame plus one
  ``recv``;
* ``__processParseMessage``: Fernet check as before, then
  :func:`tcpframe.decode_body`; an over-long, unauthentic or undecodable frame
  closes the connection and is counted and logged (rate-limited).

pysyncobj builds connections in two places it does not let us configure
(``TCPTransport.addNode`` and ``TcpServer``'s accept). Rather than copy that
code or swap module globals, :class:`CodecTCPTransport` re-classes each
connection the moment pysyncobj hands it over, before it has read or sent a
byte (:meth:`CodecTcpConnection.adopt`). It also checks the handshake: an
incoming connection must present (after the key exchange when there is a
secret) the address of a member; pysyncobj's ``readonly`` nodes and utility
commands are not accepted, and a peer that sends the wrong kind of value is
disconnected.

Threading: everything here runs on pysyncobj's tick thread;
:meth:`CodecTCPTransport.drop_counts` may be called from any thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cryptography.fernet import InvalidToken
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from raftstate.errors import DecodeError
from raftstate.transport import tcpframe
from raftstate.transport.udpconfig import DROP_LOG_INTERVAL

log = logging.getLogger("raftstate.transport.tcp")

BadFrame = Callable[[str, str], None]
#: Incoming connections that have not finished the handshake (key exchange
#: and a member's address): at most this many at once, and each for at most
#: this long. Each may buffer one frame (up to MAX_FRAME_BYTES): without these
#: bounds 150 idle unauthenticated connections took a node to 888 MB.
MAX_HANDSHAKING = 16
HANDSHAKE_TIMEOUT_S = 5.0
_REASONS = ("oversize", "bad_mac", "undecodable", "handshake")


class CodecTcpConnection(TcpConnection):  # type: ignore[misc]
    """A ``TcpConnection`` whose frames are :mod:`tcpframe` bodies."""

    _on_bad_frame: BadFrame | None = None
    # pysyncobj's instance attributes this class reads or writes.
    _TcpConnection__readBuffer: bytes
    _TcpConnection__writeBuffer: bytes
    recvLastTimestamp: int
    sendRandKey: bytes | None
    recvRandKey: bytes | None

    @classmethod
    def adopt(cls, conn: TcpConnection, on_bad_frame: BadFrame) -> CodecTcpConnection:
        """Turn pysyncobj's freshly built ``conn`` into one of ours (same
        object, so every callback pysyncobj registered stays valid). Only
        before the connection has read or sent anything."""
        conn.__class__ = cls
        conn._on_bad_frame = on_bad_frame
        return conn  # type: ignore[no-any-return]

    def send(self, message: Any) -> None:
        """Queue one frame. Raises ``EncodeError`` for a value no schema
        fits (a bug in the sender)."""
        body = tcpframe.encode_body(message, self.sendRandKey)
        if self.encryptor:
            body = self.encryptor.encrypt_at_time(body, int(monotonic_time()))
        self._TcpConnection__writeBuffer += tcpframe.HEADER.pack(len(body)) + body
        self._TcpConnection__trySendBuffer()

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 - overrides pysyncobj's
        buffered = self._TcpConnection__readBuffer
        if len(buffered) >= tcpframe.HEADER.size:
            try:
                length = tcpframe.frame_length(buffered)
            except DecodeError as exc:
                self._reject("oversize", exc)
                return False
            if len(buffered) >= tcpframe.HEADER.size + length:
                return False  # a whole frame waits: parse it before reading more
        return bool(TcpConnection._TcpConnection__processRead(self))

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 - overrides pysyncobj's
        buffered = self._TcpConnection__readBuffer
        if len(buffered) < tcpframe.HEADER.size:
            return None
        try:
            length = tcpframe.frame_length(buffered)
        except DecodeError as exc:
            self._reject("oversize", exc)
            return None
        end = tcpframe.HEADER.size + length
        if len(buffered) < end:
            return None
        body = buffered[tcpframe.HEADER.size : end]
        try:
            if self.encryptor:
                stamp = self.encryptor.extract_timestamp(body)
                if stamp < self.recvLastTimestamp:
                    raise DecodeError("frame older than the previous one")
                self.recvLastTimestamp = stamp
                body = self.encryptor.decrypt(body)
            message = tcpframe.decode_body(body, self.recvRandKey)
        except InvalidToken:
            self._reject("bad_mac", DecodeError("frame failed authentication"))
            return None
        except DecodeError as exc:
            self._reject("undecodable", exc)
            return None
        self._TcpConnection__readBuffer = buffered[end:]
        return message

    def _reject(self, reason: str, exc: DecodeError) -> None:
        if self._on_bad_frame is not None:
            self._on_bad_frame(reason, exc.message)
        self.disconnect()


class CodecTCPTransport(TCPTransport):  # type: ignore[misc]
    """pysyncobj's ``TCPTransport`` whose connections are
    :class:`CodecTcpConnection` and whose handshake is checked."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        # Set before super().__init__, which adds the nodes (and connections).
        # All keys exist from the start: drop_counts may copy from another thread.
        self._drops = dict.fromkeys(_REASONS, 0)
        self._drop_logged: dict[str, float] = {}
        self._accepted: dict[Any, float] = {}
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self._expire_handshakes)

    def _expire_handshakes(self) -> None:
        """Tick thread: close incoming connections still in the handshake
        after ``HANDSHAKE_TIMEOUT_S``."""
        if not self._accepted:
            return
        now = time.monotonic()
        for conn, at in list(self._accepted.items()):
            if conn not in self._unknownConnections:
                del self._accepted[conn]
            elif now - at > HANDSHAKE_TIMEOUT_S:
                del self._accepted[conn]
                self._on_bad_frame("handshake", "no handshake within the timeout")
                self._unknownConnections.discard(conn)
                conn.disconnect()

    def addNode(self, node: Any) -> None:  # noqa: N802 - pysyncobj's name
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, CodecTcpConnection):
            CodecTcpConnection.adopt(conn, self._on_bad_frame)

    def send(self, node: Any, message: Any) -> bool:
        """pysyncobj's send, except on a connection whose key exchange is not
        done: pysyncobj marks an outgoing connection CONNECTED as soon as
        the socket connects, and sends request_vote to every node whatever
        its state, so a vote could go out without the peer's connection key
        (stock pysyncobj: an assertion on the peer; here: the peer closed
        the connection as undecodable, seen during elections under load).
        Such a message is not sent (``False``; Raft resends votes)."""
        conn = self._connections.get(node)
        if conn is not None and self._syncObj.encryptor and not conn.sendRandKey:
            return False
        return bool(super().send(node, message))

    def _onNewIncomingConnection(self, conn: Any) -> None:  # noqa: N802
        CodecTcpConnection.adopt(conn, self._on_bad_frame)
        self._expire_handshakes()
        if len(self._unknownConnections) >= MAX_HANDSHAKING:
            self._on_bad_frame("handshake", f"more than {MAX_HANDSHAKING} connections in handshake")
            conn.disconnect()
            return
        super()._onNewIncomingConnection(conn)
        self._accepted[conn] = time.monotonic()

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:  # noqa: N802
        """Handshake of a connection a peer opened: its connection key (with
        a secret), then a member's address. Anything else closes it."""
        if self._syncObj.encryptor and not conn.sendRandKey:
            ok = isinstance(message, bytes)
        else:
            ok = isinstance(message, str) and message in self._nodeAddrToNode
        if not ok:
            self._on_bad_frame("handshake", f"unexpected {type(message).__name__} in handshake")
            self._unknownConnections.discard(conn)
            conn.disconnect()
            return
        super()._onIncomingMessageReceived(conn, message)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:  # noqa: N802
        if not conn.sendRandKey and not isinstance(message, bytes):
            self._on_bad_frame("handshake", f"unexpected {type(message).__name__} in handshake")
            conn.disconnect()
            return
        super()._onOutgoingMessageReceived(conn, message)

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if not isinstance(message, dict):  # a handshake value after the handshake
            self._on_bad_frame("handshake", f"unexpected {type(message).__name__} from {node}")
            conn = self._connections.get(node)
            if conn is not None and conn.state != CONNECTION_STATE.DISCONNECTED:
                conn.disconnect()
            return
        super()._onMessageReceived(node, message)

    def drop_counts(self) -> dict[str, int]:
        """Connections closed for a bad frame, by reason (``oversize``,
        ``bad_mac``, ``undecodable``, ``handshake``). Safe from any thread."""
        return {reason: n for reason, n in list(self._drops.items()) if n}

    def _on_bad_frame(self, reason: str, detail: str) -> None:
        self._drops[reason] += 1
        now = time.monotonic()
        if now - self._drop_logged.get(reason, -DROP_LOG_INTERVAL) >= DROP_LOG_INTERVAL:
            self._drop_logged[reason] = now
            log.warning(
                "closing a Raft TCP connection (%s, %d so far): %s",
                reason, self._drops[reason], detail,
            )  # fmt: skip


__all__ = ["CodecTCPTransport", "CodecTcpConnection"]
