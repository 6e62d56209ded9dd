"""The snapshot file: written from a capture in chunks, read incrementally.

Theory of operation
-------------------
A snapshot of a million devices is ~100 MB. Encoding it as one protobuf
message took ~14 s and restoring it ~23 s, on pysyncobj's tick thread. The
format-2 file instead is a sealed frame (raftstate/integrity.py: magic, u64
payload length, payload, SHA-256) whose payload is::

    u32 header length | header (storage.Snapshot, format 2, no devices)
    then per device, in id order: u32 record length | record

where a record is the table's own stored bytes (raftstate/devicerecord.py),
so writing is copying references and joining bytes, and reading is slicing.
Format 3 is the same frame with the records' 60-byte head (committed
presence: ``presence_changed_ms``, ``flags``); a format-2 file still loads,
each record upgraded on the way (online, changed at its ``last_seen_ms``).

* :func:`write` runs on a background thread from a
  :class:`~raftstate.statemachine.TableCapture`: it resolves the captured
  records (a pass that also gives the payload length for the frame head),
  then joins, hashes and writes them in chunks of :data:`WRITE_CHUNK`
  records. Only short C calls hold the GIL (a join of ~0.5 MB; hashing and
  writing release it), so the tick thread keeps running.
* :class:`Loader` takes the file (or a leader's stream of pieces) in chunks
  of any size, checks the frame, hashes as it goes and builds the table's
  dict and sorted ids on the way; :meth:`Loader.finish` says whether the
  digest matched. Records must come in strictly ascending id order and each
  is bounded (:data:`RECORD_LIMIT`), so a bad length cannot make the reader
  allocate without bound.
* Format-1 files (one protobuf ``Snapshot`` with every ``DeviceRecord``,
  magic ``RSSNAP\\0\\2``) still load, converted on the way.

Pure (bytes and files in, values or ``CorruptData`` out); any thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from raftstate import batchentry, devicerecord
from raftstate.integrity import SNAPSHOT_MAGIC, CorruptData
from raftstate.internal.v1 import storage_pb2
from raftstate.model import RECORD_MAX_BYTES
from raftstate.privfile import open_private
from raftstate.sortedids import SortedIds
from raftstate.statemachine import DeviceTable, LoadedTable, TableCapture

#: Magic of a format-2 snapshot (format 1 used ``integrity.SNAPSHOT_MAGIC``).
MAGIC_V2 = b"RSSNAP\x00\x03"
#: The format written (header ``format``); formats 2 and 3 share the magic.
FORMAT = 3
#: Formats the loader reads in a ``MAGIC_V2`` frame.
FORMATS = (2, 3)
_HEAD = struct.Struct("<8sQ")
_U32 = struct.Struct("<I")
_DIGEST = 32
#: Records joined and written per chunk (~0.5 MB at typical sizes).
WRITE_CHUNK = 4096
#: Bytes read per chunk when loading a file.
READ_CHUNK = 1 << 20
#: The largest record a valid table can hold (HEAD + a max heartbeat record).
RECORD_LIMIT = devicerecord.HEAD_SIZE + RECORD_MAX_BYTES + 64
#: The largest header (Raft entries of at most a log command, revocations).
HEADER_LIMIT = 64 * 1024 * 1024
_STATE_BYTES_AT = 44  # offset of state_bytes (u32) in devicerecord.HEAD


RaftEntry = tuple[bytes, int, int]


@dataclass(frozen=True, slots=True)
class RaftFields:
    """What pysyncobj keeps with a snapshot: the last two applied entries
    ``(command, index, term)`` and the cluster's node addresses."""

    last: RaftEntry
    prev: RaftEntry
    cluster: tuple[str, ...]


@dataclass(slots=True)
class Written:
    """What :func:`write` wrote."""

    devices: int
    revision: int
    index: int
    bytes: int


@dataclass(slots=True)
class Loaded:
    """A verified snapshot: the table and pysyncobj's fields."""

    table: LoadedTable
    raft: RaftFields
    digest: bytes = b""
    extra: dict[str, int] = field(default_factory=dict)


