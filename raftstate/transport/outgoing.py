"""Send side of the reliable link's byte stream: bytes not sent yet, chunks
sent but unacknowledged, and the retransmission queue.

The stream is ``varint(len) || message`` per message (see
:mod:`raftstate.transport.frames`). A chunk is cut from the unsent bytes once,
when a frame has room for it, and from then on is one :class:`OutChunk`
object however many frames carry it (original, redundant copies, probes,
retransmissions): it is acknowledged as soon as any of them is, and queued
for retransmission only when no frame carrying it is still in flight.

A message pushed *unordered* (small ones only, see :data:`MAX_UNORDERED`) is
never split or merged with ordered bytes: its chunk holds whole unordered
messages and carries a *barrier*, the stream offset where the last ordered
message before it ends. The receiver may deliver it as soon as everything
before the barrier was delivered, ahead of unordered messages still being
repaired; ordered messages still wait for everything before them.
"""

from __future__ import annotations

import heapq
from collections import deque

from raftstate.transport.frames import MAX_CHUNKS, encode_varint, varint_size

#: Largest message (with its length prefix) that may be sent unordered; a
#: larger one goes ordered (it spans datagrams anyway).
MAX_UNORDERED = 1024


class OutChunk:
    """``data`` at stream ``offset``, and its fate. ``barrier`` >= 0: whole
    unordered messages deliverable once the stream before ``barrier`` was."""

    __slots__ = ("acked", "barrier", "data", "in_flight", "offset", "queued", "record_size")

    def __init__(self, offset: int, data: bytes, barrier: int = -1) -> None:
        self.offset = offset
        self.data = data
        self.barrier = barrier
        self.acked = False
        self.in_flight = 0  # outstanding frames carrying it
        self.queued = False  # waiting in the retransmission queue
        #: Bytes of its chunk record in a frame (offset, length, tag, data).
        tag = 1 if barrier < 0 else varint_size(offset - barrier + 1)
        self.record_size = varint_size(offset) + varint_size(len(data)) + tag + len(data)


