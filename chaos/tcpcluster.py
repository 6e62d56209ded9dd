"""TcpChaosCluster: pysyncobj's TCP transport with one TCP proxy per node pair.

Theory of operation
-------------------
pysyncobj keeps one TCP connection per pair of nodes. Its rule
(``TCPTransport._shouldConnect``): node X dials peer Y iff X's own address
sorts after the address X lists for Y, and Y recognises X by the address X
announces, which must be X's entry in Y's member list. Every node runs with
its *own* member list (``node_overrides``), so one proxy can sit on each pair:

1. node ``n{k}`` gets the identity address ``127.1.0.{k}:{its raft port}``
   (loopback, never dialled by anyone; ``raft_listen`` is its real socket).
   These sort after every ``127.0.0.1`` proxy address and by node number.
2. For each pair ``j < i``, one proxy ``raft_n{i}_to_n{j}`` forwards to
   ``n{j}``'s real Raft port. ``n{i}`` lists ``n{j}`` at that proxy, so it
   dials through it; ``n{j}`` lists ``n{i}`` at ``n{i}``'s identity, so it
   does not dial and recognises the incoming connection.
3. A pair proxy carries both directions of that pair only, so
   :meth:`~chaos.harness.ChaosCluster.isolate` (disable every proxy touching
   a node) cuts one node off exactly as on UDP, and ``heal`` reconnects.

A byte stream can be delayed (``latency``, ``bandwidth``) but never dropped,
duplicated or reordered: :meth:`TcpChaosCluster.apply` applies what it can,
to both streams of every pair proxy (so the RTT equals the UDP links'), and
lists the rest in :attr:`TcpChaosCluster.skipped`. Loss on TCP needs a
layer-3 emulator (``[wanlab]``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from toxiproxy import Toxiproxy  # type: ignore[import-untyped]

from chaos.harness import ChaosCluster
from chaos.profiles import Profile
from cluster.local import LocalCluster, free_ports
from raftstate.config import Member, NodeConfig

__all__ = ["TCP_TOXICS", "TcpChaosCluster", "new_cluster"]

#: The toxics a TCP proxy can apply to node links.
TCP_TOXICS = frozenset({"latency", "bandwidth"})
#: The identity-address scheme sorts correctly for single-digit node numbers.
_MAX_NODES = 9


class TcpChaosCluster(ChaosCluster):
    """``size`` (≤ 9) TCP-transport nodes; node links through one TCP proxy
    per pair, device links through one TCP proxy per node. Not thread-safe."""

    skipped: tuple[str, ...] = ()

    def __init__(self, base_dir: Path | str, size: int = 3, **kwargs: Any) -> None:
        if not 1 <= size <= _MAX_NODES:
            raise ValueError(f"size: TcpChaosCluster supports 1..{_MAX_NODES} nodes")
        super().__init__(base_dir, size, **kwargs)
        self.base_config = dataclasses.replace(self.base_config, transport="tcp")

    def _start(self, timeout_s: float) -> None:
        api_host, _, api_port = self.server.start().rpartition(":")
        Toxiproxy().update_api_consumer(api_host, int(api_port))
        server = Toxiproxy()
        ids = [f"n{i + 1}" for i in range(self.size)]
        ports = free_ports(2 * self.size, self.host)
        grpc_ports, raft_ports = ports[: self.size], ports[self.size :]
        grpc = {nid: f"{self.host}:{p}" for nid, p in zip(ids, grpc_ports, strict=True)}
        real = {nid: f"{self.host}:{p}" for nid, p in zip(ids, raft_ports, strict=True)}
        identity = {nid: f"127.1.0.{i + 1}:{raft_ports[i]}" for i, nid in enumerate(ids)}
        for nid in ids:
            self.device_proxies[nid] = server.create(
                upstream=grpc[nid], name=f"device_{nid}", listen=f"{self.host}:0"
            )
        for i, dialer in enumerate(ids):
            for dialled in ids[:i]:
                self.node_proxies[(dialer, dialled)] = server.create(
                    upstream=real[dialled],
                    name=f"raft_{dialer}_to_{dialled}",
                    listen=f"{self.host}:0",
                )
        overrides: dict[str, dict[str, Any]] = {}
        for i, me in enumerate(ids):
            members = []
            for j, peer in enumerate(ids):
                if j < i:
                    raft = self.node_proxies[(me, peer)].listen
                else:  # myself, or a peer that dials me and announces its identity
                    raft = identity[peer]
                members.append(Member(peer, raft, grpc[peer]))
            overrides[me] = {"members": tuple(members), "raft_listen": real[me]}
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

    def apply(self, profile: Profile) -> None:
        """Replace every proxy's toxics with the ``latency``/``bandwidth``
        toxics of ``profile``, on both streams; the others go to :attr:`skipped`."""
        for proxy in [*self.device_proxies.values(), *self.node_proxies.values()]:
            for name in self._toxic_names.pop(proxy.name, []):
                proxy.destroy_toxic(name)
        skipped = []
        for proxies, toxics in (
            (self.device_proxies.values(), profile.device),
            (self.node_proxies.values(), profile.node),
        ):
            for toxic in toxics:
                if toxic.type not in TCP_TOXICS:
                    skipped.append(toxic.type)
                    continue
                for proxy in proxies:
                    for stream in ("upstream", "downstream"):
                        self._add_toxic(proxy, toxic.type, stream, toxic.attribute_map())
        self.skipped = tuple(sorted(set(skipped)))


def new_cluster(
    base_dir: Path, transport: str, base_config: NodeConfig | None = None
) -> ChaosCluster:
    """A not yet started 3-node chaos cluster for ``transport`` (``udp`` or ``tcp``)."""
    if transport == "tcp":
        return TcpChaosCluster(base_dir, 3, base_config=base_config)
    if transport == "udp":
        return ChaosCluster(base_dir, 3, base_config=base_config)
    raise ValueError(f"transport: {transport!r} is not udp or tcp")