def _header(capture: TableCapture, raft: RaftFields) -> bytes:
    snap = storage_pb2.Snapshot(
        format=FORMAT,
        revision=capture.revision,
        max_proposed_at_ms=capture.max_proposed_at_ms,
        device_count=capture.devices,
    )
    snap.last_entry.command, snap.last_entry.index, snap.last_entry.term = raft.last
    snap.prev_entry.command, snap.prev_entry.index, snap.prev_entry.term = raft.prev
    snap.cluster.extend(sorted(raft.cluster))
    for token_id, expires in sorted(capture.revoked.items()):
        snap.revocations.add(token_id=token_id, expires_at_s=expires)
    out: bytes = snap.SerializeToString()
    return out


def write(path: str, capture: TableCapture, raft: RaftFields, *, fsync: bool) -> Written:
    """Write the capture to ``path`` (via ``path + '.writing'`` and an atomic
    rename). Any thread; see the module docstring for why it does not hold
    the GIL for long."""
    tmp = path + ".writing"
    with open_private(tmp, "wb") as fh:
        size = write_to(fh, capture, raft)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path)
    return Written(capture.devices, capture.revision, raft.last[1], size)


def write_to(fh: IO[bytes], capture: TableCapture, raft: RaftFields) -> int:
    """Write the sealed snapshot of ``capture`` to ``fh``; return its size."""
    # A Python loop, not list()/sum(map(len, ...)): those are single C calls
    # that hold the GIL over a million records scattered in memory (0.44 s
    # in bench/tablebench.py), and the tick thread would wait that long.
    records: list[bytes] = []
    append = records.append
    total = 0
    for record in capture.records():
        append(record)
        total += len(record)
    if len(records) != capture.devices:
        raise AssertionError(f"captured {capture.devices} devices but found {len(records)}")
    header = _header(capture, raft)
    length = _U32.size + len(header) + _U32.size * len(records) + total
    head = _HEAD.pack(MAGIC_V2, length)
    digest = hashlib.sha256(head)
    pack = _U32.pack
    first = head + pack(len(header)) + header
    digest.update(first[_HEAD.size :])
    fh.write(first)
    for start in range(0, len(records), WRITE_CHUNK):
        parts: list[bytes] = []
        append = parts.append
        for record in records[start : start + WRITE_CHUNK]:
            append(pack(len(record)))
            append(record)
        chunk = b"".join(parts)
        digest.update(chunk)
        fh.write(chunk)
    fh.write(digest.digest())
    return _HEAD.size + length + _DIGEST


