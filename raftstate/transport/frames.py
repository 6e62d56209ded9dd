"""Wire codec of the reliable link's frames (pure functions, no state).

A frame is the plaintext payload of one sealed DATA datagram (see
:mod:`raftstate.transport.crypto`). Authentication already happened, so the
codec only has to be strict: no strict prefix of a frame parses, and random
bytes almost never do (format nibble, reserved bits, counts and the exact
length must all agree). Nothing is pickled; every integer is a QUIC
variable-length integer (RFC 9000 §16: the top two bits of the first byte give
the length, 1/2/4/8 bytes, values below 2**62).

Frame layout, in order::

    field          encoding     meaning
    -------------  -----------  ----------------------------------------------
    flags          u8           0101 0TNA: high nibble 0x5 = format 1;
                                A (bit 0) = an ACK block follows;
                                N (bit 1) = ack this frame immediately (probes);
                                T (bit 2) = every chunk has a tag (below);
                                bit 3 reserved, must be 0
    number         varint       frame number; starts at 0, +1 per frame sent,
                                never reused (a retransmission is a new frame)
    floor_delta    varint       number - floor: the sender no longer needs acks
                                for its frames below floor (acked, or declared
                                lost over an RTT ago); the receiver may forget
                                them
    -- if A --
    ack_cum        varint       all peer frames < ack_cum are accounted for
    ack_delay_us   varint       µs between receiving the largest acked frame
                                and sending this ack (RFC 9002 §13.2.5)
    range_count    varint       <= MAX_ACK_RANGES SACK ranges, ascending
    ranges         2 varints    each: gap-1 (from ack_cum, then from the end of
                   per range    the previous range), length-1; a range [lo, hi)
                                lists frames received above a hole
    -- always --
    chunk_count    varint       <= MAX_CHUNKS stream chunks
    chunks         per chunk:   offset varint (stream byte offset),
                                length varint (1..MAX_CHUNK_LENGTH),
                                if T: tag varint (0: ordered bytes; t > 0:
                                whole *unordered* messages, deliverable as
                                soon as every message before stream offset
                                ``barrier = offset - (t - 1)`` was), data
    (end)                       the chunks end exactly at the end of the frame

The *stream* that chunks carry is the concatenation of every message the
sender queued, each as ``varint(len(message)) || message``, so messages of
any size (including empty ones) pack several to a chunk or span many chunks.
A frame with no chunks and no N flag is a pure ACK and is never acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

#: Values at or above this do not fit a varint.
VARINT_LIMIT = 1 << 62
#: Largest encoded varint.
MAX_VARINT_SIZE = 8

FORMAT_NIBBLE = 0x50
FLAG_ACK = 0x01
FLAG_ACK_NOW = 0x02
FLAG_TAGS = 0x04
_KNOWN_FLAGS = FLAG_ACK | FLAG_ACK_NOW | FLAG_TAGS

#: At most this many SACK ranges per ACK block (keeps range_count one byte).
MAX_ACK_RANGES = 63
#: At most this many chunks per frame (keeps chunk_count one byte).
MAX_CHUNKS = 63
#: Longest chunk (keeps the length varint at most two bytes).
MAX_CHUNK_LENGTH = (1 << 14) - 1
#: Acknowledgement delays are clamped to this many µs (a four-byte varint).
MAX_ACK_DELAY_US = (1 << 30) - 1

#: Worst-case bytes of a frame around one chunk's data when the frame has an
#: ACK block with no ranges: flags, number, floor_delta, ack_cum, ack_delay,
#: range_count, chunk_count, chunk offset, chunk length and chunk tag. A chunk of at most
#: ``max_payload - SINGLE_CHUNK_OVERHEAD`` bytes therefore always fits a frame
#: of its own, so a retransmission never has to be split.
SINGLE_CHUNK_OVERHEAD = 1 + 8 + 8 + 8 + 4 + 1 + 1 + 8 + 2 + 8  # + tag


class FrameError(ValueError):
    """Bytes that are not a well-formed frame (internal; the link counts it)."""


class Ack(NamedTuple):
    """Acknowledgement of the peer's frames: every frame below ``cum`` plus
    the half-open ``ranges`` (ascending, disjoint, non-adjacent, above
    ``cum``). ``delay_us`` is how long the largest one was held back.
    (Immutable tuples: cheaper to build per frame than frozen dataclasses.)"""

    cum: int
    delay_us: int
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def largest(self) -> int:
        """The highest frame number acknowledged (-1: none)."""
        return self.ranges[-1][1] - 1 if self.ranges else self.cum - 1

    def covers(self, number: int) -> bool:
        """Whether frame ``number`` is acknowledged."""
        if number < self.cum:
            return True
        return any(lo <= number < hi for lo, hi in self.ranges)


class StreamChunk(NamedTuple):
    """``data`` at stream byte ``offset``; ``barrier`` >= 0 marks a chunk of
    whole unordered messages (see the T flag), -1 ordered bytes."""

    offset: int
    data: bytes
    barrier: int = -1


class ChunkLike(Protocol):
    """Anything with a stream ``offset`` and ``data`` (a :class:`StreamChunk`
    or the sender's own chunk objects)."""

    @property
    def offset(self) -> int: ...

    @property
    def data(self) -> bytes: ...

    @property
    def barrier(self) -> int: ...


class Frame(NamedTuple):
    """One decoded frame. ``floor`` <= ``number``."""

    number: int
    floor: int
    ack: Ack | None = None
    chunks: tuple[StreamChunk, ...] = ()
    ack_now: bool = False

    @property
    def ack_eliciting(self) -> bool:
        """Whether the receiver must acknowledge this frame."""
        return bool(self.chunks) or self.ack_now


def varint_size(value: int) -> int:
    """Encoded size of ``value`` (0 <= value < 2**62)."""
    if value < 0x40:
        return 1
    if value < 0x4000:
        return 2
    if value < 0x4000_0000:
        return 4
    return 8


def encode_varint(value: int) -> bytes:
    """``value`` as an RFC 9000 §16 varint. Raises ``ValueError`` out of range."""
    if value < 0 or value >= VARINT_LIMIT:
        raise ValueError(f"varint out of range: {value}")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """``(value, next_pos)`` of the varint at ``pos``. Raises :class:`FrameError`
    if ``buf`` ends inside it."""
    if pos >= len(buf):
        raise FrameError("truncated varint")
    first = buf[pos]
    if first < 0x40:
        return first, pos + 1
    size = 1 << (first >> 6)
    end = pos + size
    if end > len(buf):
        raise FrameError("truncated varint")
    return int.from_bytes(buf[pos:end], "big") & ((1 << (8 * size - 2)) - 1), end


def ack_ranges_size(cum: int, ranges: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> int:
    """Encoded bytes of ``ranges`` (without the range_count)."""
    size = 0
    prev = cum
    for lo, hi in ranges:
        size += varint_size(lo - prev - 1) + varint_size(hi - lo - 1)
        prev = hi
    return size


def _put(out: bytearray, value: int) -> None:
    """Append ``value`` as a varint (the one-byte case without a call)."""
    if 0 <= value < 0x40:
        out.append(value)
    else:
        out += encode_varint(value)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``. Raises ``ValueError`` if a field breaks
    the format's limits (a bug in the caller, never input from the network)."""
    return encode_fields(frame.number, frame.floor, frame.ack, frame.chunks, frame.ack_now)


def encode_fields(
    number: int, floor: int, ack: Ack | None, chunks: Sequence[ChunkLike], ack_now: bool = False
) -> bytes:
    """:func:`encode_frame` of ``Frame(number, floor, ack, chunks, ack_now)``
    without building the :class:`Frame` (the sender's hot path)."""
    if not 0 <= floor <= number:
        raise ValueError("floor must be in [0, number]")
    if len(chunks) > MAX_CHUNKS:
        raise ValueError("too many chunks")
    flags = FORMAT_NIBBLE | (FLAG_ACK if ack is not None else 0)
    tags = False
    for c in chunks:
        if c.barrier >= 0:
            tags = True
            flags |= FLAG_TAGS
            break
    out = bytearray((flags | FLAG_ACK_NOW if ack_now else flags,))
    _put(out, number)
    _put(out, number - floor)
    if ack is not None:
        ranges = ack.ranges
        if len(ranges) > MAX_ACK_RANGES:
            raise ValueError("too many ack ranges")
        _put(out, ack.cum)
        _put(out, min(ack.delay_us, MAX_ACK_DELAY_US))
        out.append(len(ranges))  # <= 63: one byte
        prev = ack.cum
        for lo, hi in ranges:
            gap = lo - prev - 1
            length = hi - lo - 1
            if gap < 0 or length < 0:
                raise ValueError("ack ranges must ascend with gaps")
            if gap < 0x40 and length < 0x40:  # the usual case: two bytes, no call
                out.append(gap)
                out.append(length)
            else:
                _put(out, gap)
                _put(out, length)
            prev = hi
    out.append(len(chunks))  # <= 63: one byte
    for chunk in chunks:
        data = chunk.data
        size = len(data)
        if not 0 < size <= MAX_CHUNK_LENGTH:
            raise ValueError("chunk length out of range")
        _put(out, chunk.offset)
        if size < 0x40:
            out.append(size)
        else:
            out += (size | 0x4000).to_bytes(2, "big")  # <= MAX_CHUNK_LENGTH
        if tags:
            barrier = chunk.barrier
            if barrier > chunk.offset:
                raise ValueError("barrier past the chunk")
            _put(out, 0 if barrier < 0 else chunk.offset - barrier + 1)
        out += data
    return bytes(out)


def decode_frame(payload: bytes) -> Frame:
    """Parse one frame. Raises :class:`FrameError` on anything malformed:
    unknown format or flags, truncation anywhere, trailing bytes, a floor
    above the number, out-of-order ranges, empty chunks, or a field past its
    limit. Never raises anything else."""
    if not payload:
        raise FrameError("empty frame")
    flags = payload[0]
    if flags & 0xF0 != FORMAT_NIBBLE or flags & 0x0F & ~_KNOWN_FLAGS:
        raise FrameError("unknown frame format or flags")
    number, pos = decode_varint(payload, 1)
    if pos < len(payload) and payload[pos] < 0x40:  # the usual small floor delta
        floor_delta = payload[pos]
        pos += 1
    else:
        floor_delta, pos = decode_varint(payload, pos)
    if floor_delta > number:
        raise FrameError("floor below zero")
    ack: Ack | None = None
    if flags & FLAG_ACK:
        cum, pos = decode_varint(payload, pos)
        delay_us, pos = decode_varint(payload, pos)
        count, pos = decode_varint(payload, pos)
        if count > MAX_ACK_RANGES:
            raise FrameError("too many ack ranges")
        ranges: list[tuple[int, int]] = []
        prev = cum
        total = len(payload)
        for _ in range(count):
            # Gaps and lengths are almost always below 64: one byte, no call.
            if pos + 1 < total and payload[pos] < 0x40 and payload[pos + 1] < 0x40:
                gap = payload[pos]
                length = payload[pos + 1]
                pos += 2
            else:
                gap, pos = decode_varint(payload, pos)
                length, pos = decode_varint(payload, pos)
            lo = prev + gap + 1
            hi = lo + length + 1
            if hi >= VARINT_LIMIT:
                raise FrameError("ack range out of range")
            ranges.append((lo, hi))
            prev = hi
        ack = Ack(cum, delay_us, tuple(ranges))
    count, pos = decode_varint(payload, pos)
    if count > MAX_CHUNKS:
        raise FrameError("too many chunks")
    total = len(payload)
    tags = flags & FLAG_TAGS
    chunks: list[StreamChunk] = []
    for _ in range(count):
        offset, pos = decode_varint(payload, pos)
        if pos < total and payload[pos] < 0x40:  # the usual one-byte length
            length = payload[pos]
            pos += 1
        else:
            length, pos = decode_varint(payload, pos)
        barrier = -1
        if tags:
            tag, pos = decode_varint(payload, pos)
            if tag > offset + 1:
                raise FrameError("barrier below zero")
            barrier = offset - tag + 1 if tag else -1
        end = pos + length
        if length == 0 or length > MAX_CHUNK_LENGTH or end > total:
            raise FrameError("bad chunk length")
        if offset + length >= VARINT_LIMIT:
            raise FrameError("chunk past the end of the stream")
        chunks.append(StreamChunk(offset, bytes(payload[pos:end]), barrier))
        pos = end
    if pos != total:
        raise FrameError("trailing bytes")
    return Frame(number, number - floor_delta, ack, tuple(chunks), bool(flags & FLAG_ACK_NOW))
