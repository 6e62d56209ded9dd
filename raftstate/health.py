"""The standard ``grpc.health.v1.Health`` service, per service and with ``List``.

Theory of operation
-------------------
Every service the node serves has its own status, and ``""`` (the server
as a whole) has one too. :func:`service_health` is the rule, pure:

* ``""``, ``raftstate.v1.ClusterService``, ``grpc.health.v1.Health`` and
  ``grpc.reflection.v1alpha.ServerReflection``: SERVING while the process
  serves (``ClusterService.Status`` answers without a leader: it is how an
  operator finds out why there is none);
* ``raftstate.v1.DeviceStateService`` and ``raftstate.v1.AuthService`` (writes and
  linearizable reads, token revocation: all go through the Raft log):
  SERVING only while this node can get work committed (:func:`can_commit`:
  it knows a leader that it is connected to, or is the leader, and reaches
  a majority of the voters counting itself), its Raft ticks succeed and it
  is not catching up after lost data; NOT_SERVING otherwise. (pysyncobj
  keeps a follower's last leader while no election can start, e.g. when
  every peer is gone, so "knows a leader" alone would stay SERVING.)

:func:`track_health` applies the rule every ``period_s`` and on shutdown
:meth:`HealthService.enter_graceful_shutdown` turns everything NOT_SERVING
(so load balancers stop sending before the port closes). ``Check`` of a
name the node does not serve answers NOT_FOUND; ``Watch`` of one answers
SERVICE_UNKNOWN until it exists (the gRPC health protocol). ``List``
returns every status at once; the set of services is fixed and small, so
the RESOURCE_EXHAUSTED the protocol allows for too many never happens.

Health is public (no credential needed), like every health endpoint a
load balancer or orchestrator probes (raftstate/authz.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Services whose work goes through the Raft log.
CONSENSUS_SERVICES = frozenset({"raftstate.v1.DeviceStateService", "raftstate.v1.AuthService"})


def can_commit(
    leader: str | None, connected: Iterable[str], self_address: str, voters: int
) -> bool:
    """Whether a node can get an entry committed: it knows a ``leader``
    (Raft address) that is itself or among its ``connected`` peers, and
    itself plus its connected peers are a majority of ``voters``."""
    peers = frozenset(connected) - {self_address}
    if leader is None or (leader != self_address and leader not in peers):
        return False
    return 2 * (len(peers) + 1) > voters


def service_health(service: str, *, can_commit: bool, problem: str | None) -> int:
    """The status of ``service`` (a full name, ``""`` for the server) on a
    node that can or cannot commit (:func:`can_commit`) and has ``problem``
    (or ``None``)."""
    if service in CONSENSUS_SERVICES and (not can_commit or problem):
        return int(NOT_SERVING)
    return int(SERVING)


class HealthService(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio's asyncio health servicer plus ``List``. Event-loop only."""

    async def List(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status (module docstring)."""
        response = health_pb2.HealthListResponse()
        for service, status in list(self._server_status.items()):
            response.statuses[service].status = status
        return response

    def statuses(self) -> dict[str, int]:
        """A copy of the current statuses (for tests and ``/metrics``)."""
        return {k: int(v) for k, v in self._server_status.items()}


async def track_health(
    raft: Any, health: HealthService, services: Iterable[str], period_s: float = 0.2
) -> None:
    """Keep ``health`` current for ``""`` and each of ``services`` (full
    names) from ``raft`` (a :class:`~raftstate.raftnode.RaftNode`), every
    ``period_s`` seconds, until cancelled. A status is set only when it
    changes (so ``Watch`` streams see changes only)."""
    names = ["", *services]
    last: dict[str, int] = {}
    me, voters = raft.cfg.self_member.raft, len(raft.cfg.members)
    while True:
        st = raft.status()
        commit = can_commit(st.leader_raft_address, st.connected, me, voters)
        problem = raft.health_problem()
        for name in names:
            status = service_health(name, can_commit=commit, problem=problem)
            if last.get(name) != status:
                await health.set(name, status)
                last[name] = status
        await asyncio.sleep(period_s)


__all__ = [
    "CONSENSUS_SERVICES",
    "HealthService",
    "can_commit",
    "service_health",
    "track_health",
]
