"""Heartbeat commit latency of a 3-node Raft message pattern over the
reliable link, in virtual time on the simulated network (deterministic).

Theory of operation
-------------------
A model of what the lab bench measures, without CPU contention: three nodes
(L leader, F1, F2), heartbeats at ``--rate`` spread over the three sites.

* At L: L sends an AppendEntries (ordered, ~250 B) to F1 and F2; each
  answers ``next_node_idx`` (~30 B); the heartbeat commits when the first
  answer is back at L.
* At a follower F: F forwards ``apply_command`` (~200 B) to L; L answers
  ``apply_command_response`` (~30 B) and sends the AppendEntries to both
  followers; with follower commit the heartbeat is done when F holds the
  entry (its AppendEntries arrived).

Messages of the kinds in ``wirecodec.UNORDERED_KINDS`` go unordered when the
link supports it (``ReliableLink.send(..., ordered=False)``); against an older
tree (no such argument) everything goes ordered, so the same script measures
main and a branch: ``PYTHONPATH=<tree> python -m bench.linksim``. Reported:
latency percentiles (one node-link round trip is the floor for a follower's
device), datagrams and wire bytes per heartbeat (each datagram plus 34 bytes
of AEAD envelope and 28 of IPv4/UDP header), and the CPU seconds the run took
(link code plus the simulator: a relative figure only). ``--state-bytes``
adds each heartbeat's reported state to its forward and AppendEntries (the
lab bench's draw), so the tail of multi-frame messages shows here too. JSON
on stdout, a table of medians over the seeds on stderr.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import statistics
import sys
import time
from typing import Any

from raftstate.transport import LinkProfile, SimLinkHost, SimNetwork
from raftstate.transport.linkconfig import LinkConfig

#: Per datagram on the wire besides the link payload: AEAD envelope + IPv4/UDP.
OVERHEAD = 34 + 28
PROFILES: dict[str, dict[str, Any]] = {
    # chaos/profiles.toml node links, per direction
    "lan": {"delay": 0.0001},
    "weak": {"delay": 0.030, "jitter": 0.010, "loss": 0.03, "loss_correlation": 0.25,
             "reorder": 0.05, "reorder_delay": 0.020},
    "bad": {"delay": 0.075, "jitter": 0.025, "loss": 0.10, "loss_correlation": 0.25,
            "duplicate": 0.02, "reorder": 0.02, "reorder_delay": 0.030},
}  # fmt: skip


def state_size(i: int, state_bytes: int) -> int:
    """Heartbeat ``i``'s reported-state size: 0 without ``state_bytes``, else
    uniform over 0..``state_bytes``, seeded by ``i`` (the same draw as
    ``raftstate lab bench --state-bytes``, chaos.labbench.state_of)."""
    return random.Random(i).randint(0, state_bytes) if state_bytes > 0 else 0


def run(
    profile: str, heartbeats: int, rate: float, seed: int, ordered: bool = False,
    state_bytes: int = 0, congestion_control: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One run; see the module doc. ``ordered``: send every message ordered.
    ``state_bytes``: each heartbeat's forward and AppendEntries also carry
    its reported state, 0..``state_bytes`` bytes (:func:`state_size`).
    ``congestion_control``: the links' bulk controller (a node's
    ``udp_congestion_control``, off by default)."""
    net = SimNetwork(random.Random(seed), default=LinkProfile(**PROFILES[profile]))
    can_unorder = not ordered and "ordered" in inspect.signature(SimLinkHost.send).parameters
    wire = {"bytes": 0, "datagrams": 0}
    started: dict[int, float] = {}
    done: dict[int, float] = {}

    def send(host: SimLinkHost, peer: str, body: bytes, unordered: bool) -> None:
        if unordered and can_unorder:
            host.send(peer, body, ordered=False)
        else:
            host.send(peer, body)

    def finish(i: int) -> None:
        if i not in done:
            done[i] = net.now

    def at_leader(src: str, m: bytes) -> None:
        i = int.from_bytes(m[1:5], "big")
        if m[:1] == b"R":  # next_node_idx
            if i % 3 == 0:
                finish(i)
        elif m[:1] == b"C":  # apply_command from src
            send(hosts["L"], src, b"P" + m[1:5] + bytes(25), True)
            append(i)

    def at_follower(name: str) -> Any:
        def handler(src: str, m: bytes) -> None:
            i = int.from_bytes(m[1:5], "big")
            if m[:1] == b"A":
                send(hosts[name], "L", b"R" + m[1:5] + bytes(25), True)
                if i % 3 == int(name[1]):
                    finish(i)

        return handler

    def append(i: int) -> None:
        body = b"A" + i.to_bytes(4, "big") + bytes(245 + state_size(i, state_bytes))
        for f in ("F1", "F2"):
            send(hosts["L"], f, body, False)

    cfg = LinkConfig(congestion_control=congestion_control)
    hosts = {
        "L": SimLinkHost(net, "L", at_leader, config=cfg),
        "F1": SimLinkHost(net, "F1", at_follower("F1"), config=cfg),
        "F2": SimLinkHost(net, "F2", at_follower("F2"), config=cfg),
    }

    def count(src: str, dst: str, payload: bytes) -> bool:
        wire["bytes"] += len(payload) - 4 + OVERHEAD  # minus the sim's session prefix
        wire["datagrams"] += 1
        return False

    net.set_drop_filter(count)

    def heartbeat(i: int) -> None:
        started[i] = net.now
        site = i % 3
        if site == 0:
            append(i)
        else:
            extra = state_size(i, state_bytes)
            send(hosts[f"F{site}"], "L", b"C" + i.to_bytes(4, "big") + bytes(195 + extra), True)

    for i in range(heartbeats):
        net.call_at(i / rate, functools.partial(heartbeat, i))
    cpu = time.process_time()
    net.run_until(heartbeats / rate + 30)
    cpu = time.process_time() - cpu
    lat = sorted((done[i] - started[i]) * 1000 for i in done)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1)

    return {
        "profile": profile, "rate": rate, "heartbeats": heartbeats, "seed": seed,
        "state_bytes": state_bytes, "congestion_control": congestion_control,
        "unordered": can_unorder, "committed": len(lat),
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": pct(1.0),
        "datagrams_per_hb": round(wire["datagrams"] / heartbeats, 2),
        "wire_bytes_per_hb": round(wire["bytes"] / heartbeats),
        "cpu_s": round(cpu, 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="lan,weak,bad")
    ap.add_argument("--heartbeats", type=int, default=15000)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ordered", action="store_true", help="send every message ordered")
    ap.add_argument("--state-bytes", default="0", metavar="N[,M...]",
                    help="reported state per heartbeat, 0..N bytes uniform; several: "
                    "one run set each (default 0: none)")  # fmt: skip
    ap.add_argument("--congestion-control", action="store_true",
                    help="the links' bulk congestion controller on (a node's default: off)")
    args = ap.parse_args(argv)
    rows = [
        run(p, args.heartbeats, args.rate, seed, args.ordered, int(n),
            args.congestion_control)
        for n in args.state_bytes.split(",")
        for p in args.profile.split(",")
        for seed in range(args.seeds)
    ]
    json.dump(rows, sys.stdout)
    print()
    print(table(rows), file=sys.stderr)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (state size, profile): medians over the seeds."""
    keys = sorted({(r["state_bytes"], r["profile"]) for r in rows}, key=lambda k: k)
    cols = ("p50_ms", "p99_ms", "p999_ms", "datagrams_per_hb", "wire_bytes_per_hb")
    out = [f"{'state B':>8} {'profile':>8} {'seeds':>5} " + " ".join(f"{c:>17}" for c in cols)]
    for n, p in keys:
        sel = [r for r in rows if (r["state_bytes"], r["profile"]) == (n, p)]
        med = [statistics.median(r[c] for r in sel) for c in cols]
        out.append(f"{n:>8} {p:>8} {len(sel):>5} " + " ".join(f"{m:>17g}" for m in med))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
