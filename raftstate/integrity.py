"""Checksummed on-disk formats: snapshots, journal records, the Raft meta file.

Theory of operation. Everything raftstate keeps on disk is framed so that a
reader can tell an intact frame from a damaged one before it trusts a byte:

* **Snapshot** (``snapshot.bin``, also what a leader streams to a follower in
  pieces): ``MAGIC(8) | u64 length | payload | SHA-256(magic|length|payload)``.
  Any bit flip changes the digest (or the magic, or makes the length disagree
  with the file size); any truncation or extension makes the length disagree.
* **Journal record**: ``u32 body_length | u32 crc32(length|body) | body`` with
  ``body = u64 index | u64 term | command``. CRC-32 detects every single-bit
  error and every burst up to 32 bits; a damaged length either runs past the
  end of the file or points the CRC at other bytes (a 2^-32 chance to pass).
  A record cut short is detected by its length. A journal cut exactly on a
  record boundary is indistinguishable from one whose last append never
  happened; the meta file's commit index catches that case for committed
  entries (see ``raftstate/journal.py``).
* **Meta** (term, vote, commit index, catch-up flag): ``MAGIC(8) | u32 length |
  u32 crc32 | JSON``. Never a pickle: nothing on disk is unpickled.

All functions here are pure (bytes in, values or :class:`CorruptData` out) and
safe to call from any thread.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

from raftstate.errors import DecodeError

SNAPSHOT_MAGIC = b"RSSNAP\x00\x02"
_SNAP_HEAD = struct.Struct("<8sQ")
_DIGEST_SIZE = 32

#: Start of every journal file written by this version; the last byte is the format version.
JOURNAL_MAGIC = b"raftstate-jrnl\x00\x02"
#: pysyncobj's own journal format starts with this (refused, with advice).
PYSYNCOBJ_JOURNAL_MAGIC = b"PYSYNCOBJ"
_REC_HEAD = struct.Struct("<II")
_REC_BODY = struct.Struct("<QQ")
RECORD_OVERHEAD = _REC_HEAD.size + _REC_BODY.size
#: Upper bound on one record's body: far above any entry raftstate proposes,
#: low enough that a corrupt length cannot make a reader allocate gigabytes.
MAX_RECORD_BODY = 64 * 1024 * 1024

META_MAGIC = b"RSMETA\x00\x01"
_META_HEAD = struct.Struct("<8sII")


class CorruptData(DecodeError):
    """Bytes on disk (or a snapshot received from the leader) failed their
    checksum, length or format check. ``what`` names the problem."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# ---- snapshots -----------------------------------------------------------------


def seal_snapshot(payload: bytes) -> bytes:
    """Frame a serialized ``Snapshot`` protobuf for disk and transmission."""
    head = _SNAP_HEAD.pack(SNAPSHOT_MAGIC, len(payload))
    return head + payload + hashlib.sha256(head + payload).digest()


def open_snapshot(data: bytes) -> bytes:
    """Return the payload of a sealed snapshot. Raises :class:`CorruptData`
    saying what is wrong (magic, length, digest)."""
    if len(data) < _SNAP_HEAD.size + _DIGEST_SIZE:
        raise CorruptData(f"snapshot too short ({len(data)} bytes)")
    magic, length = _SNAP_HEAD.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise CorruptData("snapshot has a wrong magic (not a raftstate v2 snapshot)")
    if _SNAP_HEAD.size + length + _DIGEST_SIZE != len(data):
        raise CorruptData(
            f"snapshot length field says {length} payload bytes but the file has "
            f"{len(data) - _SNAP_HEAD.size - _DIGEST_SIZE}"
        )
    end = _SNAP_HEAD.size + length
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise CorruptData("snapshot SHA-256 mismatch")
    return data[_SNAP_HEAD.size : end]


# ---- journal records -------------------------------------------------------------


def encode_record(command: bytes, index: int, term: int) -> bytes:
    """One journal record for the entry ``(command, index, term)``."""
    body = _REC_BODY.pack(index, term) + command
    length = struct.pack("<I", len(body))
    return length + struct.pack("<I", zlib.crc32(length + body)) + body


@dataclass(frozen=True, slots=True)
class Scan:
    """What :func:`scan_records` found.

    ``entries`` are the records that verified, in file order, each as
    ``(command, index, term)``, and ``offsets[i]`` is where record ``i``
    starts. ``end`` is the offset just past the last good record: a reader
    keeps ``data[:end]``. ``problem`` is ``None`` when every byte after the
    header belonged to a good record, else what was wrong at ``end``.
    ``lost_through`` is the highest index seen in verifying records past the
    bad one (best effort: 0 if none could be read)."""

    entries: list[tuple[bytes, int, int]]
    offsets: list[int]
    end: int
    problem: str | None
    lost_through: int = 0


