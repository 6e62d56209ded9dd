"""raftstate's Raft journal and snapshot receiver: checksummed, never pickled.

Theory of operation. pysyncobj keeps the Raft log in a ``Journal`` (an
in-memory list of ``(command, index, term)`` mirrored to a file) and
receives snapshots through its ``Serializer``. raftstate always replaces both
(``raftstate/raftnode.py`` installs them while the ``SyncObj`` is built):

* :class:`ChecksummedJournal` writes each entry as one CRC-framed record
  (``raftstate/integrity.py``) appended with ``pwrite``: in the OS page cache
  before pysyncobj acknowledges it (``process-crash``), and ``fdatasync``-ed
  first with ``durability = "fsync"``. On open it verifies every record and
  stops at the first bad one: the file is truncated there, one ERROR line
  names the index range lost, and the node enters catch-up (below). A journal
  that ends below the commit index stored in the meta file also lost
  committed entries and enters catch-up the same way. A file in pysyncobj's
  own format is refused with :class:`JournalFormatError`.
* Term, vote and commit index live in ``<journal>.meta`` as checksummed JSON,
  replaced atomically (write, fsync in fsync mode, rename). A corrupt meta
  file is treated like lost data: term from the log, no vote, catch-up.
* :class:`VerifyingSerializer` receives a snapshot streamed by the leader
  into a temporary file and verifies the whole file before it replaces
  ``snapshot.bin``; a corrupt one is deleted, logged and not acknowledged, so
  the leader's next AppendEntries is rejected and it streams the snapshot
  again.

Catch-up (Raft safety): a node that lost entries may have acknowledged them;
if it voted, a candidate missing committed entries could win. So a node in
catch-up neither votes nor stands for election until it has applied the
commit index of the first leader it hears from (``raftstate/catchup.py``).
The flag is persisted in the meta file, so a restart does not clear it.

Threading: the tick thread only (pysyncobj's contract for both classes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysyncobj.journal import Journal
from pysyncobj.serializer import Serializer

from raftstate.errors import ConfigError
from raftstate.integrity import (
    JOURNAL_MAGIC,
    PYSYNCOBJ_JOURNAL_MAGIC,
    CorruptData,
    Meta,
    check_journal_header,
    decode_meta,
    encode_meta,
    encode_record,
    scan_records,
)
from raftstate.privfile import open_private, open_private_fd

log = logging.getLogger("raftstate.journal")


class JournalFormatError(ConfigError):
    """The journal on disk is in a format this version does not read."""


def corrupt_name(path: str | Path, now: float) -> Path:
    """Where a corrupt file is moved aside: ``<path>.corrupt-<unix seconds>``."""
    return Path(f"{path}.corrupt-{int(now)}")


class ChecksummedJournal(Journal):  # type: ignore[misc]
    """pysyncobj ``Journal`` over a file of CRC-framed records (see module doc)."""

    def __init__(self, journal_file: str, *, fsync: bool = False) -> None:
        """Open or create ``journal_file``, verify it and truncate a corrupt
        tail. Raises ``JournalFormatError`` for a pysyncobj-format file,
        ``OSError`` if it cannot be opened."""
        self.path = journal_file
        self.fsync = fsync
        self.meta_path = journal_file + ".meta"
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []
        self._meta, meta_problem = _load_meta(self.meta_path)
        self._meta_dirty = False
        #: Set when this open found damage; the node logs and acts on it.
        self.damage: str | None = None
        #: Times :meth:`deleteEntriesTo` (log compaction) ran since open.
        self.compactions = 0
        self._fd = self._open_verified()
        if meta_problem is not None:
            self.damage = f"{self.meta_path}: {meta_problem}"
            log.error(
                "meta file %s is corrupt (%s): term taken from the log, no vote; "
                "this node will not vote until it has caught up with a leader",
                self.meta_path,
                meta_problem,
            )
        last = self._entries[-1][1] if self._entries else 0
        if self._entries and self._meta.commit_index > last and self.damage is not None:
            self._meta = _replace(self._meta, commit_index=last)  # the loss is logged already
        elif self._entries and self._meta.commit_index > last:
            self.damage = "journal ends below the stored commit index"
            log.error(
                "journal %s ends at index %d but index %d was committed: entries %d-%d lost; "
                "the leader will re-replicate them",
                self.path,
                last,
                self._meta.commit_index,
                last + 1,
                self._meta.commit_index,
            )
            self._meta = _replace(self._meta, commit_index=last)
        if self.damage is not None:
            self._meta = _replace(self._meta, catch_up=True)
            self._store_meta()

    # ---- opening --------------------------------------------------------------

    def _open_verified(self) -> int:
        fd = open_private_fd(self.path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.pwrite(fd, JOURNAL_MAGIC, 0)
                self._sync(fd)
                self._end = len(JOURNAL_MAGIC)
                return fd
            data = _read_all(fd, size)
            if data.startswith(PYSYNCOBJ_JOURNAL_MAGIC):
                raise JournalFormatError(
                    f"{self.path} is in pysyncobj's journal format, which this raftstate "
                    "version does not read (it adds a checksum to every record); move "
                    "data_dir aside and let the node resync from the cluster"
                )
            try:
                check_journal_header(data)
            except CorruptData as exc:
                self._truncate_all(fd, exc.what, len(data))
                return fd
            scan = scan_records(data, len(JOURNAL_MAGIC))
            self._entries, self._offsets, self._end = scan.entries, scan.offsets, scan.end
            if scan.problem is not None:
                first_lost = scan.entries[-1][1] + 1 if scan.entries else 0
                through = f"{scan.lost_through}" if scan.lost_through else "the end"
                self.damage = f"{self.path}: {scan.problem} at byte {scan.end}"
                log.error(
                    "journal %s is corrupt (%s at byte %d): truncated there, entries %s-%s lost "
                    "(%d bytes discarded); the leader will re-replicate them",
                    self.path,
                    scan.problem,
                    scan.end,
                    first_lost or "?",
                    through,
                    len(data) - scan.end,
                )
                os.ftruncate(fd, scan.end)
                self._sync(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _truncate_all(self, fd: int, problem: str, size: int) -> None:
        self.damage = f"{self.path}: {problem}"
        log.error(
            "journal %s is corrupt (%s): all %d bytes discarded; the leader will "
            "re-replicate the log",
            self.path,
            problem,
            size,
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, JOURNAL_MAGIC, 0)
        self._sync(fd)
        self._end = len(JOURNAL_MAGIC)

    # ---- pysyncobj's Journal interface ------------------------------------------

    def add(self, command: Any, idx: int, term: int) -> None:
        raw = command if isinstance(command, bytes) else _to_bytes(command)
        record = encode_record(raw, idx, term)
        os.pwrite(self._fd, record, self._end)
        self._sync(self._fd)
        self._entries.append((command, idx, term))
        self._offsets.append(self._end)
        self._end += len(record)

    def clear(self) -> None:
        self._entries = []
        self._offsets = []
        self._end = len(JOURNAL_MAGIC)
        os.ftruncate(self._fd, self._end)
        self._sync(self._fd)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803 - pysyncobj's names
        if entryFrom >= len(self._entries):
            return
        self._end = self._offsets[entryFrom]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        os.ftruncate(self._fd, self._end)
        self._sync(self._fd)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802, N803
        """Drop the first ``entryTo`` entries: rewrite the kept ones into a new
        file and rename it over the old one, so a crash leaves either file whole."""
        keep = self._entries[entryTo:]
        tmp = self.path + ".tmp"
        fd = open_private_fd(tmp, os.O_RDWR | os.O_TRUNC)
        offsets: list[int] = []
        chunks = [JOURNAL_MAGIC]
        end = len(JOURNAL_MAGIC)
        for command, idx, term in keep:
            record = encode_record(_to_bytes(command), idx, term)
            offsets.append(end)
            chunks.append(record)
            end += len(record)
        try:
            _write_all(fd, b"".join(chunks))
            self._sync(fd, force=True)
        except BaseException:
            os.close(fd)
            raise
        os.replace(tmp, self.path)
        if self.fsync:
            _fsync_dir(self.path)
        os.close(self._fd)
        self._fd, self._entries, self._offsets, self._end = fd, keep, offsets, end
        self.compactions += 1

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        if self._meta_dirty:
            self._store_meta()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def flush(self) -> None:
        self._sync(self._fd, force=True)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        if raftCommitIndex != self._meta.commit_index:
            self._meta = _replace(self._meta, commit_index=raftCommitIndex)
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._meta.commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802, N803
        """Raft: term and vote are durable before any message reflecting them."""
        voted = None if votedForNodeId is None else str(votedForNodeId)
        self._meta = _replace(self._meta, term=term, voted_for=voted)
        self._store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._meta.term

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return self._meta.voted_for

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._meta_dirty:
            self._store_meta()

    # ---- raftstate's additions ----------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes in the journal file (header + records). Any thread."""
        return self._end

    def bytes_before(self, index: int) -> int:
        """Bytes of the records with a log index below ``index``: what a
        compaction at ``index`` would free. Tick thread."""
        if not self._entries:
            return 0
        pos = index - self._entries[0][1]
        if pos <= 0:
            return 0
        if pos >= len(self._offsets):
            return self._end - len(JOURNAL_MAGIC)
        return self._offsets[pos] - len(JOURNAL_MAGIC)

    @property
    def catch_up(self) -> bool:
        """Whether this node must catch up with a leader before it votes."""
        return self._meta.catch_up

    def set_catch_up(self, value: bool) -> None:
        """Persist the catch-up flag at once (it gates votes)."""
        if value != self._meta.catch_up:
            self._meta = _replace(self._meta, catch_up=value)
            self._store_meta()

    def reset_for_catch_up(self) -> None:
        """Empty the log (keep term and vote) and set the catch-up flag: used
        when the snapshot the log continues from is gone. Before pysyncobj
        uses the journal."""
        self.clear()
        self._meta = _replace(self._meta, commit_index=1, catch_up=True)
        self._store_meta()

    def _store_meta(self) -> None:
        tmp = self.meta_path + ".tmp"
        with open_private(tmp, "wb") as fh:
            fh.write(encode_meta(self._meta))
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.meta_path)
        if self.fsync:
            _fsync_dir(self.meta_path)
        self._meta_dirty = False

    def _sync(self, fd: int, *, force: bool = False) -> None:
        if self.fsync or force:
            os.fdatasync(fd)


