"""``raftstate status``: every node's view of the cluster, and its links.

One ``Cluster.Status`` call per configured endpoint; a node that does not
answer is a row saying so. The links table shows each node's view of each
peer (UDP transport): path, RTT, loss, retransmissions, sessions and paths
built; RTT and loss are ``-`` while the link has measured nothing (two
followers exchange no Raft traffic), never a made-up zero or the loss prior.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from raftstate.cli.words import plural
from raftstate.errors import RaftStateError


def status_main(args: argparse.Namespace) -> int:
    """``raftstate status``: every endpoint's Status, as a table or JSON.
    Returns 0 when at least one node answers and all that answer agree on
    a leader, else 1."""
    from raftstate.sdk import DeviceClient

    with DeviceClient(
        args.endpoints, deadline_s=args.deadline, credentials=args.credentials
    ) as client:
        rows = []
        for endpoint in client._client.endpoints:  # noqa: SLF001 - listing configured endpoints
            try:
                st = client.status(endpoint)
            except RaftStateError as err:
                rows.append({"endpoint": endpoint, "error": err.message})
                continue
            rows.append({"endpoint": endpoint, **asdict(st)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'endpoint':<22} {'node':<6} {'role':<10} {'term':>5} {'commit':>8} "
        f"{'applied':>8} {'revision':>9} {'devices':>8} leader"
    )
    healthy = 0
    for r in rows:
        if "error" in r:
            print(f"{r['endpoint']:<22} unreachable: {r['error']}")
            continue
        healthy += 1
        print(
            f"{r['endpoint']:<22} {r['node_id']:<6} {r['role']:<10} {r['term']:>5} "
            f"{r['commit_index']:>8} {r['last_applied']:>8} {r['revision']:>9} "
            f"{r['devices']:>8} {r['leader_id'] or '-'}"
        )
    _print_integrity(rows)
    _print_links(rows)
    leaders = {r.get("leader_id") for r in rows if "error" not in r}
    leader = leaders.pop() if len(leaders) == 1 else ""
    print(f"{healthy}/{plural(len(rows), 'node')} answering; leader: {leader or 'none agreed'}")
    return 0 if healthy and leader else 1


def _print_integrity(rows: list[dict[str, Any]]) -> None:
    """Failed Raft ticks and catch-up after lost data, per node (if any)."""
    for r in rows:
        if r.get("tick_failures"):
            print(
                f"{r['node_id']}: {r['tick_failures']} failed Raft ticks; "
                f"last: {r['last_tick_error']}"
            )
        if r.get("catching_up"):
            print(f"{r['node_id']}: catching up after lost data (not voting until caught up)")


def _print_links(rows: list[dict[str, Any]]) -> None:
    """Per-peer transport links as each node sees them (UDP transport only)."""
    links = [
        (r["node_id"], m)
        for r in rows
        if "error" not in r
        for m in r["members"]
        if m["path"] and m["node_id"] != r["node_id"]
    ]
    if not links:
        return
    print(
        f"\n{'link':<16} {'path':<7} {'up':<3} {'rtt ms':>7} {'loss':>6} {'retx':>7} "
        f"{'sessions':>8} {'paths':>5}  resent/sent (leader)"
    )
    for src, m in links:
        print(
            f"{src + ' -> ' + m['node_id']:<16} {m['path']:<7} "
            f"{'yes' if m['connected'] else 'no':<3} {_measured(m['rtt_ms'], '.2f'):>7} "
            f"{_measured(m['loss_rate'], '.1%'):>6} {m['retransmissions']:>7} {m['sessions']:>8} "
            f"{m['paths']:>5}  "
            + (f"{m['entries_resent']}/{m['entries_sent']}" if int(m["entries_sent"]) else "-")
        )
    for r in rows:
        drops = r.get("transport_drops") or {}
        if drops:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()))
            print(f"{r['node_id']}: dropped datagrams: {counts}")
    print()


def _measured(value: float | None, spec: str) -> str:
    """A link estimate, or ``-`` when the link has not measured it (idle)."""
    return "-" if value is None else format(value, spec)


__all__ = ["status_main"]
