"""Transport cost per Raft message: each transport's codec path, in process, without Raft.

What one node spends to send and to receive one pysyncobj message on each
Raft transport, with Raft, sockets and threads taken out:

* ``tcp``: pysyncobj's ``TcpConnection`` as our TCP transport runs it
  (:class:`~raftstate.transport.tcp.CodecTcpConnection`): ``send`` (the wire
  codec, the per-connection random key, Fernet under the key pysyncobj derives
  from the cluster secret, as our ``RaftNode`` configures it with
  ``password``, the length prefix) and its parser (frame cap, Fernet
  timestamp check + HMAC + AES-CBC decrypt, random-key check, decode). Real
  objects, given no socket: the bytes are taken from and put into the
  connection's own buffers.
* ``udp``: what :class:`~raftstate.transport.udp.UdpTransport` does per
  message: the wire codec, ``ReliableLink.send`` + ``poll_transmit`` and
  ``SecureChannel.seal`` per datagram on the way out;
  ``SecureChannel.receive`` + ``ReliableLink.receive`` per datagram, the one
  ``poll_transmit`` the driver runs after a turn's datagrams (it may owe an
  ACK), and decode on the way in. The link is configured as ``RaftNode``
  configures it, on a session made by a real handshake.

The workload is the loopback steady state of a leader and one follower on a
virtual clock: the leader sends an AppendEntries carrying one log entry (a
``HeartbeatBatch`` of ``batch`` heartbeats in our log command format,
:mod:`raftstate.logcommand`), the follower answers ``next_node_idx``, 50 µs each way;
then ``gap_s`` passes (5 ms: 200 AppendEntries/s per follower, i.e. 800
heartbeats/s in 4-heartbeat batches). Every frame the link's timers produce
in the gap (delayed ACKs, tail copies) is sent, delivered and counted as
``timer_us``; so is the peer's handling of ACKs owed at once. TCP has none.

Not included, on either side: syscalls (``send``/``sendto``/``recv``), the
poller, and UDP's thread hand-offs (tick thread -> event loop -> tick thread,
each a pipe write and a wake-up) and its asyncio timer handles. The end-to-end
``hb-open`` phase of ``raftstate bench --transport`` measures those.

Each step is timed with ``perf_counter_ns`` (cheap); the median over
``blocks`` blocks of iterations damps noise from the rest of the machine, and
``cpu_over_wall`` (process CPU / wall time of the whole timed loop, ~1.0 on an
idle core) shows whether the process was descheduled meanwhile.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pysyncobj.encryptor import getEncryptor
from pysyncobj.tcp_connection import TcpConnection

from bench.load import PAYLOAD
from raftstate import logcommand
from raftstate.config import TRANSPORTS, NodeConfig
from raftstate.model import Heartbeat
from raftstate.statemachine import encode_batch
from raftstate.transport import wirecodec
from raftstate.transport.envelope import Delivered, HandshakeEvent, SecureChannel
from raftstate.transport.reliable import ReliableLink
from raftstate.transport.tcp import CodecTcpConnection
from raftstate.transport.udpconfig import DATAGRAM_SIZE, settings_for

ONE_WAY_S = 50e-6
DEFAULT_GAP_S = 0.005
DEFAULT_BATCH = 4
#: Guard against a link whose timers never settle inside one gap.
_MAX_TIMER_FIRINGS = 256
_BUCKETS = ("send", "recv", "reply_send", "reply_recv", "timer")


@dataclass(frozen=True, slots=True)
class TransportCost:
    """One transport's cost per message, in µs of one core (medians over
    blocks). ``send_us``/``recv_us``: the leader sending / the follower
    receiving one AppendEntries; ``reply_*``: its ``next_node_idx`` answer
    the other way; ``timer_us``: per exchange, frames the link's timers and
    owed ACKs added (both ends, out and in; 0 for tcp); ``exchange_us``: the
    sum, one whole AppendEntries round trip at both ends."""

    transport: str
    iterations: int
    batch: int
    gap_ms: float
    message_bytes: int  # the encoded AppendEntries
    send_us: float
    recv_us: float
    reply_send_us: float
    reply_recv_us: float
    timer_us: float
    exchange_us: float
    #: Wire units per exchange (udp: datagrams; tcp: length-prefixed frames).
    datagrams_per_exchange: float
    wire_bytes_per_exchange: float
    cpu_over_wall: float


class CodecEnd(Protocol):
    """One node's end of a transport, sans-IO: what goes on the wire and
    what comes off it."""

    def send(self, message: Any, now: float) -> list[bytes]:
        """Wire units for ``message`` (and anything else due)."""
        ...

    def receive(self, wires: list[bytes], now: float) -> tuple[list[Any], list[bytes]]:
        """The messages ``wires`` complete, and wire units owed back at once."""
        ...

    def due(self, now: float) -> list[bytes]:
        """Wire units the end's timers produce at ``now``."""
        ...

    def next_timeout(self) -> float | None:
        """When :meth:`due` must run next, or ``None``."""
        ...


