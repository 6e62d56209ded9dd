"""ChaosCluster: a UDP-transport LocalCluster whose every link goes through a proxy.

Theory of operation
-------------------
1. Start our Toxiproxy-compatible server (``python -m chaos.proxy`` on port 0)
   as a subprocess and point toxiproxy-python at it.
2. Choose the nodes' real gRPC and Raft ports, then create, through
   toxiproxy-python, one TCP proxy per node for devices (upstream: the node's
   gRPC address) and one UDP proxy per *directed* node pair (upstream: the
   receiving node's Raft address): ``size × (size - 1)`` of them.
3. Start a ``transport = "udp"`` LocalCluster in which node i's
   ``peer_raft[j]`` is the listen address of proxy i→j. The UDP transport
   recognises peers by their keys, not by source address, so i→j and j→i
   travel through different proxies and each direction gets its own toxics.
4. :meth:`ChaosCluster.apply` replaces the toxics with a profile's
   (:mod:`chaos.profiles`): device toxics on both streams of each TCP proxy,
   node toxics on the upstream stream of each UDP proxy (the only stream
   that carries anything, since replies take the reverse proxy).
   :meth:`isolate` disables (blackholes) every UDP proxy touching a node;
   :meth:`heal` enables them all again.

Devices use :attr:`endpoints` (the TCP proxies); observers and the verifier use
:attr:`node_endpoints` (the nodes' real gRPC addresses). Not thread-safe:
drive one ChaosCluster from one thread.
"""

from __future__ import annotations

import dataclasses
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

from toxiproxy import Toxiproxy  # type: ignore[import-untyped]
from toxiproxy.api import APIConsumer  # type: ignore[import-untyped]
from toxiproxy.proxy import Proxy  # type: ignore[import-untyped]

from chaos.profiles import Outage, Profile
from cluster.local import LocalCluster, free_ports
from raftstate.config import NodeConfig

__all__ = ["ChaosCluster", "ProxyServer"]

_READY_TIMEOUT_S = 15.0