def _record_at(data: memoryview, pos: int) -> tuple[bytes, int, int, int] | str:
    """The record at ``pos`` as ``(command, index, term, next_pos)``, or a
    string saying why there is no valid record there."""
    if pos + _REC_HEAD.size > len(data):
        return "record header cut short"
    length, crc = _REC_HEAD.unpack_from(data, pos)
    if length < _REC_BODY.size or length > MAX_RECORD_BODY:
        return f"record length {length} out of range"
    start = pos + _REC_HEAD.size
    if start + length > len(data):
        return f"record cut short ({len(data) - start} of {length} bytes)"
    body = data[start : start + length]  # a view: no copy
    if zlib.crc32(body, zlib.crc32(data[pos : pos + 4])) != crc:
        return "record CRC mismatch"
    index, term = _REC_BODY.unpack_from(body)
    return bytes(body[_REC_BODY.size :]), index, term, start + length


def scan_records(data: bytes | memoryview, start: int) -> Scan:
    """Verify the records of ``data`` from ``start`` on and stop at the first
    that fails (bad length, CRC, or an index that does not follow the
    previous one). Never raises."""
    data = memoryview(data)
    entries: list[tuple[bytes, int, int]] = []
    offsets: list[int] = []
    pos = start
    while pos < len(data):
        got = _record_at(data, pos)
        if isinstance(got, str):
            return Scan(entries, offsets, pos, got, _lost_through(data, pos))
        command, index, term, nxt = got
        if entries and index != entries[-1][1] + 1:
            problem = f"record index {index} does not follow {entries[-1][1]}"
            return Scan(entries, offsets, pos, problem, max(index, _lost_through(data, nxt)))
        entries.append((command, index, term))
        offsets.append(pos)
        pos = nxt
    return Scan(entries, offsets, pos, None)


def _lost_through(data: memoryview, pos: int) -> int:
    """Best effort: skip the bad record by its length field and report the
    last index of the records that still verify after it."""
    if pos + _REC_HEAD.size > len(data):
        return 0
    length = _REC_HEAD.unpack_from(data, pos)[0]
    nxt = pos + _REC_HEAD.size + length
    last = 0
    while nxt < len(data):
        got = _record_at(data, nxt)
        if isinstance(got, str):
            break
        last, nxt = got[1], got[3]
    return last


def check_journal_header(data: bytes) -> None:
    """Raise :class:`CorruptData` unless ``data`` starts with this version's
    journal header."""
    if data[: len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        raise CorruptData("journal header is not raftstate-jrnl v2")


# ---- meta ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """Raft's persistent per-node state besides the log.

    ``catch_up``: this node lost data it may have acknowledged (a corrupt
    journal or snapshot) and must not vote or stand for election until it has
    caught up with a leader (``raftstate/catchup.py``)."""

    term: int = 0
    voted_for: str | None = None
    commit_index: int = 1
    catch_up: bool = False


def encode_meta(meta: Meta) -> bytes:
    body = json.dumps(
        {
            "term": meta.term,
            "voted_for": meta.voted_for,
            "commit_index": meta.commit_index,
            "catch_up": meta.catch_up,
        },
        sort_keys=True,
    ).encode()
    return _META_HEAD.pack(META_MAGIC, len(body), zlib.crc32(body)) + body


def decode_meta(data: bytes) -> Meta:
    """Parse a meta file. Raises :class:`CorruptData`."""
    if len(data) < _META_HEAD.size:
        raise CorruptData(f"meta file too short ({len(data)} bytes)")
    magic, length, crc = _META_HEAD.unpack_from(data)
    body = data[_META_HEAD.size :]
    if magic != META_MAGIC:
        raise CorruptData("meta file has a wrong magic")
    if len(body) != length:
        raise CorruptData(f"meta file length field says {length} bytes, file has {len(body)}")
    if zlib.crc32(body) != crc:
        raise CorruptData("meta file CRC mismatch")
    try:
        raw = json.loads(body)
        voted = raw["voted_for"]
        return Meta(
            term=int(raw["term"]),
            voted_for=None if voted is None else str(voted),
            commit_index=int(raw["commit_index"]),
            catch_up=bool(raw["catch_up"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"meta file content is malformed: {exc}") from None


__all__ = [
    "JOURNAL_MAGIC",
    "RECORD_OVERHEAD",
    "CorruptData",
    "Meta",
    "Scan",
    "check_journal_header",
    "decode_meta",
    "encode_meta",
    "encode_record",
    "open_snapshot",
    "scan_records",
    "seal_snapshot",
]