class TcpEnd:
    """One end of a pysyncobj ``TcpConnection`` after its random-key
    exchange, with no socket. Reaches into the connection's (name-mangled)
    buffers, which is what pysyncobj's poller would fill and drain."""

    def __init__(self, encryptor: Any, send_key: bytes, recv_key: bytes) -> None:
        # A huge timeout: the connection must not "time out" and drop its keys.
        self._conn = CodecTcpConnection.adopt(
            TcpConnection(poller=None, timeout=1e12), lambda reason, detail: None
        )
        self._conn.encryptor = encryptor
        self._conn.sendRandKey = send_key
        self._conn.recvRandKey = recv_key

    def send(self, message: Any, now: float) -> list[bytes]:
        self._conn.send(message)
        data: bytes = self._conn._TcpConnection__writeBuffer
        self._conn._TcpConnection__writeBuffer = b""
        return [data]

    def receive(self, wires: list[bytes], now: float) -> tuple[list[Any], list[bytes]]:
        conn = self._conn
        out: list[Any] = []
        for wire in wires:
            conn._TcpConnection__readBuffer += wire
            while (message := conn._TcpConnection__processParseMessage()) is not None:
                out.append(message)
        return out, []

    def due(self, now: float) -> list[bytes]:
        return []

    def next_timeout(self) -> float | None:
        return None


class UdpEnd:
    """One node's :class:`SecureChannel` and its :class:`ReliableLink` to
    one peer, driven the way ``UdpTransport`` drives them."""

    def __init__(self, channel: SecureChannel, peer_id: str, link: ReliableLink) -> None:
        self._channel = channel
        self._peer = peer_id
        self._link = link

    def send(self, message: Any, now: float) -> list[bytes]:
        self._link.send(wirecodec.encode(message), now)
        return self.due(now)

    def receive(self, wires: list[bytes], now: float) -> tuple[list[Any], list[bytes]]:
        out: list[Any] = []
        for wire in wires:
            event = self._channel.receive(wire)
            if not isinstance(event, Delivered):
                raise RuntimeError(f"udp codec dropped a datagram: {event}")
            out.extend(wirecodec.decode(m) for m in self._link.receive(event.payload, now))
        return out, self.due(now)

    def due(self, now: float) -> list[bytes]:
        seal, peer = self._channel.seal, self._peer
        return [seal(peer, payload) for payload in self._link.poll_transmit(now)]

    def next_timeout(self) -> float | None:
        return self._link.next_timeout()


def tcp_pair(secret: str) -> tuple[TcpEnd, TcpEnd]:
    """Leader and follower ends of one encrypted pysyncobj connection."""
    encryptor = getEncryptor(secret)
    to_follower, to_leader = os.urandom(32), os.urandom(32)
    return (
        TcpEnd(encryptor, send_key=to_follower, recv_key=to_leader),
        TcpEnd(encryptor, send_key=to_leader, recv_key=to_follower),
    )


def udp_pair(secret: str, now: float = 1.0e9) -> tuple[UdpEnd, UdpEnd]:
    """Leader and follower ends with a session from a real handshake and
    links configured as ``RaftNode`` configures them. Raises
    ``RuntimeError`` if the handshake does not complete."""
    ids = ("n1", "n2")
    channels = {me: SecureChannel(me, [peer], secret, now=now) for me, peer in (ids, ids[::-1])}
    pending = [("n2", channels["n1"].hello("n2"))]
    while pending:
        to, datagram = pending.pop()
        event = channels[to].receive(datagram)
        if isinstance(event, HandshakeEvent) and event.reply is not None:
            pending.append((event.peer_id, event.reply))
    if any(c.session(p) is None for c, p in ((channels["n1"], "n2"), (channels["n2"], "n1"))):
        raise RuntimeError("the in-process handshake did not establish a session")
    cfg = NodeConfig.default()
    members = [(i, f"127.0.0.1:{7101 + k}") for k, i in enumerate(ids)]
    # The link settings RaftNode's transport_factory builds for a default config.
    link = settings_for(
        "n1", members[0][1], members, secret,
        dead_after=max(cfg.connection_timeout_ms / 1000, 1.5),
    ).link  # fmt: skip
    payload = SecureChannel.max_payload(DATAGRAM_SIZE)
    return (
        UdpEnd(channels["n1"], "n2", ReliableLink(payload, config=link)),
        UdpEnd(channels["n2"], "n1", ReliableLink(payload, config=link)),
    )