def compaction_due(journal_bytes: int, compactable_bytes: int, limit: int) -> bool:
    """Whether to force a log compaction: the journal is over ``limit`` and
    at least half the limit would be freed (entries already applied), so a
    journal full of not-yet-applied entries does not snapshot on every tick."""
    return journal_bytes > limit and compactable_bytes >= limit // 2


def _load_meta(path: str) -> tuple[Meta, str | None]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return Meta(), None
    try:
        return decode_meta(data), None
    except CorruptData as exc:
        return Meta(catch_up=True), exc.what


def _replace(meta: Meta, **changes: Any) -> Meta:
    return dataclasses.replace(meta, **changes)


def _to_bytes(command: Any) -> bytes:
    if isinstance(command, str):
        return command.encode()
    return bytes(command)


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 24), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], pos)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VerifyingSerializer(Serializer):  # type: ignore[misc]
    """pysyncobj's ``Serializer`` whose receiving side verifies a snapshot
    streamed by the leader before it replaces the node's own.

    ``verify(path)`` raises :class:`CorruptData` for a bad file (it is
    :meth:`raftstate.raftnode.SnapshotCodec.verify`); pysyncobj builds the
    serializer itself, so raftstate passes ``verify`` and ``fsync`` through
    ``functools.partial`` (``raftnode._storage_classes``). Only the file case
    is handled here; raftstate always configures a snapshot file."""

    def __init__(
        self,
        fileName: str | None,  # noqa: N803 - pysyncobj's names
        transmissionBatchSize: int,  # noqa: N803
        tryUseFork: bool,  # noqa: N803
        serializer: Any,
        deserializer: Any,
        serializeChecker: Any,  # noqa: N803
        *,
        verify: Callable[[str], None] | None = None,
        fsync: bool = False,
    ) -> None:
        super().__init__(
            fileName, transmissionBatchSize, tryUseFork, serializer, deserializer, serializeChecker
        )
        self._path = fileName
        self.verify = verify
        self.fsync = fsync
        self._incoming: Any = None
        #: Snapshots received from the leader and rejected as corrupt.
        self.rejected = 0

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802
        """One piece ``(bytes, is_first, is_last)`` of a snapshot from the
        leader. Returns ``True`` once a complete, verified snapshot has
        replaced the node's file (pysyncobj then loads it)."""
        if self._path is None or self.verify is None:
            return bool(super().setTransmissionData(data))
        if data is None:
            return False
        chunk, is_first, is_last = data
        tmp = self._path + ".incoming"
        if is_first:
            if self._incoming is not None:
                self._incoming.close()
            self._incoming = open_private(tmp, "wb")  # noqa: SIM115 - spans calls
        elif self._incoming is None:
            return False
        self._incoming.write(_to_bytes(chunk))
        if not is_last:
            return False
        self._incoming.flush()
        if self.fsync:
            os.fsync(self._incoming.fileno())
        self._incoming.close()
        self._incoming = None
        try:
            self.verify(tmp)
        except CorruptData as exc:
            self.rejected += 1
            os.unlink(tmp)
            log.error(
                "snapshot received from the leader is corrupt (%s): rejected, not loaded; "
                "the leader will send it again",
                exc.what,
            )
            return False
        os.replace(tmp, self._path)
        if self.fsync:
            _fsync_dir(self._path)
        return True


def move_aside(path: str | Path, now: float | None = None) -> Path:
    """Rename a corrupt file to ``<path>.corrupt-<ts>`` and return the new path."""
    target = corrupt_name(path, time.time() if now is None else now)
    os.replace(path, target)
    return target


__all__ = [
    "ChecksummedJournal",
    "JournalFormatError",
    "VerifyingSerializer",
    "compaction_due",
    "corrupt_name",
    "move_aside",
]
