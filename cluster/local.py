"""LocalCluster: N raftstate node processes on this machine.

Used by ``raftstate cluster up``, ``raftstate bench`` and the tests. Every
node is a real ``python -m raftstate node`` process with its own config file,
data directory and log file under ``base_dir``. Waits are conditions polled
with deadlines (``Cluster.Status`` over gRPC), never fixed sleeps.

Security: a base config without TLS files that is not ``insecure_grpc``
(``NodeConfig.default()``), or ``secure=True``, makes the cluster secure: a
private CA, node certificates, an admin client certificate and a token key
are created in ``base_dir/pki`` (kept across restarts), each node serves
TLS on its gRPC port (bearer tokens) and on a second, mTLS port, and
``auth = "required"``. :meth:`LocalCluster.client_kwargs` and
:meth:`LocalCluster.issue_token` give clients what they need.
``NodeConfig.for_tests()`` stays plaintext on loopback without auth.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from raftstate import pki as pkilib
from raftstate.authz import Role, parse_token_keys, sign_token
from raftstate.config import Member, NodeConfig
from raftstate.nodekeys import generate_key_pair, public_key_of, write_key_file
from raftstate.privfile import open_private, private_dir, write_private
from raftstate.sdk.credentials import Credentials
from raftstate.secretcheck import generate_secret
from raftstate.v1 import auth_pb2, cluster_pb2, cluster_pb2_grpc

DEFAULT_GRPC_BASE = 7001
DEFAULT_RAFT_BASE = 7101


def _is_loopback_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound to port 0 and
    released; another process could still take one before we use it)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(host: str, port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def node_status(
    endpoint: str, timeout_s: float = 1.0, credentials: Credentials | None = None
) -> cluster_pb2.StatusResponse | None:
    """``Cluster.Status`` of one node, or ``None`` if it does not answer.
    ``credentials`` (operator or admin) default to the environment's."""
    creds = credentials if credentials is not None else Credentials.from_env()
    with creds.channel(endpoint) as ch:
        try:
            res: cluster_pb2.StatusResponse = cluster_pb2_grpc.ClusterServiceStub(ch).Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s, metadata=creds.metadata()
            )
        except grpc.RpcError:
            return None
        return res


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; return that value.
    Raises ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class NodeProcess:
    config: NodeConfig
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def endpoint(self) -> str:
        return self.config.self_member.grpc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """A cluster of node processes sharing ``base_dir``."""

    def __init__(
        self,
        base_dir: Path | str,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        grpc_ports: list[int] | None = None,
        raft_ports: list[int] | None = None,
        secret: str | None = None,
        base_config: NodeConfig | None = None,
        python: str = sys.executable,
        hosts: list[str] | None = None,
        exec_prefix: Callable[[str], list[str]] | None = None,
        node_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        detach: bool = False,
        secure: bool | None = None,
        mtls_ports: list[int] | None = None,
        admin_ttl_s: int = 24 * 3600,
        tls_hosts: Sequence[str] = (),
        metrics_ports: list[int] | None = None,
    ) -> None:
        """``hosts`` gives each node its own address (e.g. one per network
        namespace; ports then default to 7001/7101 on every host) and
        ``exec_prefix(node_id)`` the command that runs a node there (e.g.
        ``ip netns exec NAME``). ``node_overrides[node_id]`` replaces config
        fields of that node only (e.g. its ``peer_raft``). ``detach`` starts
        each node in its own session, so it outlives this process and its
        terminal. Every UDP node gets a static node key (``nN.key``, kept
        across restarts in ``base_dir``) and every member's public key, unless
        its config already names one. ``base_dir`` is made 0700 and every
        file written in it 0600. ``secure``: see the module docstring
        (``None``: secure unless ``base_config`` is ``insecure_grpc`` or
        brings its own TLS files). ``tls_hosts``: more names for the node
        certificates (addresses the nodes are also dialled at).
        ``metrics_ports``: each node serves ``/metrics`` on 127.0.0.1 at that
        port (default: free ports when the nodes run on this host's loopback,
        none with ``hosts``). Raises ``ConfigError`` if a resulting config is
        invalid."""
        self.base_dir = private_dir(Path(base_dir).resolve())
        self.size = size
        self.python = python
        self.exec_prefix = exec_prefix
        self.detach = detach
        on_loopback = hosts is None and _is_loopback_host(host)
        if hosts is not None:
            grpc_ports = grpc_ports or [DEFAULT_GRPC_BASE] * size
            raft_ports = raft_ports or [DEFAULT_RAFT_BASE] * size
        else:
            hosts = [host] * size
            if grpc_ports is None or raft_ports is None:
                ports = free_ports(2 * size, host)
                grpc_ports, raft_ports = ports[:size], ports[size:]
        members = tuple(
            Member(f"n{i + 1}", f"{hosts[i]}:{raft_ports[i]}", f"{hosts[i]}:{grpc_ports[i]}")
            for i in range(size)
        )
        base = base_config or NodeConfig.default()
        if secure is None:
            secure = not base.insecure_grpc and not base.tls_cert_file
        self.secure = secure
        self.pki: pkilib.ClusterPki | None = None
        self.mtls_endpoints: list[str] = []
        #: Credentials with the admin role (plaintext, no token, when not secure).
        self.credentials = Credentials()
        per_node: dict[str, dict[str, Any]] = {m.id: {} for m in members}
        if metrics_ports is None and on_loopback:
            metrics_ports = free_ports(size)
        #: ``host:port`` of each node's ``/metrics`` (empty: not served).
        self.metrics_endpoints = [f"127.0.0.1:{p}" for p in metrics_ports or []]
        for m, endpoint in zip(members, self.metrics_endpoints, strict=False):
            per_node[m.id]["metrics_listen"] = endpoint
        if secure:
            names = sorted({*hosts, "localhost", *tls_hosts})
            self.pki = self._make_pki([m.id for m in members], names)
            mtls_ports = mtls_ports or free_ports(size, host)
            # The mTLS port listens next to the node's gRPC listen address
            # (a node in a namespace may listen on another address than the
            # one it is reached at; the mTLS port is not forwarded there).
            listen_hosts = [
                str(
                    dict((node_overrides or {}).get(m.id, {})).get("grpc_listen") or m.grpc
                ).rsplit(":", 1)[0]
                for m in members
            ]
            self.mtls_endpoints = [f"{listen_hosts[i]}:{mtls_ports[i]}" for i in range(size)]
            base = replace(
                base,
                insecure_grpc=False,
                auth="required",
                client_ca_file=str(self.pki.ca_cert),
                token_key_file=str(self.pki.token_key),
            )
            for i, m in enumerate(members):
                per_node[m.id] |= {
                    "tls_cert_file": str(self.pki.nodes[m.id].cert),
                    "tls_key_file": str(self.pki.nodes[m.id].key),
                    "grpc_mtls_listen": self.mtls_endpoints[i],
                }
            self.credentials = Credentials(
                ca=str(self.pki.ca_cert),
                token=self.issue_token(Role.ADMIN, name="local-admin", ttl_s=admin_ttl_s),
            )
        secret = secret or base.cluster_secret or generate_secret()
        keys = {m.id: self._node_key(m.id) for m in members}
        public = {node_id: public_key_of(private) for node_id, private in keys.items()}
        self.nodes: dict[str, NodeProcess] = {}
        for m in members:
            cfg = replace(
                base,
                node_id=m.id,
                members=members,
                data_dir=str(self.base_dir / m.id),
                cluster_secret=secret,
            )
            cfg = replace(cfg, **per_node[m.id])
            cfg = replace(cfg, **dict((node_overrides or {}).get(m.id, {})))
            if cfg.transport == "udp" and not (cfg.node_key_file or cfg.peer_keys):
                cfg = replace(
                    cfg, node_key_file=str(self._key_path(m.id)), peer_keys=dict(public)
                )
            cfg.validate()
            path = self.base_dir / f"{m.id}.toml"
            self.nodes[m.id] = NodeProcess(cfg, path, self.base_dir / f"{m.id}.log")

    def _key_path(self, node_id: str) -> Path:
        return self.base_dir / f"{node_id}.key"

    def _node_key(self, node_id: str) -> str:
        """``node_id``'s private key: the one in ``base_dir`` if present (a
        restarted cluster), else a new one written there 0600."""
        path = self._key_path(node_id)
        if path.exists():
            return path.read_text(encoding="ascii").strip()
        private, _public = generate_key_pair()
        write_key_file(path, private)
        return private

    # ---- credentials ------------------------------------------------------

    def _make_pki(self, node_ids: list[str], hosts: list[str]) -> pkilib.ClusterPki:
        directory = self.base_dir / "pki"
        if (directory / "ca.pem").exists():  # a restart: keep the same CA and keys
            return pkilib.ClusterPki(
                directory / "ca.pem",
                directory / "ca.key",
                {
                    n: pkilib.CertPair(directory / f"{n}.pem", directory / f"{n}.key")
                    for n in node_ids
                },
                pkilib.CertPair(directory / "admin.pem", directory / "admin.key"),
                directory / "token.key",
            )
        return pkilib.make_cluster_pki(directory, node_ids, hosts)

    def issue_token(
        self,
        role: Role,
        *,
        device_ids: tuple[str, ...] = (),
        prefix: str = "",
        name: str = "",
        ttl_s: int = 3600,
        now_s: int | None = None,
    ) -> str:
        """A bearer token signed with this cluster's token key (secure clusters
        only; no RPC). ``now_s`` backdates it (e.g. to make an expired one)."""
        if self.pki is None:
            raise RuntimeError("issue_token: this cluster is not secure")
        keys = parse_token_keys(self.pki.token_key.read_text())
        kid, key = next(iter(keys.items()))
        now = int(time.time()) if now_s is None else now_s
        claims = auth_pb2.TokenClaims(
            role=auth_pb2.AuthRole.ValueType(int(role)),
            token_id=secrets.token_bytes(8),
            issued_at_s=now,
            expires_at_s=now + ttl_s,
            device_ids=list(device_ids),
            prefix=prefix,
            name=name,
        )
        return sign_token(claims, kid, key)

    def client_kwargs(
        self,
        role: Role = Role.ADMIN,
        *,
        device_ids: tuple[str, ...] = (),
        prefix: str = "",
        ttl_s: int = 3600,
    ) -> dict[str, Any]:
        """Keyword arguments for ``AsyncDeviceClient``/``DeviceClient``: a
        ``credentials`` object with the CA and a token of ``role`` (empty
        plaintext credentials when the cluster is not secure)."""
        if self.pki is None:
            return {"credentials": Credentials()}
        token = self.issue_token(role, device_ids=device_ids, prefix=prefix, ttl_s=ttl_s)
        return {"credentials": Credentials(ca=str(self.pki.ca_cert), token=token)}

    def client_env(self) -> dict[str, str]:
        """``RAFTSTATE_*`` variables that give the CLI admin credentials."""
        if self.pki is None:
            return {}
        return {
            "RAFTSTATE_CA": str(self.pki.ca_cert),
            "RAFTSTATE_TOKEN": str(self.credentials.token),
        }

    # ---- lifecycle --------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        return [n.endpoint for n in self.nodes.values()]

    def raft_address(self, node_id: str) -> str:
        """The address ``node_id``'s Raft transport listens on."""
        return self.nodes[node_id].config.raft_bind

    def start(self, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Start every node; with ``wait``, return once all agree on a leader."""
        for node_id in self.nodes:
            self.start_node(node_id)
        if wait:
            self.wait_for_leader(timeout_s)

    def start_node(self, node_id: str) -> NodeProcess:
        node = self.nodes[node_id]
        if node.running():
            return node
        # The config holds the cluster secret: private from its first byte.
        write_private(node.config_path, node.config.to_toml())
        log = open_private(node.log_path, "ab")
        try:
            prefix = self.exec_prefix(node_id) if self.exec_prefix is not None else []
            node.proc = subprocess.Popen(
                [
                    *prefix,
                    self.python,
                    "-m",
                    "raftstate",
                    "node",
                    "--config",
                    str(node.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=self.detach,
            )
        finally:
            log.close()
        return node

    def signal_node(self, node_id: str, sig: int) -> None:
        node = self.nodes[node_id]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node (a crash) and reap it."""
        node = self.nodes[node_id]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(timeout=10)

    def stop_node(self, node_id: str, timeout_s: float = 10.0) -> None:
        """SIGTERM the node, SIGKILL it if it has not exited by the deadline."""
        node = self.nodes[node_id]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.terminate()
            try:
                node.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)

    def restart_node(self, node_id: str, *, kill: bool = False) -> NodeProcess:
        (self.kill_node if kill else self.stop_node)(node_id)
        return self.start_node(node_id)

    def stop(self) -> None:
        """Stop every node. Idempotent."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
                node.proc.terminate()
        for node_id in self.nodes:
            self.stop_node(node_id)

    # ---- observation ------------------------------------------------------

    def status(self, node_id: str, timeout_s: float = 1.0) -> cluster_pb2.StatusResponse | None:
        return node_status(self.nodes[node_id].endpoint, timeout_s, self.credentials)

    def leader(self, among: list[str] | None = None) -> str | None:
        """The leader id if every running node in ``among`` (default: all
        running) reports the same leader, which itself says it leads."""
        ids = among or [n for n, p in self.nodes.items() if p.running()]
        seen = set()
        for node_id in ids:
            st = self.status(node_id)
            if st is None or not st.leader_id:
                return None
            seen.add(st.leader_id)
        if len(seen) != 1:
            return None
        leader = seen.pop()
        st = self.status(leader)
        return leader if st is not None and st.role == 3 else None

    def wait_for_leader(self, timeout_s: float = 30.0, among: list[str] | None = None) -> str:
        """Wait until the running nodes (or ``among``) agree on a leader.
        Raises ``RuntimeError`` if a node process died, ``TimeoutError``."""

        def agreed() -> str | None:
            self._check_alive()
            return self.leader(among)

        return str(wait_until(agreed, timeout_s, "a leader all running nodes agree on"))

    def wait_applied(self, node_id: str, index: int, timeout_s: float = 20.0) -> None:
        """Wait until ``node_id`` has applied at least ``index``."""

        def applied() -> bool:
            st = self.status(node_id)
            return st is not None and st.last_applied >= index

        wait_until(applied, timeout_s, f"{node_id} to apply index {index}")

    def _check_alive(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() not in (None, -9, -15):
                tail = node.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"node {node.node_id} exited with {node.proc.returncode}; log tail:\n{tail}"
                )

    def logs(self) -> Iterator[tuple[str, str]]:
        for node in self.nodes.values():
            if node.log_path.exists():
                yield node.node_id, node.log_path.read_text(errors="replace")


@contextmanager
def running_cluster(base_dir: Path, size: int = 3, **kwargs: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(base_dir, size, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
