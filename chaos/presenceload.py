"""A recorded workload of heartbeats with short TTLs, deletes and reads.

Like :class:`chaos.workload.Workload`, but the devices also go *offline*
and *disappear*: every heartbeat carries a short TTL (``ttl_s``), each writer
pauses a device for longer than its TTL now and then (so the leader commits
its expiry), and deletes it now and then (a later heartbeat re-creates it).
Readers pinned to every node issue LINEARIZABLE gets and record the
committed ``online`` flag, so the history holds heartbeats, deletes and
reads, and the checker (:mod:`chaos.linearizability`) infers the expiries.

Recording rules (so that every recorded result is one the model allows):

* One writer thread owns each device and does its heartbeats and deletes in
  sequence, so no retry of one overlaps the other on that device.
* A heartbeat answered ``duplicate=True, stored_seq == seq`` is this
  heartbeat applied by an earlier attempt (see :mod:`chaos.workload`).
* A delete answered ``deleted=True`` is definite. ``deleted=False`` is
  recorded as an unknown outcome: the node retries a delete whose first
  proposal may already have been committed, and the retry then finds
  nothing; "unknown" is the sound reading of that answer.
* ``acked`` holds, per device, the acknowledged heartbeats that stored their
  own seq, for the watch checks: each must appear as an event.

Thread-based; :meth:`PresenceWorkload.stop` joins every thread.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import grpc

from chaos.history import DeleteResult, DeviceValue, History, ReadResult, WriteResult
from raftstate.errors import RaftStateError
from raftstate.sdk import DeviceClient
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc


class PresenceWorkload:
    """Writers (heartbeats with short TTLs, pauses, deletes) and pinned
    linearizable readers, until :meth:`stop`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "wf-",
        devices: int = 8,
        writers: int = 4,
        ttl_s: int = 1,
        pause_p: float = 0.08,
        delete_p: float = 0.04,
        gap_s: float = 0.05,
        write_deadline_s: float = 8.0,
        read_deadline_s: float = 1.0,
        seed: int = 1,
    ) -> None:
        """Each round a writer heartbeats each of its devices; with
        probability ``pause_p`` a device is left silent for ``ttl_s`` + 0.3
        to + 1.5 s instead, and with ``delete_p`` it is deleted."""
        self.history = History()
        #: device -> seqs acknowledged as stored by their own heartbeat.
        self.acked: dict[str, list[int]] = {}
        self.writes_ok = self.reads_ok = self.deletes_ok = self.failures = 0
        self.ids = [f"{prefix}{i:03d}" for i in range(devices)]
        self._endpoints = list(endpoints)
        self._ttl = ttl_s
        self._pause_p, self._delete_p, self._gap = pause_p, delete_p, gap_s
        self._write_deadline, self._read_deadline = write_deadline_s, read_deadline_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = DeviceClient(self._endpoints, deadline_s=write_deadline_s)
        self._threads = [
            threading.Thread(
                target=self._write_loop, args=(f"w{w}", self.ids[w::writers], seed * 31 + w),
                daemon=True,
            )
            for w in range(writers)
            if self.ids[w::writers]
        ]
        self._threads += [
            threading.Thread(target=self._read_loop, args=(f"r{n}", e, n), daemon=True)
            for n, e in enumerate(self._endpoints)
        ]

    def __enter__(self) -> PresenceWorkload:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop issuing operations and wait for those in flight. Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self._client.close()

    @property
    def completed(self) -> int:
        return self.writes_ok + self.reads_ok + self.deletes_ok

    def _write_loop(self, client_id: str, ids: list[str], seed: int) -> None:
        rng = random.Random(seed)
        silent_until = dict.fromkeys(ids, 0.0)
        clock = 0.0  # seconds of this loop's own pacing (no wall clock needed)
        n = 0
        while not self._stop.is_set():
            for device_id in ids:
                if self._stop.is_set():
                    return
                if silent_until[device_id] > clock:
                    continue
                roll = rng.random()
                if roll < self._pause_p:
                    silent_until[device_id] = clock + self._ttl + rng.uniform(0.3, 1.5)
                elif roll < self._pause_p + self._delete_p:
                    self._delete(client_id, device_id)
                else:
                    n += 1
                    self._heartbeat(client_id, device_id, {"w": client_id, "n": str(n)})
            self._stop.wait(self._gap)
            clock += self._gap

    def _heartbeat(self, client_id: str, device_id: str, reported: dict[str, str]) -> None:
        seq = self._client._client.next_seq(device_id)  # noqa: SLF001 - fixed up front
        op = self.history.invoke_write(client_id, device_id, seq, reported)
        try:
            ack = self._client.heartbeat(device_id, reported, seq=seq, ttl_s=self._ttl)
        except RaftStateError:
            self.history.fail(op)
            with self._lock:
                self.failures += 1
            return
        own = ack.duplicate and ack.stored_seq == seq
        self.history.ok(op, WriteResult(ack.duplicate and not own, ack.stored_seq, ack.revision))
        with self._lock:
            self.writes_ok += 1
            if ack.stored_seq == seq:
                self.acked.setdefault(device_id, []).append(seq)

    def _delete(self, client_id: str, device_id: str) -> None:
        op = self.history.invoke_delete(client_id, device_id)
        try:
            res = self._client.delete(device_id, deadline_s=self._write_deadline)
        except RaftStateError:
            res = None
        if res is None or not res.deleted:
            self.history.fail(op)  # module docstring: "nothing deleted" may hide a retry
            with self._lock:
                self.failures += res is None
                self.deletes_ok += res is not None
            return
        self.history.ok(op, DeleteResult(True, res.deleted_seq, res.revision))
        with self._lock:
            self.deletes_ok += 1

    def _read_loop(self, client_id: str, endpoint: str, offset: int) -> None:
        creds = Credentials.from_env()
        with creds.channel(endpoint) as ch:
            stub = device_pb2_grpc.DeviceStateServiceStub(ch)
            i = offset
            while not self._stop.is_set():
                device_id = self.ids[i % len(self.ids)]
                i += 1
                op = self.history.invoke_read(client_id, device_id)
                try:
                    res = stub.GetDevice(
                        device_pb2.GetDeviceRequest(
                            device_id=device_id, consistency=device_pb2.CONSISTENCY_LINEARIZABLE
                        ),
                        timeout=self._read_deadline,
                        metadata=creds.metadata(),
                    )
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        self.history.ok(op, ReadResult.not_found())
                        with self._lock:
                            self.reads_ok += 1
                    else:
                        self.history.fail(op)
                        with self._lock:
                            self.failures += 1
                        self._stop.wait(0.02)
                    continue
                d = res.device
                value = DeviceValue.of(d.seq, dict(d.reported), online=d.online)
                self.history.ok(op, ReadResult(value))
                with self._lock:
                    self.reads_ok += 1
                self._stop.wait(0.005)
