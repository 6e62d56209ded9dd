"""Snapshots off the Raft thread: pysyncobj's serializer, in the background.

Theory of operation
-------------------
pysyncobj compacts its log by calling ``Serializer.serialize`` on the tick
thread and polling ``checkSerializing`` on later ticks; once that says
SUCCESS it drops the log up to the snapshot. With a custom serializer it
writes the whole file inside ``serialize``: at a million devices that froze
Raft for ~14 s, past the election timeout. :class:`BackgroundSerializer`
keeps pysyncobj's protocol and moves the work:

* ``serialize`` (tick thread) takes a :class:`~raftstate.statemachine.TableCapture`
  (O(n/B) references; copy-on-write keeps it the table at the captured
  index) and starts a thread that writes it (raftstate/snapshotfile.py);
  ``checkSerializing`` reports SERIALIZING until that thread ends, then
  SUCCESS (the log is compacted to the captured index) or FAILED, and
  releases the capture.
* Why a thread and not pysyncobj's ``useFork``: a child forked from a node
  (gRPC and uvloop threads running) crashed with SIGSEGV/SIGABRT in 5 of
  ~150 snapshots in a loaded 3-node run (Python finalises the other threads'
  state in the child). The thread shares the GIL, but the writer only runs
  Python for short stretches between C calls (join, hash, write) and the
  interpreter hands the GIL to the tick thread every switch interval (5 ms).
* A leader keeps sending a follower the previous snapshot file while a new
  one is written (the open file is unaffected by the rename); pysyncobj's
  own serializer restarted every transfer at each compaction.
* Receiving (a follower catching up): each piece from the leader is written
  to ``snapshot.bin.incoming`` and queued to a loader thread that verifies and
  builds the new table while the rest arrives. At the last piece the tick
  thread waits only for the loader to finish what is queued; a snapshot
  that fails verification is rejected as before. The loaded table is handed
  to :class:`~raftstate.raftnode.SnapshotCodec` (``stage``), so pysyncobj's
  following ``deserialize`` installs it without reading the file again.

Threads: pysyncobj calls every method on the tick thread; the writer and
loader threads touch only their own capture/loader and report through a
finished ``threading.Thread`` and an attribute written once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pysyncobj.config import SERIALIZER_STATE

from raftstate.integrity import CorruptData
from raftstate.journal import VerifyingSerializer, _fsync_dir, _to_bytes
from raftstate.privfile import open_private
from raftstate.snapshotfile import Loaded, Loader

log = logging.getLogger("raftstate.snapshot")


class Codec(Protocol):
    """What the serializer needs from ``raftnode.SnapshotCodec``."""

    def start_write(self, path: str, data: tuple[Any, Any, Any]) -> Callable[[], None]:
        """Tick thread: capture now; return the work to run on another thread."""
        ...

    def release(self) -> None:
        """Tick thread: the capture is no longer read; drop it."""
        ...

    def written(self, seconds: float) -> None:
        """Tick thread: the write succeeded (log it, keep its numbers)."""
        ...

    def failed(self) -> None:
        """Tick thread: the write failed (count it)."""
        ...

    def stage(self, path: str, loaded: Loaded) -> None:
        """Tick thread: ``loaded`` is the verified content of ``path``."""
        ...


class _ThreadWriter(threading.Thread):
    """Runs the write on a thread of this process."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(name="raftstate-snapshot-writer", daemon=True)
        self._work = work
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.seconds = 0.0
        self.start()

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # reported as FAILED by checkSerializing
            self.error = exc
        self.seconds = time.monotonic() - self.started_at

    def done(self) -> bool:
        return not self.is_alive()


class _Receiver(threading.Thread):
    """Feeds queued pieces to a ``Loader``; ``None`` ends the queue."""

    def __init__(self) -> None:
        super().__init__(name="raftstate-snapshot-loader", daemon=True)
        self.pieces: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.loaded: Loaded | None = None
        self.error: CorruptData | None = None

    def run(self) -> None:
        loader = Loader()
        failed = False
        while True:
            piece = self.pieces.get()
            if piece is None:
                break
            if failed:
                continue
            try:
                loader.feed(piece)
            except CorruptData as exc:
                self.error, failed = exc, True
            except Exception as exc:  # a bug in the loader must not pass as a snapshot
                self.error, failed = CorruptData(f"snapshot loader failed: {exc!r}"), True
        if failed:
            return
        try:
            self.loaded = loader.finish()
        except CorruptData as exc:
            self.error = exc


class BackgroundSerializer(VerifyingSerializer):
    """pysyncobj's ``Serializer`` with writing and loading on other threads
    (module docstring). Built by pysyncobj through ``functools.partial``
    with ``codec`` (and ``verify``/``fsync`` for the base class)."""

    def __init__(self, *args: Any, codec: Codec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = codec
        self._writer: _ThreadWriter | None = None
        self._writing_id: Any = None
        self._receiver: _Receiver | None = None
        #: Seconds the last snapshot took to write (on the writer thread).
        self.last_write_s = 0.0
        #: Seconds the tick thread waited for the loader at the last piece.
        self.last_load_wait_s = 0.0

    # ---- writing (leader and followers compact alike) ------------------------

    def serialize(self, data: Any, id: Any) -> None:  # noqa: A002 - pysyncobj's name
        if self._writer is not None or self._path is None:
            return
        self._writing_id = id
        last, prev, cluster = data[1:]
        work = self.codec.start_write(self._path, (last, prev, cluster))
        self._writer = _ThreadWriter(work)

    def checkSerializing(self) -> tuple[int, Any]:  # noqa: N802 - pysyncobj's name
        writer = self._writer
        if writer is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not writer.done():
            return SERIALIZER_STATE.SERIALIZING, self._writing_id
        self._writer = None
        self.codec.release()
        self.last_write_s = writer.seconds
        if writer.error is not None:
            log.error("snapshot write failed: %r", writer.error)
            self.codec.failed()
            return SERIALIZER_STATE.FAILED, self._writing_id
        self.codec.written(writer.seconds)
        return SERIALIZER_STATE.SUCCESS, self._writing_id

    # ---- receiving (a follower installing the leader's snapshot) -------------

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802 - pysyncobj's name
        if self._path is None or data is None:
            return False
        chunk, is_first, is_last = data
        chunk = _to_bytes(chunk)
        tmp = self._path + ".incoming"
        if is_first:
            self._abort_receive()
            self._incoming = open_private(tmp, "wb")  # noqa: SIM115 - spans calls
            self._receiver = _Receiver()
            self._receiver.start()
        elif self._incoming is None or self._receiver is None:
            return False
        self._incoming.write(chunk)
        if chunk:
            self._receiver.pieces.put(chunk)
        if not is_last:
            return False
        receiver = self._receiver
        self._receiver = None
        self._incoming.flush()
        if self.fsync:
            os.fsync(self._incoming.fileno())
        self._incoming.close()
        self._incoming = None
        started = time.monotonic()
        receiver.pieces.put(None)
        receiver.join()
        self.last_load_wait_s = time.monotonic() - started
        if receiver.loaded is None:
            self.rejected += 1
            os.unlink(tmp)
            what = receiver.error.what if receiver.error is not None else "incomplete"
            log.error(
                "snapshot received from the leader is corrupt (%s): rejected, not loaded; "
                "the leader will send it again",
                what,
            )
            return False
        os.replace(tmp, self._path)
        if self.fsync:
            _fsync_dir(self._path)
        self.codec.stage(self._path, receiver.loaded)
        return True

    def _abort_receive(self) -> None:
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None
        if self._receiver is not None:
            self._receiver.pieces.put(None)
            self._receiver = None
