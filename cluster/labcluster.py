"""LabCluster: a raftstate cluster across the WAN lab, one node per site.

Why: ``raftstate lab up``, the WAN-lab tests and benchmarks all need the same
thing: a :class:`~cluster.natlab.NatLab` (with its WAN), a node in each
site's node namespace, reachable from the root namespace through a port
forward on its router, and, for ICE, a rendezvous in the public namespace.

Theory of operation:

1. :meth:`LabCluster.up` builds the lab, applies the profile (if any; so the
   cluster forms under it) and forwards TCP :data:`GRPC_PORT` on every router
   to its node. Every member's addresses are its router's public address:
   ``router_public_ip(i):7001`` (gRPC) and ``:7101`` (Raft). A node binds
   its private ``node_ip(i)``.
2. ``transport="udp"`` (default): ``reach = "ice"``. The rendezvous runs in
   the public namespace on ``public_ip:7400``; nodes use coturn for STUN and
   (as fallback) TURN. ``transport="tcp"``: pysyncobj's TCP transport with
   TCP :data:`RAFT_PORT` forwarded on every router too, so peers dial each
   other's router public address through both NATs (a TCP baseline that needs
   port forwards, which ICE does not).
3. It returns once the nodes agree on a leader. Every process it starts is
   listed by :meth:`processes` (pid and start time, so a later teardown never
   signals a recycled pid). With ``detach`` the lab survives this process.
4. :meth:`down` stops the nodes and the rendezvous, then the lab.
   :func:`teardown` does the same from a :class:`LabState` alone, in
   another process, and after a crashed ``up``: it signals the recorded
   processes first, then ``NatLab.down()`` kills whatever else runs in the
   lab's namespaces and removes them.

Not thread-safe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.local import LocalCluster
from cluster.natlab import NatKind, NatLab
from cluster.netns import LabError
from raftstate.config import NodeConfig
from raftstate.secretcheck import generate_secret

__all__ = [
    "GRPC_PORT",
    "RAFT_PORT",
    "RENDEZVOUS_PORT",
    "LabCluster",
    "LabProcess",
    "LabState",
    "teardown",
]

GRPC_PORT = 7001
RAFT_PORT = 7101
RENDEZVOUS_PORT = 7400
TRANSPORTS = ("udp", "tcp")
_READY_TIMEOUT_S = 10.0
_TERM_DEADLINE_S = 5.0


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``
    field 22), or ``None`` if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[19])


@dataclass(frozen=True, slots=True)
class LabProcess:
    """A process the lab started: ``name`` (``wan``, ``coturn``, ``rendezvous``,
    ``n1``...), its pid and its start time (``/proc`` clock ticks)."""

    name: str
    pid: int
    start_ticks: int | None

    @classmethod
    def of(cls, name: str, pid: int) -> LabProcess:
        return cls(name, pid, _start_ticks(pid))

    def alive(self) -> bool:
        """Whether this very process still runs (not a recycled pid)."""
        ticks = _start_ticks(self.pid)
        return ticks is not None and ticks == self.start_ticks

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


@dataclass(frozen=True, slots=True)
class LabState:
    """What a detached lab needs to be found and torn down again (JSON)."""

    prefix: str
    kinds: tuple[str, ...]
    transport: str
    profile: str | None = None
    subnet: str = ""
    secret_file: str = ""
    wan_control_port: int | None = None
    endpoints: tuple[str, ...] = ()
    sites: tuple[dict[str, Any], ...] = ()
    processes: tuple[LabProcess, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a malformed state."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("lab state must be a JSON object")
        raw["kinds"] = tuple(raw["kinds"])
        raw["endpoints"] = tuple(raw.get("endpoints", ()))
        raw["sites"] = tuple(raw.get("sites", ()))
        raw["processes"] = tuple(LabProcess(**p) for p in raw.get("processes", ()))
        return cls(**raw)

    def save(self, path: Path) -> None:
        """Write atomically, readable by root only (it names the secret's file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.to_json())
        tmp.replace(path)


def teardown(state: LabState) -> list[str]:
    """Stop a lab recorded in ``state``: SIGTERM its processes (nodes first,
    the emulator last), SIGKILL those still running after 5 s, then remove
    the namespaces and links (``NatLab.down()``). Idempotent. Returns the
    names of the processes that were still running. Raises ``LabError`` if
    something of the lab is left behind."""
    running = [p for p in state.processes if p.alive()]
    for p in running:
        p.signal(signal.SIGCONT)
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + _TERM_DEADLINE_S
    while any(p.alive() for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in running:
        p.signal(signal.SIGKILL)
    NatLab(state.kinds, state.prefix, detach=True).down()
    return [p.name for p in running]


class LabCluster:
    """One raftstate node per site of a WAN lab; see the module doc.

    ``base_config`` supplies timers and the like (default
    ``NodeConfig.default()``); the lab sets members, addresses, transport and
    ICE settings. Node files (configs, data, logs) live in ``base_dir``."""

    def __init__(
        self,
        base_dir: str | Path,
        kinds: Sequence[NatKind | str] = ("cone", "cone", "symmetric"),
        *,
        transport: str = "udp",
        profile: str | None = None,
        pub_legs: str = "split",
        prefix: str | None = None,
        detach: bool = False,
        base_config: NodeConfig | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.base_dir = Path(base_dir).resolve()
        self.transport = transport
        self.profile = profile
        self.pub_legs = pub_legs
        self.detach = detach
        self.base_config = base_config or NodeConfig.default()
        self.lab = NatLab(kinds, prefix, detach=detach, workdir=self.base_dir / "lab")
        self.cluster: LocalCluster | None = None
        self.secret = generate_secret()
        #: The rendezvous credential: the rendezvous never gets ``secret``.
        self.rendezvous_secret = generate_secret()
        self._rendezvous: subprocess.Popen[bytes] | None = None
        self._progress = progress or (lambda _line: None)
        self._saved_env: dict[str, str | None] = {}

    # --- names ---------------------------------------------------------------

    @property
    def secret_file(self) -> Path:
        return self.base_dir / "secret"

    @property
    def rendezvous_address(self) -> str:
        return f"{self.lab.public_ip}:{RENDEZVOUS_PORT}"

    @property
    def endpoints(self) -> list[str]:
        """Each node's gRPC address as the root namespace reaches it."""
        return [f"{self.lab.router_public_ip(i)}:{GRPC_PORT}" for i in self._sites()]

    def node_id(self, i: int) -> str:
        return f"n{i}"

    # --- lifecycle -----------------------------------------------------------

    def up(self, timeout_s: float = 60.0) -> str:
        """Build everything and wait for a leader; return its id. Raises
        ``LabError`` (lab), ``RuntimeError`` (a process died) or
        ``TimeoutError``, after undoing what was built."""
        try:
            return self._up(timeout_s)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop the nodes, the rendezvous and the lab. Idempotent."""
        if self.cluster is not None:
            self.cluster.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        if self._rendezvous is not None:
            if self._rendezvous.poll() is None:
                self._rendezvous.terminate()
                try:
                    self._rendezvous.wait(timeout=_TERM_DEADLINE_S)
                except subprocess.TimeoutExpired:
                    self._rendezvous.kill()
                    self._rendezvous.wait()
            self._rendezvous = None
        self.lab.down()

    def processes(self) -> list[LabProcess]:
        """Every process started so far, nodes first, the emulator last."""
        out = []
        if self.cluster is not None:
            out += [LabProcess.of(n.node_id, n.pid) for n in self.cluster.nodes.values() if n.pid]
        if self._rendezvous is not None:
            out.append(LabProcess.of("rendezvous", self._rendezvous.pid))
        if self.lab.turnserver_pid is not None:
            out.append(LabProcess.of("coturn", self.lab.turnserver_pid))
        if self.lab.wan_pid is not None:
            out.append(LabProcess.of("wan", self.lab.wan_pid))
        return out

    def state(self) -> LabState:
        """What :func:`teardown` and ``raftstate lab`` need, as of now."""
        sites = tuple(
            {
                "site": i,
                "kind": str(self.lab.kinds[i - 1]),
                "router_netns": self.lab.router_netns(i),
                "node_netns": self.lab.netns(i),
                "device_netns": self.lab.device_netns(i),
                "router_public_ip": self.lab.router_public_ip(i),
                "node_ip": self.lab.node_ip(i),
                "device_ip": self.lab.device_ip(i),
                "grpc": f"{self.lab.router_public_ip(i)}:{GRPC_PORT}",
                "grpc_local": f"{self.lab.node_ip(i)}:{GRPC_PORT}",
            }
            for i in self._sites()
        )
        return LabState(
            prefix=self.lab.prefix,
            kinds=tuple(str(k) for k in self.lab.kinds),
            transport=self.transport,
            profile=self.profile,
            subnet=str(self.lab.subnet),
            secret_file=str(self.secret_file),
            wan_control_port=self.lab.wan_control_port,
            endpoints=tuple(self.endpoints),
            sites=sites,
            processes=tuple(self.processes()),
        )

    # --- internals -----------------------------------------------------------

    def _sites(self) -> range:
        return range(1, self.lab.n_sites + 1)

    def _up(self, timeout_s: float) -> str:
        lab = self.lab
        self.base_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.secret + "\n")
        started = time.monotonic()
        lab.up()
        rt = "real-time" if lab.wan_realtime else "normal (could not get SCHED_FIFO)"
        self._progress(
            f"lab {lab.prefix} up in {time.monotonic() - started:.1f}s: {lab.n_sites} sites "
            f"({', '.join(map(str, lab.kinds))}) in {lab.subnet}; WAN emulator priority {rt}"
        )
        if self.profile is not None:
            lab.impair_profile(self.profile, pub_legs=self.pub_legs)
            self._progress(f"WAN profile {self.profile} applied")
        ports = [GRPC_PORT] + ([RAFT_PORT] if self.transport == "tcp" else [])
        for i in self._sites():
            for port in ports:
                lab.port_forward(i, "tcp", port)
        if self.transport == "udp":
            self._start_rendezvous()
            self._progress(f"rendezvous listening on {self.rendezvous_address}")
        self.cluster = LocalCluster(
            self.base_dir / "nodes", lab.n_sites, base_config=self._node_config(),
            secret=self.secret, hosts=[lab.router_public_ip(i) for i in self._sites()],
            exec_prefix=lambda node_id: lab.exec_prefix(int(node_id[1:])),
            node_overrides={
                self.node_id(i): {"grpc_listen": f"{lab.node_ip(i)}:{GRPC_PORT}",
                                  "raft_listen": f"{lab.node_ip(i)}:{RAFT_PORT}"}
                for i in self._sites()
            },
            detach=self.detach,
            tls_hosts=[lab.node_ip(i) for i in self._sites()],
            secure=True,  # never loopback: gRPC is TLS with auth
        )  # fmt: skip
        # This orchestrating process and the load processes it starts read
        # the admin credentials from the environment (sdk/credentials.py);
        # down() puts the previous values back.
        env = self.cluster.client_env()
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        started = time.monotonic()
        self._progress(f"starting {lab.n_sites} nodes ({self._transport_label()})")
        self.cluster.start(timeout_s=timeout_s)
        leader = str(self.cluster.leader() or "")
        self._progress(f"leader {leader} elected in {time.monotonic() - started:.1f}s")
        return leader

    def _transport_label(self) -> str:
        if self.transport == "udp":
            return "UDP transport, ICE through the rendezvous, STUN then TURN"
        return "pysyncobj TCP, peers through router port forwards"

    def _node_config(self) -> NodeConfig:
        if self.transport == "tcp":
            return dataclasses.replace(self.base_config, transport="tcp", reach="static")
        lab = self.lab
        return dataclasses.replace(
            self.base_config, transport="udp", reach="ice",
            rendezvous=self.rendezvous_address, stun_server=lab.stun_address,
            turn_server=lab.stun_address, turn_username=lab.turn_username,
            turn_password=lab.turn_password, ice_connect_timeout_ms=3000,
            rendezvous_secret=self.rendezvous_secret,
        )  # fmt: skip

    def _start_rendezvous(self) -> None:
        log_path = self.base_dir / "rendezvous.log"
        argv = [*self.lab.public_exec_prefix(), sys.executable, "-m", "raftstate",
                "rendezvous", "--listen", self.rendezvous_address]  # fmt: skip
        env = {
            **os.environ,
            "RAFTSTATE_RENDEZVOUS_SECRET": self.rendezvous_secret,
            "PYTHONUNBUFFERED": "1",
        }
        with open(log_path, "wb") as log:
            self._rendezvous = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=self.detach,
            )  # fmt: skip
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while "rendezvous listening on" not in log_path.read_text(errors="replace"):
            code = self._rendezvous.poll()
            if code is not None or time.monotonic() >= deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                state = f"exited with status {code}" if code is not None else "did not start"
                raise LabError(f"the rendezvous {state}; its log says:\n{tail}")
            time.sleep(0.02)