def append_entries(index: int, batch: int, *, term: int = 2) -> dict[str, Any]:
    """The AppendEntries a pysyncobj leader sends for log entry ``index``
    holding one ``HeartbeatBatch`` of ``batch`` heartbeats."""
    heartbeats = [
        Heartbeat(f"bench-{(index * batch + k) % 100_000:07d}", 1_700_000_000_000_000 + index,
                  PAYLOAD, 0, sum(len(a) + len(b) for a, b in PAYLOAD.items()))
        for k in range(batch)
    ]  # fmt: skip
    entry = encode_batch(heartbeats, 1_764_000_000_000 + index)
    command = logcommand.encode(entry)
    return {
        "type": "append_entries", "term": term, "commit_index": index - 1,
        "entries": [(command, index, term)], "prevLogIdx": index - 1, "prevLogTerm": term,
    }  # fmt: skip


def next_node_idx(index: int) -> dict[str, Any]:
    """The follower's answer to the AppendEntries for ``index``."""
    return {"type": "next_node_idx", "next_node_idx": index + 1, "reset": False, "success": True}


class _Exchange:
    """Drives a leader end and a follower end through the workload,
    accumulating ns per bucket and wire units."""

    def __init__(self, leader: CodecEnd, follower: CodecEnd, gap_s: float) -> None:
        self.leader, self.follower, self.gap_s = leader, follower, gap_s
        self.now = 1.0
        self.ns = dict.fromkeys(_BUCKETS, 0)
        self.wires = 0
        self.wire_bytes = 0

    def _count(self, wires: list[bytes]) -> list[bytes]:
        self.wires += len(wires)
        self.wire_bytes += sum(len(w) for w in wires)
        return wires

    def _deliver(self, to: CodecEnd, wires: list[bytes]) -> None:
        """Frames outside the message path (owed ACKs, timer frames): both
        the receiving and anything it owes back count as ``timer``."""
        back = self.follower if to is self.leader else self.leader
        clock = time.perf_counter_ns
        while wires:
            self.now += ONE_WAY_S
            t0 = clock()
            _, owed = to.receive(wires, self.now)
            self.ns["timer"] += clock() - t0
            wires = self._count(owed)
            to, back = back, to

    def _one_way(self, src: CodecEnd, dst: CodecEnd, message: Any, send: str, recv: str) -> None:
        clock = time.perf_counter_ns
        t0 = clock()
        wires = src.send(message, self.now)
        t1 = clock()
        self.ns[send] += t1 - t0
        self._count(wires)
        self.now += ONE_WAY_S
        t0 = clock()
        got, owed = dst.receive(wires, self.now)
        self.ns[recv] += clock() - t0
        if got != [message]:
            raise RuntimeError(f"codec delivered {len(got)} message(s), not the one sent")
        self._deliver(src, self._count(owed))

    def _timers_until(self, end: float) -> None:
        clock = time.perf_counter_ns
        for _ in range(_MAX_TIMER_FIRINGS):
            due = [
                (t, e) for e in (self.leader, self.follower) if (t := e.next_timeout()) is not None
            ]
            if not due:
                break
            at, end_point = min(due, key=lambda d: d[0])
            if at > end:
                break
            self.now = max(self.now, at)
            t0 = clock()
            wires = end_point.due(self.now)
            self.ns["timer"] += clock() - t0
            other = self.follower if end_point is self.leader else self.leader
            self._deliver(other, self._count(wires))
        else:
            raise RuntimeError("link timers did not settle within one gap")
        self.now = max(self.now, end)

    def step(self, index: int, batch: int) -> None:
        start = self.now
        self._one_way(self.leader, self.follower, append_entries(index, batch), "send", "recv")
        reply = next_node_idx(index)
        self._one_way(self.follower, self.leader, reply, "reply_send", "reply_recv")
        self._timers_until(start + self.gap_s)


