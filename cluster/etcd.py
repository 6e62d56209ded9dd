"""EtcdCluster: a real multi-member etcd cluster on loopback, for the benchmark.

Why: ``raftstate bench --vs-etcd`` compares raftstate with etcd, the reference
Raft key-value store. The comparison is only honest if etcd runs the same way
raftstate does in the benchmark: N real processes on 127.0.0.1, each with its
own data directory, started fresh for the run and stopped afterwards.

Theory of operation:

1. ``start()`` picks ``2 * size`` free loopback ports (client and peer per
   member), then spawns ``size`` etcd members, all with the same
   ``--initial-cluster`` list, ``--initial-cluster-state new`` and a cluster
   token unique to this run, so the members can never join another cluster.
2. It waits, polling with a deadline (no fixed sleeps), until every member
   answers ``Maintenance.Status`` naming the same leader, and that leader
   accepts a ``Put`` of :data:`READY_KEY`. So the store revision is already at
   least 1 when ``start()`` returns (usually exactly 1).
3. ``stop()`` sends SIGTERM to one member at a time, SIGKILL if it is still
   running after the deadline, and reaps it before moving to the next.

Fairness: apart from the listed flags and ``--logger=zap`` (the 3.5 default
logger, which avoids 3.4's deprecation warning), etcd runs with its defaults.
Those fsync the WAL before acknowledging every write (and the bbolt backend
on every commit), so compare it with a raftstate configuration that also
syncs its log. ``unsafe_no_fsync=True`` passes ``--unsafe-no-fsync``
(available since etcd 3.4.10, though hidden from 3.4's ``--help``), which
disables every fsync for a comparison with a non-durable raftstate.

A port can be taken by another process between the moment we free it and the
moment etcd binds it; the affected member then exits, and ``start()`` raises
:class:`EtcdClusterError` with the tail of that member's log.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from bench.etcdpb import etcd_kv_pb2, etcd_kv_pb2_grpc

READY_KEY = b"__raftstate_bench_ready__"
"""Key written once by :meth:`EtcdCluster.start` to prove the cluster accepts writes."""

DEFAULT_ETCD = "/usr/bin/etcd"
_POLL_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 1.0
_LOG_TAIL_CHARS = 2000


class EtcdClusterError(RuntimeError):
    """The etcd cluster could not be started or has no leader; the message says why."""


@dataclass(frozen=True, slots=True)
class EtcdMember:
    """Where one member listens and keeps its files."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path

    @property
    def client_endpoint(self) -> str:
        """The gRPC target for clients, ``127.0.0.1:port``."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    All sockets are held open together so the ports differ; they are released
    before returning, so another process may still take one.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _member_status(endpoint: str, timeout_s: float) -> etcd_kv_pb2.StatusResponse | None:
    """``Maintenance.Status`` of one member, or ``None`` if it does not answer in time."""
    with grpc.insecure_channel(endpoint) as channel:
        try:
            stub = etcd_kv_pb2_grpc.MaintenanceStub(channel)
            response: etcd_kv_pb2.StatusResponse = stub.Status(
                etcd_kv_pb2.StatusRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
    return response


def _put(endpoint: str, key: bytes, value: bytes, timeout_s: float) -> bool:
    """Whether a ``KV.Put`` to ``endpoint`` succeeded within ``timeout_s``."""
    with grpc.insecure_channel(endpoint) as channel:
        try:
            stub = etcd_kv_pb2_grpc.KVStub(channel)
            stub.Put(etcd_kv_pb2.PutRequest(key=key, value=value), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return True


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 whose files live under ``base_dir``.

    Member ``etcdN`` keeps its data in ``base_dir/etcdN.data`` and its log in
    ``base_dir/etcdN.log``. Ports are chosen when the object is created.
    ``with EtcdCluster(...) as c:`` starts the cluster (unless already
    started) and always stops it. Not safe to use from several threads at once.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        unsafe_no_fsync: bool = False,
        etcd_binary: str = DEFAULT_ETCD,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """``extra_args`` are appended to every member's command line (e.g.
        compaction settings). Raises ``ValueError`` if ``size`` is less than 1."""
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.base_dir = Path(base_dir).resolve()
        self.size = size
        self.unsafe_no_fsync = unsafe_no_fsync
        self.etcd_binary = etcd_binary
        self.extra_args = extra_args
        self.token = f"raftstate-bench-{secrets.token_hex(8)}"
        ports = _free_ports(2 * size)
        self.members: tuple[EtcdMember, ...] = tuple(
            EtcdMember(
                name=f"etcd{i}",
                client_port=ports[i],
                peer_port=ports[size + i],
                data_dir=self.base_dir / f"etcd{i}.data",
                log_path=self.base_dir / f"etcd{i}.log",
            )
            for i in range(size)
        )
        self._procs: list[subprocess.Popen[bytes]] = []

    # ---- lifecycle --------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        if not self._procs:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        """Client endpoints ``127.0.0.1:port``, in member order."""
        return [m.client_endpoint for m in self.members]

    def command(self, member: EtcdMember) -> list[str]:
        """The etcd command line for ``member``."""
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            self.etcd_binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
        ]  # fmt: skip
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        return argv + list(self.extra_args)

    def start(self, timeout_s: float = 30.0) -> list[str]:
        """Start every member and wait until the cluster has a leader that accepts a Put.

        Returns the client endpoints. Raises ``EtcdClusterError`` if already
        started, if a data directory already exists (a fresh cluster needs
        fresh data), if a member exits early, or if ``timeout_s`` passes first;
        raises ``FileNotFoundError`` if the etcd binary is missing. On any
        failure every member already started is stopped.
        """
        if self._procs:
            raise EtcdClusterError("cluster already started; call stop() first")
        if shutil.which(self.etcd_binary) is None:
            raise FileNotFoundError(f"etcd binary not found: {self.etcd_binary}")
        for m in self.members:
            if m.data_dir.exists():
                raise EtcdClusterError(
                    f"{m.data_dir} already exists; use an empty base_dir for a new cluster"
                )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # etcd reads ETCD_* variables as flags; keep the caller's environment out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        deadline = time.monotonic() + timeout_s
        try:
            for m in self.members:
                with open(m.log_path, "ab") as log:
                    self._procs.append(
                        subprocess.Popen(
                            self.command(m),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env=env,
                        )
                    )
            self._wait_ready(deadline, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every member: SIGTERM, then SIGKILL if it still runs after ``timeout_s``.

        Members are stopped one at a time, in reverse start order, and each is
        reaped before the next is signalled: a leader that is terminated while
        its followers are also shutting down waits ~7 s for a leadership
        transfer that cannot happen, whereas one at a time takes ~0.1 s in all.
        Idempotent; never raises for members that have already exited.
        """
        while self._procs:
            proc = self._procs[-1]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._procs.pop()

    # ---- observation ------------------------------------------------------

    def pids(self) -> list[int]:
        """Process ids of the members that are still running, in member order."""
        return [p.pid for p in self._procs if p.poll() is None]

    def leader_endpoint(self, timeout_s: float = _PROBE_TIMEOUT_S) -> str:
        """Client endpoint of the member that all answering members name as leader.

        Asks every member once (no waiting for an election). Raises
        ``EtcdClusterError`` if no member answers within ``timeout_s``, they
        disagree, none knows a leader, or the leader itself does not answer.
        """
        leader = self._agreed_leader(timeout_s, require_all=False)
        if leader is None:
            raise EtcdClusterError("etcd cluster has no agreed leader right now")
        return leader

    def log_tail(self, member: EtcdMember, chars: int = _LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of ``member``'s log (empty if there is none)."""
        try:
            return member.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # ---- internals --------------------------------------------------------

    def _agreed_leader(self, timeout_s: float, *, require_all: bool) -> str | None:
        """Endpoint of the leader the members agree on, else ``None``.

        With ``require_all`` every member must answer; otherwise silent members
        are ignored (the leader must still answer, since its endpoint is found
        from its own member id).
        """
        by_id: dict[int, str] = {}
        leaders: set[int] = set()
        for m in self.members:
            status = _member_status(m.client_endpoint, timeout_s)
            if status is None:
                if require_all:
                    return None
                continue
            by_id[int(status.header.member_id)] = m.client_endpoint
            leaders.add(int(status.leader))
        if len(leaders) != 1:
            return None
        return by_id.get(leaders.pop())

    def _check_alive(self) -> None:
        # Fewer processes than members while start() is still spawning them.
        for m, proc in zip(self.members, self._procs, strict=False):
            if proc.poll() is not None:
                raise EtcdClusterError(
                    f"etcd member {m.name} exited with code {proc.returncode} during start; "
                    f"see {m.log_path}. Log tail:\n{self.log_tail(m)}"
                )

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            probe_s = max(0.01, min(_PROBE_TIMEOUT_S, remaining))
            leader = self._agreed_leader(probe_s, require_all=True)
            if leader is not None and _put(leader, READY_KEY, b"1", probe_s):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdClusterError(
                    f"etcd cluster of {self.size} did not elect a leader that accepts writes "
                    f"within {timeout_s:.1f}s; see the logs in {self.base_dir}"
                )
            time.sleep(min(_POLL_INTERVAL_S, remaining))
