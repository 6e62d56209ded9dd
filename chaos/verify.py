"""The one shared verifier every fault test and chaos run ends in.

1. **Durability**: every acknowledged heartbeat is present on every node (the
   stored seq is that seq or newer).
2. **Agreement**: once every node has applied the same index, all nodes hold
   exactly the same device table (compared record by record).
3. **Linearizability**: the recorded history passes :func:`chaos.check`.

It reads each node directly (SERIALIZABLE, every page) after waiting, with a
deadline, until every node has applied the leader's commit index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from chaos.history import History
from chaos.linearizability import CheckResult, check
from raftstate.cli.words import plural
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import cluster_pb2, cluster_pb2_grpc, device_pb2, device_pb2_grpc

Record = tuple[int, tuple[tuple[str, str], ...], int, int]


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    problems: tuple[str, ...]
    lin: CheckResult | None
    applied_index: int
    devices: int
    notes: tuple[str, ...] = field(default=())

    def explain(self) -> str:
        lines = [
            f"verifier: {'OK' if self.ok else 'FAILED'} at applied index "
            f"{self.applied_index}, {plural(self.devices, 'device')}"
        ]
        lines += [f"  - {p}" for p in self.problems]
        if self.lin is not None and not self.lin.ok:
            lines.append(self.lin.explain())
        return "\n".join(lines)


def node_table(endpoint: str, prefix: str = "", timeout_s: float = 5.0) -> dict[str, Record]:
    """device_id -> (seq, reported, revision, heartbeats) as exactly this node
    holds them (SERIALIZABLE: answered from its own table), every page."""
    out: dict[str, Record] = {}
    token = ""
    creds = Credentials.from_env()  # a secure cluster: RAFTSTATE_CA + an operator token
    with creds.channel(endpoint) as ch:
        stub = device_pb2_grpc.DeviceStateServiceStub(ch)
        while True:
            res = stub.ListDevices(
                device_pb2.ListDevicesRequest(
                    prefix=prefix,
                    page_size=200,  # 200 devices of 8 KiB stay under 4 MB
                    page_token=token,
                    consistency=device_pb2.CONSISTENCY_SERIALIZABLE,
                ),
                timeout=timeout_s,
                metadata=creds.metadata(),
            )
            for d in res.devices:
                out[d.device_id] = (
                    d.seq,
                    tuple(sorted(d.reported.items())),
                    d.revision,
                    d.heartbeats,
                )
            token = res.next_page_token
            if not token:
                return out


def _status(endpoint: str) -> cluster_pb2.StatusResponse | None:
    creds = Credentials.from_env()
    with creds.channel(endpoint) as ch:
        try:
            res: cluster_pb2.StatusResponse = cluster_pb2_grpc.ClusterServiceStub(ch).Status(
                cluster_pb2.StatusRequest(), timeout=2, metadata=creds.metadata()
            )
        except grpc.RpcError:
            return None
        return res


def wait_converged(endpoints: list[str], timeout_s: float = 30.0) -> int:
    """Wait until all nodes agree on a leader and have applied its commit
    index; return that index. Raises ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [_status(e) for e in endpoints]
        if all(s is not None for s in statuses):
            leaders = {s.leader_id for s in statuses if s is not None}
            leader = next((s for s in statuses if s is not None and s.role == 3), None)
            if (
                len(leaders) == 1
                and leader is not None
                and all(s is not None and s.last_applied >= leader.commit_index for s in statuses)
            ):
                return leader.commit_index
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nodes did not converge within {timeout_s}s: {statuses}")
        time.sleep(0.05)


def verify(
    endpoints: list[str],
    acked: dict[str, int],
    history: History | None,
    *,
    timeout_s: float = 30.0,
) -> Verdict:
    """Run all three checks against the running nodes at ``endpoints``."""
    index = wait_converged(endpoints, timeout_s)
    tables = {e: node_table(e) for e in endpoints}
    problems: list[str] = []
    for endpoint, table in tables.items():
        lost = {d: s for d, s in acked.items() if table.get(d, (0,))[0] < s}
        if lost:
            problems.append(
                f"{endpoint} lost {len(lost)} acknowledged heartbeats, e.g. "
                f"{sorted(lost.items())[:3]}"
            )
    first_endpoint, first = next(iter(tables.items()))
    for endpoint, table in tables.items():
        if table != first:
            diff = sorted(k for k in set(table) | set(first) if table.get(k) != first.get(k))
            problems.append(
                f"{endpoint} differs from {first_endpoint} on {plural(len(diff), 'device')}, "
                f"e.g. {diff[:3]}"
            )
    lin = check(history) if history is not None else None
    if lin is not None and not lin.ok:
        problems.append(f"history is not linearizable ({lin.verdict.name})")
    return Verdict(not problems, tuple(problems), lin, index, len(first))