def make_pair(transport: str, secret: str) -> tuple[CodecEnd, CodecEnd]:
    """Leader and follower ends for ``transport`` ("tcp" or "udp").
    Raises ``ValueError`` for another name."""
    if transport == "tcp":
        return tcp_pair(secret)
    if transport == "udp":
        return udp_pair(secret)
    raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")


def measure(
    transport: str,
    *,
    iterations: int = 10_000,
    warmup: int = 1_000,
    batch: int = DEFAULT_BATCH,
    gap_s: float = DEFAULT_GAP_S,
    blocks: int = 5,
    secret: str | None = None,
) -> TransportCost:
    """Run the workload of the module docstring on ``transport`` in this
    process and return its cost per message. Takes roughly
    ``iterations * 0.3 ms``. Raises ``ValueError`` for an unknown transport
    or non-positive counts, ``RuntimeError`` if a codec loses or corrupts a
    message. Not thread-safe (uses the process clock)."""
    if iterations < blocks or blocks < 1 or warmup < 0 or batch < 1 or gap_s < 0:
        raise ValueError("need iterations >= blocks >= 1, warmup >= 0, batch >= 1, gap_s >= 0")
    leader, follower = make_pair(transport, secret or secrets.token_urlsafe(32))
    ex = _Exchange(leader, follower, gap_s)
    index = 1
    for _ in range(warmup):
        ex.step(index, batch)
        index += 1
    per_block: dict[str, list[float]] = {b: [] for b in _BUCKETS}
    ex.wires = ex.wire_bytes = 0
    sizes = [iterations // blocks + (1 if i < iterations % blocks else 0) for i in range(blocks)]
    cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
    for size in sizes:
        ex.ns = dict.fromkeys(_BUCKETS, 0)
        for _ in range(size):
            ex.step(index, batch)
            index += 1
        for b in _BUCKETS:
            per_block[b].append(ex.ns[b] / size / 1000)
    cpu, wall = time.process_time_ns() - cpu0, time.perf_counter_ns() - wall0
    us = {b: statistics.median(v) for b, v in per_block.items()}
    return TransportCost(
        transport=transport,
        iterations=iterations,
        batch=batch,
        gap_ms=gap_s * 1000,
        message_bytes=len(wirecodec.encode(append_entries(index, batch))),
        send_us=round(us["send"], 2),
        recv_us=round(us["recv"], 2),
        reply_send_us=round(us["reply_send"], 2),
        reply_recv_us=round(us["reply_recv"], 2),
        timer_us=round(us["timer"], 2),
        exchange_us=round(sum(us.values()), 2),
        datagrams_per_exchange=round(ex.wires / iterations, 3),
        wire_bytes_per_exchange=round(ex.wire_bytes / iterations, 1),
        cpu_over_wall=round(cpu / wall, 3) if wall else 0.0,
    )


#: (column title, field, format) of the cost table.
_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("AE send us", "send_us", lambda v: f"{v:.1f}"),
    ("AE recv us", "recv_us", lambda v: f"{v:.1f}"),
    ("reply send us", "reply_send_us", lambda v: f"{v:.1f}"),
    ("reply recv us", "reply_recv_us", lambda v: f"{v:.1f}"),
    ("timer+ack us", "timer_us", lambda v: f"{v:.1f}"),
    ("exchange us", "exchange_us", lambda v: f"{v:.1f}"),
    ("wire/exch", "datagrams_per_exchange", lambda v: f"{v:.2f}"),
    ("bytes/exch", "wire_bytes_per_exchange", lambda v: f"{v:.0f}"),
    ("cpu/wall", "cpu_over_wall", lambda v: f"{v:.2f}"),
)


def render_costs(costs: list[TransportCost]) -> str:
    """The costs as a fixed-width table, one row per entry."""
    head = f"{'transport':<9} " + " ".join(f"{t:>13}" for t, _, _ in _COLUMNS)
    lines = [head, "-" * len(head)]
    for c in costs:
        cells = " ".join(f"{fmt(float(getattr(c, name))):>13}" for _, name, fmt in _COLUMNS)
        lines.append(f"{c.transport:<9} {cells}")
    return "\n".join(lines)


__all__ = [
    "CodecEnd",
    "TcpEnd",
    "TransportCost",
    "UdpEnd",
    "append_entries",
    "make_pair",
    "measure",
    "next_node_idx",
    "render_costs",
    "tcp_pair",
    "udp_pair",
]