class OutgoingStream:
    """The sender's stream state. Not thread-safe."""

    __slots__ = ("_barriers", "_head_pos", "_ordered_end", "_pending", "_pushed", "_retx",
                 "_seq", "_unacked", "buffered", "next_offset", "pending_bytes",
                 "retx_bytes")  # fmt: skip

    def __init__(self) -> None:
        self._pending: deque[bytes] = deque()  # unsent pieces of the stream
        #: Per piece of _pending: -1 ordered, else the unordered message's barrier.
        self._barriers: deque[int] = deque()
        self._pushed = 0  # stream bytes pushed so far
        self._ordered_end = 0  # where the last ordered message pushed ends
        self._head_pos = 0  # bytes of _pending[0] already cut into chunks
        self._unacked: deque[OutChunk] = deque()  # cut, not yet acked, by offset
        self._retx: list[tuple[int, int, OutChunk]] = []  # heap: lowest offset first
        self._seq = 0
        #: Stream offset of the next byte to cut.
        self.next_offset = 0
        #: Bytes not cut into chunks yet.
        self.pending_bytes = 0
        #: Bytes held: not yet cut, or cut and not yet acknowledged.
        self.buffered = 0
        #: Data bytes of the chunks in the retransmission queue (some may
        #: have been acked or re-sent meanwhile: an upper bound).
        self.retx_bytes = 0

    def push(self, message: bytes, *, ordered: bool = True) -> int:
        """Append ``message`` to the stream; returns the stream bytes it took.
        ``ordered=False``: it may be delivered ahead of earlier unordered
        messages (it goes ordered if larger than :data:`MAX_UNORDERED`)."""
        prefix = encode_varint(len(message))
        size = len(prefix) + len(message)
        if not ordered and size <= MAX_UNORDERED:
            self._pending.append(prefix + bytes(message))
            self._barriers.append(self._ordered_end)
        elif len(message) <= 4096:
            self._pending.append(prefix + bytes(message))
            self._barriers.append(-1)
        else:  # do not copy a large message just to prepend its length
            self._pending.extend((prefix, bytes(message)))
            self._barriers.extend((-1, -1))
        self._pushed += size
        if ordered or size > MAX_UNORDERED:
            self._ordered_end = self._pushed
        self.pending_bytes += size
        self.buffered += size
        return size

    def lowest_unacked(self) -> int:
        """Offset of the first byte not acknowledged yet."""
        while self._unacked and self._unacked[0].acked:
            self._unacked.popleft()
        return self._unacked[0].offset if self._unacked else self.next_offset

    def cut(self, size: int, *, force: bool = False) -> OutChunk | None:
        """The next at most ``size`` (> 0) unsent bytes as a chunk: ordered
        bytes up to the next unordered message, or whole unordered messages
        (``None`` if the first does not fit ``size``). ``force`` (the frame
        holds nothing else): an unordered message that does not fit goes as
        ordered bytes instead (stricter, so still correct), so a frame whose
        room a large ACK block shrank can never stall the stream."""
        pending, barriers = self._pending, self._barriers
        parts: list[bytes] = []
        left = size
        if force and barriers[0] >= 0 and len(pending[0]) > size:
            barriers[0] = -1
        barrier = barriers[0]
        if barrier >= 0:  # whole unordered messages, all with this barrier
            while pending and barriers[0] == barrier and len(pending[0]) <= left:
                parts.append(pending.popleft())
                barriers.popleft()
                left -= len(parts[-1])
            if not parts:
                return None
        else:
            while left and pending and barriers[0] < 0:
                head = pending[0]
                avail = len(head) - self._head_pos
                if avail <= left:
                    parts.append(head[self._head_pos :] if self._head_pos else head)
                    pending.popleft()
                    barriers.popleft()
                    self._head_pos = 0
                    left -= avail
                else:
                    parts.append(head[self._head_pos : self._head_pos + left])
                    self._head_pos += left
                    left = 0
        size -= left
        self.pending_bytes -= size
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        chunk = OutChunk(self.next_offset, data, barrier)
        self.next_offset += size
        self._unacked.append(chunk)
        return chunk

    def on_frame_acked(self, chunks: list[OutChunk]) -> None:
        """A frame carrying ``chunks`` was acknowledged."""
        for chunk in chunks:
            chunk.in_flight -= 1
            if not chunk.acked:
                chunk.acked = True
                self.buffered -= len(chunk.data)

    def on_frame_lost(self, chunks: list[OutChunk]) -> None:
        """A frame carrying ``chunks`` was declared lost: queue each chunk no
        other frame in flight still carries."""
        for chunk in chunks:
            chunk.in_flight -= 1
            if not chunk.acked and not chunk.queued and chunk.in_flight == 0:
                chunk.queued = True
                self.retx_bytes += len(chunk.data)
                self._seq += 1
                heapq.heappush(self._retx, (chunk.offset, self._seq, chunk))

    @property
    def has_retransmits(self) -> bool:
        """Whether chunks are queued for retransmission (some may turn out
        acked or carried already when popped)."""
        return bool(self._retx)

    def pop_retransmits(self, room: int) -> list[OutChunk]:
        """Queued chunks for one frame, lowest offset first (it holds back
        delivery), while their records fit ``room`` bytes."""
        chunks: list[OutChunk] = []
        while self._retx and len(chunks) < MAX_CHUNKS:
            chunk = self._retx[0][2]
            if chunk.acked or chunk.in_flight:  # done, or a probe or copy carries it
                heapq.heappop(self._retx)
                chunk.queued = False
                self.retx_bytes -= len(chunk.data)
                continue
            if chunk.record_size > room:
                break
            heapq.heappop(self._retx)
            chunk.queued = False
            self.retx_bytes -= len(chunk.data)
            chunks.append(chunk)
            room -= chunk.record_size
        return chunks

    def queued(self) -> list[OutChunk]:
        """The retransmission queue, lowest offset first (not removed)."""
        return [entry[2] for entry in sorted(self._retx)]


def fit(candidates: list[OutChunk], room: int, taken: int = 0) -> list[OutChunk]:
    """Unacked ``candidates`` in order, each once, whose records fit ``room``
    bytes (one that does not fit is skipped), in a frame already holding
    ``taken`` chunks."""
    chunks: list[OutChunk] = []
    for chunk in candidates:
        if taken + len(chunks) >= MAX_CHUNKS:
            break
        if chunk.acked or chunk.record_size > room or chunk in chunks:
            continue
        chunks.append(chunk)
        room -= chunk.record_size
    return chunks
