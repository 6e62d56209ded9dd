"""A recorded device workload: concurrent heartbeats and linearizable reads.

Writers send heartbeats through the SDK (leader-finding, retries with the same
seq). Readers are pinned to one node each and issue LINEARIZABLE ``GetDevice``
calls with a short deadline, so reads are served by followers as well as the
leader. Every operation is recorded in a :class:`~chaos.history.History` with
its invocation and response times; a failure is recorded as an unknown
outcome. ``acked`` keeps the highest acknowledged seq per device for the
durability check.

Writes take every path a device's heartbeat can take, by writer: a unary
call to the leader, a unary call to one fixed node (a follower forwards it to
the leader over Raft), and a pipelined stream. Their ``reported`` maps are
drawn from the whole allowed size range, 0 to 8 KiB (:mod:`chaos.flood`),
since a replication bug once hid behind tiny payloads.

Recording a retried heartbeat: the SDK and the node both retry with the same
seq, so an answer ``duplicate=True, stored_seq == seq`` means *this* heartbeat
was applied by an earlier attempt inside the operation's interval (in these
workloads no other operation ever sends the same ``(device, seq)``). It is
recorded as an effective write.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from chaos.flood import draw_reported
from chaos.history import DeviceValue, History, ReadResult, WriteResult
from raftstate.errors import RaftStateError
from raftstate.sdk import DeviceClient
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc


class Workload:
    """Background writers and readers until :meth:`stop`. Thread-based."""

    def __init__(
        self,
        write_endpoints: Sequence[str],
        read_endpoints: Sequence[str],
        *,
        devices: int = 8,
        writers: int = 4,
        readers_per_node: int = 1,
        prefix: str = "lin",
        write_deadline_s: float = 5.0,
        read_deadline_s: float = 1.0,
        history: History | None = None,
        prefer_leader: bool = True,
        paths: Sequence[str] = ("unary", "forwarded", "stream"),
        payloads: bool = True,
        seed: int = 1,
    ) -> None:
        """``prefer_leader=False`` keeps writes on ``write_endpoints`` (e.g.
        proxies) instead of following the leader's advertised address.
        Writer ``w`` uses ``paths[w % len(paths)]``: ``unary`` (leader-seeking
        unary calls), ``forwarded`` (unary calls kept on one node, the
        ``w``-th endpoint; a follower forwards them) or ``stream`` (one
        pipelined HeartbeatStream). ``payloads=False`` sends tiny maps."""
        self.history = history or History()
        self.acked: dict[str, int] = {}
        self.writes_ok = 0
        self.reads_ok = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = [f"{prefix}-{i:03d}" for i in range(devices)]
        self._client = DeviceClient(
            list(write_endpoints), deadline_s=write_deadline_s, prefer_leader=prefer_leader
        )
        self._payloads = payloads
        self._seed = seed
        self._write_endpoints = list(write_endpoints)
        self._write_deadline = write_deadline_s
        self._paths = list(paths) or ["unary"]
        self._read_deadline = read_deadline_s
        self._threads: list[threading.Thread] = []
        for w in range(writers):
            mine = self._ids[w::writers]
            if mine:
                path = self._paths[w % len(self._paths)]
                self._threads.append(threading.Thread(
                    target=self._write_loop, args=(f"w{w}", mine, path, w), daemon=True))
        for n, endpoint in enumerate(read_endpoints):
            for r in range(readers_per_node):
                self._threads.append(threading.Thread(
                    target=self._read_loop, args=(f"r{n}.{r}", endpoint, r), daemon=True))

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop issuing operations and wait for those in flight. Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self._client.close()

    @property
    def completed(self) -> int:
        return self.writes_ok + self.reads_ok

    def _write_loop(self, client_id: str, ids: list[str], path: str, index: int) -> None:
        rng = random.Random(self._seed * 7919 + index)
        if path == "unary":
            self._write_with(client_id, ids, rng, self._client.heartbeat)
            return
        eps = self._write_endpoints
        pinned = eps[index % len(eps) :] + eps[: index % len(eps)]
        with DeviceClient(pinned, deadline_s=self._write_deadline, prefer_leader=False) as own:
            if path == "forwarded":
                self._write_with(client_id, ids, rng, own.heartbeat)
                return
            with own.stream(endpoint=pinned[0], max_in_flight=4) as stream:

                def send(device_id: str, reported: dict[str, str], *, seq: int) -> Any:
                    return stream.send(
                        device_id, reported, seq=seq, deadline_s=self._write_deadline
                    )

                self._write_with(client_id, ids, rng, send)

    def _write_with(
        self, client_id: str, ids: list[str], rng: random.Random, heartbeat: Any
    ) -> None:
        n = 0
        while not self._stop.is_set():
            for device_id in ids:
                n += 1
                seq = self._client._client.next_seq(device_id)  # noqa: SLF001 - fixed up front
                reported = draw_reported(rng, 8 * 1024 - 64, 62) if self._payloads else {}
                reported.update({"w": client_id, "n": str(n)})
                op = self.history.invoke_write(client_id, device_id, seq, reported)
                try:
                    ack = heartbeat(device_id, reported, seq=seq)
                except RaftStateError:
                    self.history.fail(op)
                    with self._lock:
                        self.failures += 1
                    continue
                own = ack.duplicate and ack.stored_seq == seq
                self.history.ok(op, WriteResult(ack.duplicate and not own,
                                                ack.stored_seq, ack.revision))
                with self._lock:
                    self.writes_ok += 1
                    self.acked[device_id] = max(self.acked.get(device_id, 0), seq)

    def _read_loop(self, client_id: str, endpoint: str, offset: int) -> None:
        creds = Credentials.from_env()  # plaintext unless RAFTSTATE_CA/TOKEN are set
        with creds.channel(endpoint) as ch:
            stub = device_pb2_grpc.DeviceStateServiceStub(ch)
            i = offset
            while not self._stop.is_set():
                device_id = self._ids[i % len(self._ids)]
                i += 1
                op = self.history.invoke_read(client_id, device_id)
                try:
                    res = stub.GetDevice(
                        device_pb2.GetDeviceRequest(device_id=device_id,
                                                    consistency=device_pb2.CONSISTENCY_LINEARIZABLE),
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
                        self._stop.wait(0.02)  # do not spin on a dead node
                    continue
                d = res.device
                self.history.ok(op, ReadResult(DeviceValue.of(d.seq, dict(d.reported))))
                with self._lock:
                    self.reads_ok += 1