def copy_table(table: DeviceTable) -> LoadedTable:
    """The table as a snapshot would restore it (tests and tools): capture,
    encode in memory, load."""
    capture = table.capture()
    try:
        buf = io.BytesIO()
        write_to(buf, capture, RaftFields((b"", 0, 0), (b"", 0, 0), ()))
    finally:
        table.release(capture)
    return load_bytes([buf.getvalue()]).table


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Loader:
    """Incremental reader of a snapshot (module docstring). ``feed`` pieces
    in order, then ``finish``. Raises ``CorruptData`` as soon as something
    is wrong."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._magic = b""
        self._length = -1  # payload length once the head is read
        self._consumed = 0  # payload bytes parsed (v2) or buffered (v1)
        self._header: storage_pb2.Snapshot | None = None
        self._recs: dict[str, bytes] = {}
        self._ids: list[str] = []
        self._state_bytes = 0
        self._received = 0
        self._pending: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the file."""
        start = self._received
        self._received += len(chunk)
        self._buf += chunk
        if self._length < 0:
            self._pending.append(chunk)  # hashed once the payload length is known
            if len(self._buf) < _HEAD.size:
                return
            magic, length = _HEAD.unpack_from(self._buf)
            if magic not in (MAGIC_V2, SNAPSHOT_MAGIC):
                raise CorruptData("snapshot has a wrong magic (not a raftstate snapshot)")
            self._magic, self._length = magic, length
            del self._buf[: _HEAD.size]
            self._hash_from(b"".join(self._pending), 0)
            self._pending = []
        else:
            self._hash_from(chunk, start)
        if self._received > _HEAD.size + self._length + _DIGEST:
            raise CorruptData("snapshot is longer than its length field says")
        if self._magic == MAGIC_V2:
            self._parse()

    def _hash_from(self, data: bytes, start: int) -> None:
        """Hash the part of ``data`` (file bytes from offset ``start``) that
        lies before the digest."""
        stop = min(start + len(data), _HEAD.size + self._length)
        if stop > start:
            self._hash.update(memoryview(data)[: stop - start])

    def _parse(self) -> None:
        buf = self._buf
        view = memoryview(buf)
        off = 0
        limit = self._length - self._consumed  # payload bytes not parsed yet
        avail = min(len(buf), limit)
        try:
            if self._header is None:
                if avail < 4:
                    return
                n = _U32.unpack_from(buf, 0)[0]
                if n > HEADER_LIMIT or n > limit - 4:
                    raise CorruptData(f"snapshot header length {n} is out of range")
                if avail < 4 + n:
                    return
                header = storage_pb2.Snapshot()
                try:
                    header.ParseFromString(bytes(view[4 : 4 + n]))
                except Exception as exc:
                    raise CorruptData(f"snapshot header is not a Snapshot: {exc}") from exc
                if header.format not in FORMATS:
                    raise CorruptData(
                        f"snapshot header format {header.format} is not one of {FORMATS}"
                    )
                self._header = header
                off = 4 + n
            recs, ids = self._recs, self._ids
            prev = ids[-1] if ids else ""
            unpack = _U32.unpack_from
            append = ids.append
            upgrade = self._header.format == 2
            head_size = devicerecord.HEAD_V2_SIZE if upgrade else devicerecord.HEAD_SIZE
            low, high = head_size + 3, RECORD_LIMIT
            tag_at, len_at = head_size, head_size + 1
            state = 0
            while avail - off >= 4:
                n = unpack(buf, off)[0]
                if n > high or n < low:
                    raise CorruptData(f"snapshot record length {n} is out of range")
                if avail - off - 4 < n:
                    break
                start = off + 4
                off = start + n
                record = bytes(view[start:off])
                k = record[len_at]
                if record[tag_at] == 0x0A and 0 < k < 0x80 and len_at + 1 + k <= n:
                    try:
                        device_id = record[len_at + 1 : len_at + 1 + k].decode("ascii")
                    except UnicodeDecodeError as exc:
                        raise CorruptData(f"snapshot record is malformed: {exc}") from exc
                else:
                    try:
                        device_id = batchentry.id_at(record, head_size)
                    except Exception as exc:
                        raise CorruptData(f"snapshot record is malformed: {exc}") from exc
                if upgrade:
                    record = devicerecord.upgrade_v2(record)
                if device_id <= prev:
                    raise CorruptData(f"snapshot records out of order at {device_id!r}")
                prev = device_id
                recs[device_id] = record
                append(device_id)
                state += unpack(record, _STATE_BYTES_AT)[0]
            self._state_bytes += state
        finally:
            view.release()
        self._consumed += off
        del buf[:off]

    def finish(self) -> Loaded:
        """The loaded snapshot, once every byte was fed and the digest matched."""
        if self._length < 0:
            raise CorruptData(f"snapshot too short ({self._received} bytes)")
        expected = _HEAD.size + self._length + _DIGEST
        if self._received != expected:
            raise CorruptData(
                f"snapshot length field says {self._length} payload bytes but the file has "
                f"{self._received - _HEAD.size - _DIGEST}"
            )
        digest = bytes(self._buf[-_DIGEST:])
        if self._hash.digest() != digest:
            raise CorruptData("snapshot SHA-256 mismatch")
        if self._magic == SNAPSHOT_MAGIC:
            return _load_v1(bytes(self._buf[:-_DIGEST]), digest)
        if self._header is None or self._consumed != self._length:
            raise CorruptData("snapshot payload ends inside a record")
        header = self._header
        if header.device_count != len(self._recs):
            raise CorruptData(
                f"snapshot header says {header.device_count} devices but holds {len(self._recs)}"
            )
        table = LoadedTable(
            recs=self._recs,
            ids=SortedIds(self._ids),
            revision=header.revision,
            max_proposed_at_ms=header.max_proposed_at_ms,
            state_bytes=self._state_bytes,
            revoked={r.token_id: r.expires_at_s for r in header.revocations},
        )
        return Loaded(table, _raft_fields(header), digest)