class ProxyServer:
    """``python -m chaos.proxy`` as a subprocess on ``host``, port 0."""

    def __init__(self, host: str = "127.0.0.1", seed: int | None = None) -> None:
        self.host = host
        self.seed = seed
        self.address = ""
        self.output: list[str] = []
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        """Start and wait for the readiness line; return the API ``host:port``.
        Raises ``RuntimeError`` if it is not ready within 15 s."""
        cmd = [sys.executable, "-m", "chaos.proxy", "--host", self.host, "--port", "0"]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._proc = proc
        if proc.stdout is None:  # never: stdout=PIPE
            raise RuntimeError("chaos proxy has no stdout pipe")
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if not ready:
                continue
            line = proc.stdout.readline()
            self.output.append(line)
            if "listening on" in line:
                self.address = line.rsplit(" ", 1)[1].strip()
                # Keep draining so the server never blocks on a full pipe.
                threading.Thread(
                    target=self.output.extend, args=(proc.stdout,), daemon=True
                ).start()
                return self.address
            if not line and proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(
            f"chaos proxy did not report readiness within {_READY_TIMEOUT_S:.0f}s: "
            + "".join(self.output)[-2000:]
        )

    def stop(self) -> None:
        """Terminate (then kill) the server. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class ChaosCluster:
    """``size`` UDP-transport nodes behind TCP (device) and UDP (node) proxies."""

    def __init__(
        self,
        base_dir: Path | str,
        size: int = 3,
        *,
        base_config: NodeConfig | None = None,
        host: str = "127.0.0.1",
        seed: int | None = 1,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.size = size
        self.host = host
        self.base_config = dataclasses.replace(
            base_config or NodeConfig.for_tests(), transport="udp"
        )
        self.server = ProxyServer(host, seed)
        self.cluster: LocalCluster | None = None
        self.device_proxies: dict[str, Proxy] = {}
        #: (from node, to node) -> the UDP proxy carrying that direction.
        self.node_proxies: dict[tuple[str, str], Proxy] = {}
        self.isolated: set[str] = set()
        self._toxic_names: dict[str, list[str]] = {}

    # ---- lifecycle --------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the proxy server, create every proxy, start the nodes and wait
        for a leader. Raises ``RuntimeError``/``TimeoutError``; on failure
        everything already started is stopped."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        api_host, _, api_port = self.server.start().rpartition(":")
        Toxiproxy().update_api_consumer(api_host, int(api_port))
        ids = [f"n{i + 1}" for i in range(self.size)]
        ports = free_ports(2 * self.size, self.host)
        grpc_ports, raft_ports = ports[: self.size], ports[self.size :]
        grpc = {nid: f"{self.host}:{p}" for nid, p in zip(ids, grpc_ports, strict=True)}
        raft = {nid: f"{self.host}:{p}" for nid, p in zip(ids, raft_ports, strict=True)}
        server = Toxiproxy()
        for nid in ids:
            self.device_proxies[nid] = server.create(
                upstream=grpc[nid], name=f"device_{nid}", listen=f"{self.host}:0"
            )
        for src in ids:
            for dst in ids:
                if src != dst:
                    self.node_proxies[(src, dst)] = _create_udp_proxy(
                        f"raft_{src}_to_{dst}", f"{self.host}:0", raft[dst]
                    )
        overrides: dict[str, dict[str, Any]] = {
            src: {
                "peer_raft": {
                    dst: proxy.listen for (s, dst), proxy in self.node_proxies.items() if s == src
                }
            }
            for src in ids
        }
        self.cluster = LocalCluster(
            self.base_dir,
            self.size,
            host=self.host,
            grpc_ports=grpc_ports,
            raft_ports=raft_ports,
            base_config=self.base_config,
            node_overrides=overrides,
        )
        self.cluster.start(timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop the nodes, then the proxy server (which drops every proxy). Idempotent."""
        if self.cluster is not None:
            self.cluster.stop()
        self.server.stop()

    # ---- addresses ----------------------------------------------------------

    @property
    def nodes(self) -> LocalCluster:
        """The underlying LocalCluster (kill, restart, status). Raises
        ``RuntimeError`` before :meth:`start`."""
        if self.cluster is None:
            raise RuntimeError("ChaosCluster.start() has not run")
        return self.cluster

    @property
    def endpoints(self) -> list[str]:
        """The device proxies' listen addresses, in node order."""
        return [p.listen for p in self.device_proxies.values()]

    @property
    def node_endpoints(self) -> list[str]:
        """The nodes' real gRPC addresses (for observation and the verifier)."""
        return self.nodes.endpoints

    # ---- faults ---------------------------------------------------------------

    def apply(self, profile: Profile) -> None:
        """Replace every proxy's toxics with ``profile``'s. Isolation is kept."""
        for proxy in [*self.device_proxies.values(), *self.node_proxies.values()]:
            for name in self._toxic_names.pop(proxy.name, []):
                proxy.destroy_toxic(name)
        for proxy in self.device_proxies.values():
            for stream in ("upstream", "downstream"):
                for toxic in profile.device:
                    self._add_toxic(proxy, toxic.type, stream, toxic.attribute_map())
        for proxy in self.node_proxies.values():
            for toxic in profile.node:
                self._add_toxic(proxy, toxic.type, "upstream", toxic.attribute_map())

    def isolate(self, node_id: str) -> None:
        """Blackhole every node link to and from ``node_id`` (its device proxy
        stays up). Raises ``KeyError`` for an unknown node."""
        self.nodes.nodes[node_id]  # noqa: B018 - raise KeyError early
        for (src, dst), proxy in self.node_proxies.items():
            if node_id in (src, dst):
                proxy.disable()
        self.isolated.add(node_id)

    def heal(self) -> None:
        """Enable every node link again (toxics stay)."""
        for proxy in self.node_proxies.values():
            proxy.enable()
        self.isolated.clear()

    def resolve(self, selector: str, timeout_s: float = 30.0) -> str:
        """A node id for an outage's ``isolate``: itself, the current leader,
        or a follower of it. Raises ``TimeoutError`` if there is no leader."""
        if selector not in ("leader", "follower"):
            return selector
        leader = self.nodes.wait_for_leader(timeout_s)
        if selector == "leader":
            return leader
        return next(n for n in self.nodes.nodes if n != leader)

    def run_schedule(self, profile: Profile, stop: threading.Event | None = None) -> list[str]:
        """Play ``profile.schedule`` from now (blocking), healing after each
        outage; return the isolated node ids in order. ``stop`` ends it early
        (healed)."""
        stop = stop or threading.Event()
        start = time.monotonic()
        done: list[str] = []
        try:
            for outage in profile.schedule:
                if stop.wait(max(0.0, start + outage.at_s - time.monotonic())):
                    break
                done.append(self._outage(outage, stop))
        finally:
            self.heal()
        return done

    def _outage(self, outage: Outage, stop: threading.Event) -> str:
        node_id = self.resolve(outage.isolate)
        self.isolate(node_id)
        stop.wait(outage.duration_s)
        self.heal()
        return node_id

    def _add_toxic(
        self, proxy: Proxy, kind: str, stream: str, attributes: dict[str, float]
    ) -> None:
        name = f"{kind}_{stream}"
        # Toxiproxy's attributes are integers where they count ms, bytes or KB/s.
        attrs = {
            k: (v if k in ("loss_rate", "correlation", "probability") else int(v))
            for k, v in attributes.items()
        }
        proxy.add_toxic(name=name, type=kind, stream=stream, attributes=attrs)
        self._toxic_names.setdefault(proxy.name, []).append(name)


def _create_udp_proxy(name: str, listen: str, upstream: str) -> Proxy:
    """toxiproxy-python's ``create`` has no ``protocol``; post it through its
    API consumer and wrap the answer in its ``Proxy`` type."""
    info = APIConsumer.post(
        "/proxies",
        json={"name": name, "listen": listen, "upstream": upstream, "protocol": "udp"},
    ).json()
    return Proxy(**info)
