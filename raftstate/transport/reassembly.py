"""Receive side of the reliable link's byte stream: out-of-order chunks in,
whole messages out, in order, each exactly once.

The stream is ``varint(len) || message`` repeated (see
:mod:`raftstate.transport.frames`). Chunks may arrive in any order, any
number of times and overlapping in any way; only bytes not held yet are
stored, so memory is bounded by the window the caller enforces.

A chunk of whole *unordered* messages (:meth:`Reassembler.add_unordered`)
is returned at once when every byte before its barrier was delivered, and
remembered (``_early``: start -> end), so the in-order pass skips it later;
a message boundary that does not land on such a start is a protocol
violation (:class:`StreamOverflow`).
"""

from __future__ import annotations

from bisect import bisect_right

from raftstate.transport.frames import FrameError, decode_varint


class StreamOverflow(Exception):
    """The stream announced a message longer than the configured limit."""


class Reassembler:
    """In-order reassembly of one stream. Not thread-safe.

    ``contiguous`` is the stream offset up to which every byte has arrived;
    bytes beyond it wait in disjoint out-of-order segments."""

    __slots__ = (
        "_base", "_buf", "_early", "_max_message", "_seg_data", "_seg_starts", "buffered",
        "contiguous", "duplicate_bytes",
    )  # fmt: skip

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        #: Arrived, contiguous bytes not yet returned as messages.
        self._buf = bytearray()
        #: Stream offset of ``_buf[0]``: every message before it was delivered.
        self._base = 0
        #: Unordered chunks delivered ahead of the in-order pass: start -> end.
        self._early: dict[int, int] = {}
        self._seg_starts: list[int] = []
        self._seg_data: dict[int, bytes] = {}
        self.contiguous = 0
        #: Bytes held out of order.
        self.buffered = 0
        #: Bytes that arrived again (network duplicates, spurious repairs).
        self.duplicate_bytes = 0

    def add(self, offset: int, data: bytes) -> None:
        """Accept ``data`` at stream ``offset``. The caller bounds ``offset``
        (the receive window); anything already held is ignored."""
        end = offset + len(data)
        if end <= self.contiguous:
            self.duplicate_bytes += len(data)
            return
        if offset <= self.contiguous:
            self.duplicate_bytes += self.contiguous - offset
            self._buf += data[self.contiguous - offset :]
            self.contiguous = end
            self._pull()
        else:
            self._store(offset, data)

    def add_unordered(self, offset: int, data: bytes, barrier: int) -> list[bytes] | None:
        """Accept a chunk of whole unordered messages. Returns its messages
        to deliver now, ``[]`` if it was held already, or ``None`` when it
        must wait for the in-order pass (its barrier is not delivered yet;
        the caller then :meth:`add` s it). Raises :class:`StreamOverflow`
        when ``data`` is not whole messages within the limit."""
        end = offset + len(data)
        if end <= self.contiguous or offset in self._early or offset in self._seg_data:
            self.duplicate_bytes += len(data)
            return []
        if offset < self.contiguous or barrier > self._base:
            return None
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            try:
                size, start = decode_varint(data, pos)
            except FrameError:
                raise StreamOverflow("unordered chunk ends inside a length prefix") from None
            if size > self._max_message or start + size > len(data):
                raise StreamOverflow("unordered chunk does not hold whole messages")
            out.append(bytes(data[start : start + size]))
            pos = start + size
        self._early[offset] = end
        self.add(offset, data)
        return out

    def messages(self) -> list[bytes]:
        """Every complete message now at the head of the stream, in order
        (unordered ones delivered already are skipped).

        Raises :class:`StreamOverflow` when a length prefix exceeds the
        limit or crosses an unordered chunk; the stream cannot be
        resynchronised after that."""
        buf = self._buf
        early = self._early
        nxt = min(early) if early else -1
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            at = self._base + pos
            if at == nxt:
                pos = early.pop(at) - self._base
                nxt = min(early) if early else -1
                continue
            try:
                size, start = decode_varint(buf, pos)
            except FrameError:
                break  # the length prefix itself is still incomplete
            if size > self._max_message:
                raise StreamOverflow(f"peer announced a {size}-byte message")
            end = start + size
            if end > len(buf):
                break
            if at < nxt < self._base + end:
                raise StreamOverflow("a message overlaps an unordered chunk")
            out.append(bytes(buf[start:end]))
            pos = end
        if pos:
            del buf[:pos]
            self._base += pos
        return out

    def _pull(self) -> None:
        # Append out-of-order segments that now touch the contiguous prefix.
        starts = self._seg_starts
        while starts and starts[0] <= self.contiguous:
            start = starts.pop(0)
            data = self._seg_data.pop(start)
            self.buffered -= len(data)
            end = start + len(data)
            if end > self.contiguous:
                self._buf += data[self.contiguous - start :]
                self.contiguous = end
            else:
                self.duplicate_bytes += len(data)

    def _store(self, offset: int, data: bytes) -> None:
        # Keep only the parts of [offset, end) not covered by held segments.
        starts, held = self._seg_starts, self._seg_data
        a, b = offset, offset + len(data)
        before = self.buffered
        i = bisect_right(starts, a) - 1
        if i >= 0:
            prev_end = starts[i] + len(held[starts[i]])
            a = max(a, prev_end)
        i += 1
        while a < b:
            if i < len(starts) and starts[i] < b:
                s = starts[i]
                if s > a:
                    self._insert(i, a, data[a - offset : s - offset])
                    i += 1
                a = max(a, s + len(held[s]))
                i += 1
            else:
                self._insert(i, a, data[a - offset : b - offset])
                a = b
        self.duplicate_bytes += len(data) - (self.buffered - before)

    def _insert(self, index: int, start: int, piece: bytes) -> None:
        self._seg_starts.insert(index, start)
        self._seg_data[start] = piece
        self.buffered += len(piece)