def _raft_fields(snap: storage_pb2.Snapshot) -> RaftFields:
    return RaftFields(
        (snap.last_entry.command, snap.last_entry.index, snap.last_entry.term),
        (snap.prev_entry.command, snap.prev_entry.index, snap.prev_entry.term),
        tuple(snap.cluster),
    )


def _load_v1(payload: bytes, digest: bytes) -> Loaded:
    """A format-1 snapshot (one protobuf with every DeviceRecord)."""
    from raftstate.admission import state_bytes
    from raftstate.model import DeviceView

    snap = storage_pb2.Snapshot()
    try:
        snap.ParseFromString(payload)
    except Exception as exc:
        raise CorruptData(f"snapshot checksum ok but protobuf invalid: {exc}") from exc
    if snap.format != 1:
        raise CorruptData(f"snapshot format {snap.format} in a format-1 frame")
    recs: dict[str, bytes] = {}
    total = 0
    for r in snap.devices:
        size = state_bytes(r.device_id, r.reported)
        total += size
        recs[r.device_id] = devicerecord.from_view(
            DeviceView(
                r.device_id,
                r.seq,
                dict(r.reported),
                r.revision,
                r.first_seen_ms,
                r.last_seen_ms,
                r.heartbeats,
                r.ttl_s,
                size,
                True,
                r.last_seen_ms,
            )
        )
    table = LoadedTable(
        recs=recs,
        ids=SortedIds(sorted(recs)),
        revision=snap.revision,
        max_proposed_at_ms=snap.max_proposed_at_ms,
        state_bytes=total,
        revoked={r.token_id: r.expires_at_s for r in snap.revocations},
    )
    return Loaded(table, _raft_fields(snap), digest)


def load(path: str) -> Loaded:
    """Read, verify and load a snapshot file. Raises ``CorruptData``."""
    loader = Loader()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                loader.feed(chunk)
    except OSError as exc:
        raise CorruptData(f"cannot read snapshot: {exc}") from exc
    return loader.finish()


def load_bytes(pieces: Iterable[bytes]) -> Loaded:
    """Load a snapshot given as pieces (tests, in-memory)."""
    loader = Loader()
    for piece in pieces:
        loader.feed(piece)
    return loader.finish()


def verify(path: str) -> None:
    """Raise ``CorruptData`` unless ``path`` is an intact snapshot (frame and
    digest; streamed, so memory stays flat)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(_HEAD.size)
            if len(head) < _HEAD.size or size < _HEAD.size + _DIGEST:
                raise CorruptData(f"snapshot too short ({size} bytes)")
            magic, length = _HEAD.unpack(head)
            if magic not in (MAGIC_V2, SNAPSHOT_MAGIC):
                raise CorruptData("snapshot has a wrong magic (not a raftstate snapshot)")
            if _HEAD.size + length + _DIGEST != size:
                raise CorruptData(
                    f"snapshot length field says {length} payload bytes but the file has "
                    f"{size - _HEAD.size - _DIGEST}"
                )
            digest = hashlib.sha256(head)
            left = length
            while left > 0:
                chunk = fh.read(min(READ_CHUNK, left))
                if not chunk:
                    raise CorruptData("snapshot ends early")
                digest.update(chunk)
                left -= len(chunk)
            if digest.digest() != fh.read(_DIGEST):
                raise CorruptData("snapshot SHA-256 mismatch")
    except OSError as exc:
        raise CorruptData(f"cannot read snapshot: {exc}") from exc
