"""``raftstate lab bench``: the WAN lab's headline benchmark (issue 6, item 3).

Heartbeat ack latency, success and node CPU, from devices at every site to the
cluster, per WAN profile, for three systems placed the same way in the lab
(:mod:`cluster.natlab`, three NATed sites, one node per site):

* ``udp``: raftstate over its UDP transport, peers through ICE (STUN, and TURN
  for a symmetric site) (:class:`cluster.labcluster.LabCluster`);
* ``tcp``: raftstate over pysyncobj's TCP transport, peers through router port
  forwards (DNAT), since TCP cannot punch holes;
* ``etcd``: a three-member etcd cluster (Debian's etcd 3.4), one member per
  node namespace, peers and clients through router port forwards on 2379/2380.

Theory of operation:

1. One lab per system: it is built, the cluster forms on clean links, then for
   each profile the WAN emulator gets the profile's node-link impairment
   (:meth:`NatLab.impair_profile`; the device <-> node hop is the site's LAN)
   and, after a short settle, the measurement window runs.
2. The window: one load process per site, inside the site's device namespace
   (``python -m chaos.labbench load``), sends heartbeats open-loop at a fixed
   rate (``--rate`` split over the sites) to its site's LOCAL node (raftstate:
   ``AsyncDeviceClient([local], prefer_leader=False)``, so followers forward
   to the leader over the Raft transport; etcd: ``Put`` to the local member,
   which forwards to its leader). Every operation has a deadline and is
   written as a JSON line: latency, ok, error. Node CPU is sampled from
   ``/proc`` around the window (:mod:`bench.proccpu`).
3. After the window every acknowledged heartbeat is looked up on every node
   (raftstate: the stored seq per device, serializable, after the nodes
   converged; etcd: every acknowledged key, serializable, on every member).
4. ``--nat-event flush|remap`` (raftstate systems): halfway through each
   window, site 3's router forgets its conntrack (or remaps its ports); the
   stall is the time from the event until every node applied past the leader's
   last log index read once the router's command returned.

Everything needs root. Not thread-safe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.stats import LatencySummary
from raftstate.cli.words import plural

SYSTEMS = ("udp", "tcp", "etcd")
PROFILES = ("lan", "wan", "weak", "bad")
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
#: Devices per site: heartbeats go round-robin over them, seq increasing.
DEVICES_PER_SITE = 20
_START_LEAD_S = 4.0
_SETTLE_S = 2.0
#: Targets of issue 6.
WEAK_P99_TARGET_MS = 120.0
BAD_P999_FACTOR = 5.0

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# the load process (runs inside a device namespace)
# --------------------------------------------------------------------------


def _load_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.labbench load")
    p.add_argument("--system", choices=["raftstate", "etcd"], required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--tag", required=True, help="device id / key prefix")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--devices", type=int, default=DEVICES_PER_SITE)
    p.add_argument("--start-at", type=float, required=True, help="time.time() to start at")
    p.add_argument("--warmup-count", type=int, default=0,
                   help="ops first sent at the same rate, marked warm (not measured)")  # fmt: skip
    p.add_argument("--state-bytes", type=int, default=0,
                   help="reported state of each heartbeat: a field of 0..N bytes")  # fmt: skip
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_load(args))
    return 0


def state_of(k: int, state_bytes: int) -> dict[str, str]:
    """Heartbeat ``k``'s reported state: ``{"k": str(k)}``, plus with
    ``state_bytes`` > 0 a field ``"p"`` of a size drawn uniformly from
    0..``state_bytes`` (seeded by ``k``: every system gets the same sizes),
    of hex digits (nothing on the path compresses them)."""
    if state_bytes <= 0:
        return {"k": str(k)}
    rng = random.Random(k)
    size = rng.randint(0, state_bytes)
    return {"k": str(k), "p": rng.randbytes((size + 1) // 2).hex()[:size]}


async def _load(args: argparse.Namespace) -> None:
    from bench.etcdpb import etcd_kv_pb2, etcd_kv_pb2_grpc
    from raftstate.sdk.client import AsyncDeviceClient

    out = open(args.out, "w")  # noqa: SIM115 - closed below
    loop = asyncio.get_running_loop()
    client: AsyncDeviceClient | None = None
    channel: grpc.aio.Channel | None = None
    kv: Any = None
    if args.system == "raftstate":
        client = AsyncDeviceClient([args.endpoint], prefer_leader=False, deadline_s=args.deadline)
    else:
        channel = grpc.aio.insecure_channel(
            args.endpoint,
            options=[("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)],
        )  # fmt: skip
        kv = etcd_kv_pb2_grpc.KVStub(channel)
    # Warm the connection (not measured) so the first op does not pay the dial.
    warm_until = loop.time() + 10
    while loop.time() < warm_until:
        try:
            if client is not None:
                await client.heartbeat(f"{args.tag}-warm", {"w": "1"}, deadline_s=2)
            else:
                await kv.Put(etcd_kv_pb2.PutRequest(key=f"{args.tag}/warm".encode(), value=b"1"),
                             timeout=2)  # fmt: skip
            break
        except Exception:  # noqa: BLE001 - retried until the deadline
            await asyncio.sleep(0.2)
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    # uvloop's loop.time() has millisecond resolution: time with perf_counter.
    clock = time.perf_counter
    t0 = clock()
    tasks: list[asyncio.Task[None]] = []

    async def one(k: int) -> None:
        dev = f"{args.tag}-d{k % args.devices}"
        seq = k // args.devices + 1
        start = clock()
        rec: dict[str, Any] = {"k": k, "t": round(start - t0, 4), "dev": dev, "seq": seq}
        if k < args.warmup_count:
            rec["warm"] = True
        reported = state_of(k, args.state_bytes)
        try:
            if client is not None:
                await client.heartbeat(dev, reported, seq=seq, deadline_s=args.deadline)
            else:
                rec["key"] = f"{args.tag}/{k}"
                value = json.dumps({"seq": seq, **reported}).encode()
                put = etcd_kv_pb2.PutRequest(key=rec["key"].encode(), value=value)
                await kv.Put(put, timeout=args.deadline)
            rec["ok"] = True
        except Exception as err:  # noqa: BLE001 - every failure is a data point
            rec["ok"] = False
            rec["err"] = f"{type(err).__name__}: {str(err)[:120]}"
        rec["ms"] = round((clock() - start) * 1000, 3)
        out.write(json.dumps(rec) + "\n")

    async def lag_monitor() -> None:
        # With RAFTSTATE_STALL_PROBE set (raftstate/stallprobe.py): print when
        # this load process itself woke late (a starved client looks like a
        # slow node in the records).
        while True:
            asked = clock()
            await asyncio.sleep(0.1)
            lag = clock() - asked - 0.1
            if lag > 0.2:
                print(f"load lag {lag:.2f} s at t={clock() - t0:.2f}", flush=True)

    probe = os.environ.get("RAFTSTATE_STALL_PROBE")
    lag_task = asyncio.create_task(lag_monitor()) if probe else None
    for k in range(args.warmup_count + args.count):
        at = t0 + k / args.rate
        wait = at - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(k)))
    await asyncio.gather(*tasks)
    if lag_task is not None:
        lag_task.cancel()
    out.close()
    if client is not None:
        await client.close()
    if channel is not None:
        await channel.close()


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    """One (profile, system) window."""

    profile: str
    system: str
    sent: int
    ok: int
    latency_ms: LatencySummary
    success_pct: float
    acked_lost: int
    lost_checked: bool
    node_cpu_s: dict[str, float]
    cpu_us_per_op: float
    seconds: float
    offered_per_s: float
    errors: dict[str, int] = field(default_factory=dict)
    nat_event: str | None = None
    stall_s: float | None = None
    #: How long the NAT command itself took (part of ``stall_s``, which counts
    #: from its start; the flush that makes the event is its last step).
    event_cmd_s: float | None = None
    notes: list[str] = field(default_factory=list)
    #: Per site ("s1"...): acked count and latency percentiles, ms.
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The leader when the window started ("n2", "e1"), if known.
    leader: str | None = None
    #: The whole host's busy CPU seconds in the window (nodes, load, the WAN
    #: emulator and anything else running), and its 1-minute load average at
    #: the start: contention shows in the tail.
    host_busy_cpu_s: float = 0.0
    loadavg_1m: float = 0.0
    #: Bytes the sites' routers put on the WAN in the window (every node
    #: link, headers included, lost ones too), and per acked heartbeat.
    wan_tx_bytes: int = 0
    wire_bytes_per_op: float = 0.0
    #: Leader changes seen by sampling the leader every ~2 s in the window.
    leader_changes: int = 0
    #: Elections started in the window, summed over the nodes (raftstate:
    #: each node's ``elections`` counter; None for etcd, which has none),
    #: and how far the highest term rose (every election raises it; with
    #: PreVote a failed pre-vote does not). -1: not read.
    elections: int | None = None
    term_increments: int = -1
    #: Each node's Raft timers at the window's start (raftstate: Status's
    #: heartbeat_ms, election_timeout_min_ms/max_ms, leader_step_down_ms,
    #: timing_source).
    timers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Sorted successful latencies (for the CDF plot; not in the JSON).
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples_ms")
        d["latency_ms"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                           for k, v in asdict(self.latency_ms).items()}  # fmt: skip
        return d


def _fmt_ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


TABLE_HEAD = ("profile", "system", "sent", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
              "success %", "acked-lost", "node CPU s", "CPU us/op", "wire B/op", "leader chg",
              "elections", "term+", "host busy s", "load1", "stall s")  # fmt: skip


def _row(r: RunResult) -> list[str]:
    lat = r.latency_ms
    return [
        r.profile, r.system, str(r.sent), _fmt_ms(lat.p50), _fmt_ms(lat.p99), _fmt_ms(lat.p999),
        _fmt_ms(lat.max), f"{r.success_pct:.3f}",
        str(r.acked_lost) if r.lost_checked else "unchecked",
        f"{sum(r.node_cpu_s.values()):.1f}", f"{r.cpu_us_per_op:.0f}",
        f"{r.wire_bytes_per_op:.0f}", str(r.leader_changes),
        "-" if r.elections is None else str(r.elections),
        "-" if r.term_increments < 0 else str(r.term_increments), f"{r.host_busy_cpu_s:.0f}",
        f"{r.loadavg_1m:.1f}",
        "-" if r.stall_s is None else f"{r.stall_s:.2f}",
    ]  # fmt: skip


def render_table(results: Sequence[RunResult]) -> str:
    rows = [list(TABLE_HEAD)] + [_row(r) for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(len(TABLE_HEAD))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render_markdown(results: Sequence[RunResult]) -> str:
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines)


def target_verdicts(results: Sequence[RunResult]) -> list[str]:
    """Issue 6's targets, as far as these results allow."""
    by = {(r.profile, r.system): r for r in results}
    out = []
    weak = by.get(("weak", "udp"))
    if weak is not None:
        p99 = weak.latency_ms.p99
        met = p99 <= WEAK_P99_TARGET_MS
        out.append(f"target udp on weak: p99 <= {WEAK_P99_TARGET_MS:g} ms: "
                   f"{'met' if met else 'MISSED'} ({_fmt_ms(p99)} ms, success "
                   f"{weak.success_pct:.3f} % over {weak.sent} heartbeats)")  # fmt: skip
        site = weak.per_site.get(f"s{weak.leader[1:]}") if weak.leader else None
        if site is not None:
            # profiles.toml's weak target is the commit latency seen next to
            # the leader; devices at other sites add a forward round trip.
            met = site["p99"] <= WEAK_P99_TARGET_MS
            out.append(f"target udp on weak, devices at the leader's site ({weak.leader}): "
                       f"p99 <= {WEAK_P99_TARGET_MS:g} ms: {'met' if met else 'MISSED'} "
                       f"({_fmt_ms(site['p99'])} ms)")  # fmt: skip
    bad = by.get(("bad", "udp"))
    if bad is not None:
        for other in ("tcp", "etcd"):
            o = by.get(("bad", other))
            if o is None:
                continue
            # A failed op counts as slower than any success: take p99.9 over
            # every op, failures at +inf.
            a, b = _p999_all(bad), _p999_all(o)
            ratio = b / a if a > 0 else math.inf
            met = ratio >= BAD_P999_FACTOR
            out.append(f"target bad: udp p99.9 >= {BAD_P999_FACTOR:g}x better than {other}: "
                       f"{'met' if met else 'MISSED'} (udp {_fmt_ms(a)} ms, {other} "
                       f"{_fmt_ms(b)} ms, {ratio:.1f}x)")  # fmt: skip
    quiet = [r for r in results if r.profile in ("weak", "bad") and r.system != "etcd"
             and r.nat_event is None]  # fmt: skip
    if quiet:
        churn = [r for r in quiet if r.leader_changes or r.elections or r.term_increments > 0]
        out.append("target no leader change or election on weak/bad without a fault: "
                   + ("MISSED: " + ", ".join(
                       f"{r.profile}/{r.system} {r.leader_changes} changes, "
                       f"{r.elections} elections, term +{r.term_increments}" for r in churn)
                      if churn else f"met ({plural(len(quiet), 'run')})"))  # fmt: skip
    lost = [r for r in results if r.lost_checked and r.acked_lost]
    unchecked = [r for r in results if not r.lost_checked]
    out.append("target zero acknowledged heartbeats lost: "
               + ("MISSED: " + ", ".join(f"{r.profile}/{r.system} {r.acked_lost}" for r in lost)
                  if lost else "met")
               + (f" ({plural(len(unchecked), 'run')} unchecked)"
                  if unchecked else ""))  # fmt: skip
    return out


def _p999_all(r: RunResult) -> float:
    """p99.9 over every op sent, a failed op counting as infinitely slow."""
    if r.sent == 0:
        return math.nan
    rank = max(1, math.ceil(99.9 / 100 * r.sent))  # as LatencySummary's percentile
    if rank > len(r.samples_ms):
        return math.inf
    return r.samples_ms[rank - 1]


def draw_cdfs(results: Sequence[RunResult], path: Path) -> str | None:
    """A PNG with one panel per profile, one latency CDF per system (log x).
    Returns why it was skipped, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "matplotlib is not installed; no PNG (pip install matplotlib)"
    profiles = list(dict.fromkeys(r.profile for r in results))
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.5 * len(profiles), 4), squeeze=False)
    colors = {"udp": "tab:green", "tcp": "tab:orange", "etcd": "tab:blue"}
    for ax, prof in zip(axes[0], profiles, strict=True):
        for r in results:
            if r.profile != prof or not r.samples_ms:
                continue
            n = r.sent
            ys = [(i + 1) / n for i in range(len(r.samples_ms))]
            ax.plot(r.samples_ms, ys, label=f"{r.system} ({r.success_pct:.2f} % ok)",
                    color=colors.get(r.system))  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"profile {prof}")
        ax.set_xlabel("heartbeat ack latency, ms (log)")
        ax.set_ylabel("fraction of heartbeats acked")
        ax.axvline(WEAK_P99_TARGET_MS, color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("raftstate lab bench: 3 NATed sites, devices -> local node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# the systems
# --------------------------------------------------------------------------


class _System:
    """One system's cluster in its own lab."""

    name: str
    lab: Any  # NatLab
    #: Nodes whose device table differed from the first node's at the last check.
    disagree: int = 0

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def local_endpoint(self, i: int) -> str:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def load_kind(self) -> str:
        return "raftstate"

    def check_lost(self, records: list[dict[str, Any]], tag_prefix: str) -> int:
        raise NotImplementedError

    def leader(self) -> str | None:
        return None

    def truncations(self) -> int:
        return 0

    def raft_counters(self) -> tuple[int, int | None] | None:
        """(highest term, elections started summed over the nodes; None if
        the system does not count them), or None if a node did not answer."""
        return None

    def timers(self) -> dict[str, dict[str, Any]]:
        """Each node's Raft timers, where the system reports them."""
        return {}


class _Raftstate(_System):
    def __init__(self, name: str, base_dir: Path, kinds: list[str], prefix: str,
                 progress: Callable[[str], None]) -> None:  # fmt: skip
        from cluster.labcluster import LabCluster

        self.name = name
        self.lc = LabCluster(base_dir, kinds, transport=name, prefix=prefix, progress=progress)
        self.lab = self.lc.lab

    def up(self) -> None:
        self.lc.up(timeout_s=90)

    def down(self) -> None:
        self.lc.down()

    def local_endpoint(self, i: int) -> str:
        from cluster.labcluster import GRPC_PORT

        return f"{self.lab.node_ip(i)}:{GRPC_PORT}"

    def pids(self) -> dict[str, int]:
        assert self.lc.cluster is not None
        return {n.node_id: n.pid for n in self.lc.cluster.nodes.values() if n.pid}

    def check_lost(self, records: list[dict[str, Any]], tag_prefix: str) -> int:
        from chaos.verify import node_table, wait_converged

        endpoints = self.lc.endpoints
        wait_converged(endpoints, timeout_s=60)
        lost = 0
        tables = []
        for ep in endpoints:
            table = node_table(ep, prefix=tag_prefix)
            tables.append(table)
            lost += sum(1 for r in records if r["ok"] and table.get(r["dev"], (0,))[0] < r["seq"])
        # Agreement, as chaos.verify checks it: converged nodes hold the same table.
        self.disagree = sum(1 for t in tables[1:] if t != tables[0])
        return lost

    def truncations(self) -> int:
        """pysyncobj's "truncating already-applied log entries" warnings so far."""
        assert self.lc.cluster is not None
        return sum(text.count("truncating already-applied") for _n, text in self.lc.cluster.logs())

    def leader(self) -> str | None:
        assert self.lc.cluster is not None
        try:
            return self.lc.cluster.leader()
        except Exception:  # noqa: BLE001 - informational only
            return None

    def _statuses(self) -> list[Any]:
        """Every node's ``ClusterService.Status`` (None: no answer in 1 s)."""
        from raftstate.sdk.credentials import Credentials
        from raftstate.v1 import cluster_pb2, cluster_pb2_grpc

        creds = Credentials.from_env()  # LabCluster put the admin credentials there
        out: list[Any] = []
        for ep in self.lc.endpoints:
            with creds.channel(ep) as ch:
                try:
                    out.append(cluster_pb2_grpc.ClusterServiceStub(ch).Status(
                        cluster_pb2.StatusRequest(), timeout=1, metadata=creds.metadata()))
                except grpc.RpcError:
                    out.append(None)  # fmt: skip
        return out

    def raft_counters(self) -> tuple[int, int | None] | None:
        statuses = self._statuses()
        if any(s is None for s in statuses):
            return None
        return max(int(s.term) for s in statuses), sum(int(s.elections) for s in statuses)

    def timers(self) -> dict[str, dict[str, Any]]:
        return {
            s.node_id: {"heartbeat_ms": round(s.heartbeat_ms, 1),
                        "election_timeout_ms": [round(s.election_timeout_min_ms),
                                                round(s.election_timeout_max_ms)],
                        "leader_step_down_ms": round(s.leader_step_down_ms),
                        "timing_source": s.timing_source}
            for s in self._statuses() if s is not None
        }  # fmt: skip

    def commit_status(self) -> tuple[int, list[int]]:
        """The leader's last log index (every entry proposed so far is at or
        below it) and every node's last applied (-1: no answer)."""
        from raftstate.sdk.credentials import Credentials
        from raftstate.v1 import cluster_pb2, cluster_pb2_grpc

        creds = Credentials.from_env()  # LabCluster put the admin credentials there
        last, applied = -1, []
        for ep in self.lc.endpoints:
            with creds.channel(ep) as ch:
                try:
                    s = cluster_pb2_grpc.ClusterServiceStub(ch).Status(
                        cluster_pb2.StatusRequest(), timeout=1, metadata=creds.metadata()
                    )
                except grpc.RpcError:
                    applied.append(-1)
                    continue
            applied.append(int(s.last_applied))
            if s.role == 3:
                last = int(s.last_log_index)
        return last, applied


class _Etcd(_System):
    def __init__(self, base_dir: Path, kinds: list[str], prefix: str,
                 progress: Callable[[str], None],
                 unsafe_no_fsync: bool = True) -> None:  # fmt: skip
        from cluster.natlab import NatLab

        self.name = "etcd"
        self.base_dir = base_dir.resolve()
        self.lab = NatLab(kinds, prefix, workdir=self.base_dir / "lab")
        self.unsafe_no_fsync = unsafe_no_fsync
        self.procs: list[subprocess.Popen[bytes]] = []
        self._progress = progress

    def _sites(self) -> range:
        return range(1, self.lab.n_sites + 1)

    def root_endpoint(self, i: int) -> str:
        return f"{self.lab.router_public_ip(i)}:{ETCD_CLIENT_PORT}"

    def local_endpoint(self, i: int) -> str:
        return f"{self.lab.node_ip(i)}:{ETCD_CLIENT_PORT}"

    def load_kind(self) -> str:
        return "etcd"

    def up(self) -> None:
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        from cluster.etcd import DEFAULT_ETCD, EtcdClusterError, _member_status, _put

        lab = self.lab
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lab.up()
        for i in self._sites():
            lab.port_forward(i, "tcp", ETCD_CLIENT_PORT)
            lab.port_forward(i, "tcp", ETCD_PEER_PORT)
        peers = ",".join(f"e{i}=http://{lab.router_public_ip(i)}:{ETCD_PEER_PORT}"
                         for i in self._sites())  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        token = f"labbench-{secrets.token_hex(6)}"
        for i in self._sites():
            data = self.base_dir / f"e{i}.data"
            shutil.rmtree(data, ignore_errors=True)
            argv = [
                *lab.exec_prefix(i), DEFAULT_ETCD, "--name", f"e{i}", "--data-dir", str(data),
                "--listen-client-urls", f"http://{lab.node_ip(i)}:{ETCD_CLIENT_PORT}",
                "--advertise-client-urls", f"http://{lab.router_public_ip(i)}:{ETCD_CLIENT_PORT}",
                "--listen-peer-urls", f"http://{lab.node_ip(i)}:{ETCD_PEER_PORT}",
                "--initial-advertise-peer-urls",
                f"http://{lab.router_public_ip(i)}:{ETCD_PEER_PORT}",
                "--initial-cluster", peers, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--logger", "zap",
            ]  # fmt: skip
            if self.unsafe_no_fsync:
                argv.append("--unsafe-no-fsync")
            with open(self.base_dir / f"e{i}.log", "ab") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=env))  # fmt: skip
        deadline = time.monotonic() + 60
        eps = [self.root_endpoint(i) for i in self._sites()]
        while True:
            for i, proc in enumerate(self.procs, 1):
                if proc.poll() is not None:
                    tail = (self.base_dir / f"e{i}.log").read_text(errors="replace")[-1500:]
                    raise EtcdClusterError(f"etcd e{i} exited ({proc.returncode}):\n{tail}")
            statuses = [_member_status(ep, 1.0) for ep in eps]
            leaders = {int(s.leader) for s in statuses if s is not None}
            if all(s is not None for s in statuses) and len(leaders) == 1 and 0 not in leaders:
                if all(_put(ep, b"__labbench_ready__", b"1", 2.0) for ep in eps):
                    self._progress("etcd: 3 members through the NATs, leader agreed")
                    return
            if time.monotonic() > deadline:
                raise EtcdClusterError("etcd did not form a cluster through the lab in 60 s")
            time.sleep(0.2)

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        self.lab.down()

    def leader(self) -> str | None:
        from cluster.etcd import _member_status

        by_id: dict[int, str] = {}
        leaders = set()
        for i in self._sites():
            st = _member_status(self.root_endpoint(i), 1.0)
            if st is not None:
                by_id[int(st.header.member_id)] = f"e{i}"
                leaders.add(int(st.leader))
        return by_id.get(leaders.pop()) if len(leaders) == 1 else None

    def pids(self) -> dict[str, int]:
        return {f"e{i}": p.pid for i, p in enumerate(self.procs, 1) if p.poll() is None}

    def raft_counters(self) -> tuple[int, int | None] | None:
        from cluster.etcd import _member_status

        terms = [_member_status(self.root_endpoint(i), 1.0) for i in self._sites()]
        if any(t is None for t in terms):
            return None
        return max(int(t.raftTerm) for t in terms if t is not None), None

    def check_lost(self, records: list[dict[str, Any]], tag_prefix: str) -> int:
        from bench.etcdpb import etcd_kv_pb2, etcd_kv_pb2_grpc

        acked = {r["key"] for r in records if r["ok"]}
        key = tag_prefix.encode()
        end = key[:-1] + bytes([key[-1] + 1])
        deadline = time.monotonic() + 30
        while True:
            lost = 0
            for i in self._sites():
                with grpc.insecure_channel(self.root_endpoint(i)) as ch:
                    res = etcd_kv_pb2_grpc.KVStub(ch).Range(
                        etcd_kv_pb2.RangeRequest(key=key, range_end=end, keys_only=True,
                                                 serializable=True), timeout=10)  # fmt: skip
                held = {kv.key.decode() for kv in res.kvs}
                lost += len(acked - held)
            if lost == 0 or time.monotonic() > deadline:
                return lost
            time.sleep(0.5)  # a follower may still be applying


# --------------------------------------------------------------------------
# the orchestrator
# --------------------------------------------------------------------------


@dataclass
class BenchConfig:
    profiles: list[str]
    systems: list[str]
    heartbeats: int = 3000
    rate: float = 100.0
    deadline_s: float = 5.0
    symmetric: list[int] = field(default_factory=list)
    sites: int = 3
    nat_event: str | None = None
    #: Seconds of load at the same rate before the measured window, after
    #: the profile changed (transports adapt; not measured, but checked).
    warmup_s: float = 5.0
    #: Each heartbeat's reported state carries 0..state_bytes bytes
    #: (:func:`state_of`); 0: a tiny map.
    state_bytes: int = 0
    out_dir: Path = Path(".raftstate/labbench")
    prefix: str | None = None


def _window(
    system: _System, cfg: BenchConfig, profile: str, run_dir: Path,
    progress: Callable[[str], None],
) -> RunResult:  # fmt: skip
    from bench.proccpu import busy_cpu_seconds, cpu_between, sample

    lab = system.lab
    n = cfg.sites
    per_site = [cfg.heartbeats // n + (1 if i < cfg.heartbeats % n else 0) for i in range(n)]
    rate_site = cfg.rate / n
    seconds = max(per_site) / rate_site
    tag = f"{profile}-{secrets.token_hex(2)}"
    start_at = time.time() + _START_LEAD_S
    warm_count = round(cfg.warmup_s * rate_site)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    procs = []
    files = []
    for i in range(1, n + 1):
        out = run_dir / f"{profile}-{system.name}-s{i}.jsonl"
        files.append(out)
        argv = [*lab.device_exec_prefix(i), sys.executable, "-m", "chaos.labbench", "load",
                "--system", system.load_kind(), "--endpoint", system.local_endpoint(i),
                "--tag", f"{tag}-s{i}", "--count", str(per_site[i - 1]),
                "--rate", str(rate_site), "--deadline", str(cfg.deadline_s),
                "--start-at", str(start_at), "--out", str(out), "--warmup-count",
                str(warm_count), "--state-bytes", str(cfg.state_bytes)]  # fmt: skip
        log = open(run_dir / f"{profile}-{system.name}-s{i}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=REPO_ROOT, stdin=subprocess.DEVNULL))  # fmt: skip
        log.close()
    pids = system.pids()
    leader = system.leader()
    trunc0 = system.truncations()
    time.sleep(max(0.0, start_at + warm_count / rate_site - time.time()))
    before = {name: sample(pid) for name, pid in pids.items()}
    busy0, load1 = busy_cpu_seconds(), os.getloadavg()[0]
    stall: dict[str, float | None] = {}
    event_thread = None
    if cfg.nat_event and isinstance(system, _Raftstate):
        event_thread = threading.Thread(
            target=_nat_event, args=(system, cfg.nat_event, seconds / 2, stall), daemon=True
        )
        event_thread.start()
    tx0 = _wan_tx_bytes(lab)
    counters0, timers = system.raft_counters(), system.timers()
    changes, current, end = 0, leader, time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(2.0, max(0.0, end - time.monotonic())))
        now_leader = system.leader() if time.monotonic() < end else None
        if now_leader is not None:
            changes += current is not None and now_leader != current
            current = now_leader
    after = {name: sample(pid) for name, pid in pids.items()}
    counters1 = system.raft_counters()
    terms, elections = -1, None
    if counters0 is not None and counters1 is not None:
        terms = counters1[0] - counters0[0]
        if counters0[1] is not None and counters1[1] is not None:
            elections = counters1[1] - counters0[1]
    tx = _wan_tx_bytes(lab) - tx0
    busy = busy_cpu_seconds() - busy0
    for i, proc in enumerate(procs, 1):
        try:
            proc.wait(timeout=cfg.deadline_s + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0:
            tail = (run_dir / f"{profile}-{system.name}-s{i}.log").read_text(errors="replace")
            progress(f"  load process of site {i} exited {proc.returncode}: {tail[-500:]}")
    if event_thread is not None:
        event_thread.join(timeout=30)
    records: list[dict[str, Any]] = []
    site_stats: dict[str, dict[str, float]] = {}
    warm: list[dict[str, Any]] = []
    for i, f in enumerate(files, 1):
        if not f.exists():
            continue
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        warm += [r for r in lines if r.get("warm")]
        site = [r for r in lines if not r.get("warm")]
        records += site
        s = LatencySummary.of([float(r["ms"]) for r in site if r["ok"]])
        site_stats[f"s{i}"] = {"ok": sum(1 for r in site if r["ok"]), "p50": s.p50, "p99": s.p99,
                             "p999": s.p999}  # fmt: skip
    sent = cfg.heartbeats
    ok = [r for r in records if r["ok"]]
    errors: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            kind = r.get("err", "?").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    missing = sent - len(records)
    if missing:
        errors["not recorded"] = missing
    notes = []
    try:
        prefix = f"{tag}-" if isinstance(system, _Raftstate) else f"{tag}-"
        lost = system.check_lost(records + warm, prefix)
        checked = True
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        lost, checked = 0, False
        notes.append(f"lost check failed: {type(err).__name__}: {err}")
    if system.disagree:
        notes.append(f"{system.disagree} nodes' device tables differ from the first node's")
    truncs = system.truncations() - trunc0
    if truncs:
        notes.append(f"pysyncobj logged {truncs} 'truncating already-applied log entries' "
                     "(followers re-truncating on resent AppendEntries)")  # fmt: skip
    cpu = {name: round(cpu_between(before[name], after[name]).seconds, 2) for name in pids}
    samples = sorted(float(r["ms"]) for r in ok)
    return RunResult(
        profile=profile, system=system.name, sent=sent, ok=len(ok),
        latency_ms=LatencySummary.of(samples),
        success_pct=100.0 * len(ok) / sent if sent else math.nan,
        acked_lost=lost, lost_checked=checked, node_cpu_s=cpu,
        cpu_us_per_op=1e6 * sum(cpu.values()) / sent if sent else 0.0,
        seconds=round(seconds, 2), offered_per_s=cfg.rate, errors=errors,
        nat_event=cfg.nat_event if event_thread is not None else None,
        stall_s=stall.get("stall_s"), event_cmd_s=stall.get("event_cmd_s"), notes=notes,
        per_site=site_stats, leader=leader,
        host_busy_cpu_s=round(busy, 1), loadavg_1m=round(load1, 2),
        wan_tx_bytes=tx, wire_bytes_per_op=tx / len(ok) if ok else 0.0,
        leader_changes=changes, elections=elections, term_increments=terms, timers=timers,
        samples_ms=samples,
    )  # fmt: skip


def _wan_tx_bytes(lab: Any) -> int:
    """Bytes all site routers have sent out of their WAN interface so far."""
    total = 0
    for i in range(1, lab.n_sites + 1):
        out = subprocess.run(
            ["ip", "netns", "exec", lab.router_netns(i), "cat",
             "/sys/class/net/wan/statistics/tx_bytes"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        total += int(out.stdout.strip() or 0)
    return total


def _nat_event(system: _Raftstate, kind: str, after_s: float, out: dict[str, float | None]) -> None:
    """Halfway through the window: flush (or remap) site 3's NAT, then time
    until every node applied an entry the leader appended after that moment
    (past its last log index then: the entry crossed the network after the
    event; with follower commit, entries already in flight could be applied
    without any packet getting through)."""
    time.sleep(after_s)
    site = min(3, system.lab.n_sites)
    t0, wall0 = time.monotonic(), time.time()
    if kind == "remap":
        system.lab.remap(site)
    else:
        system.lab.flush_conntrack(site)
    out["event_cmd_s"] = round(time.monotonic() - t0, 3)
    # To line the event up with the node logs (their time format).
    stamp = time.strftime("%H:%M:%S", time.localtime(wall0)) + f",{int(wall0 * 1000) % 1000:03d}"
    print(f"[{system.name}] {kind} of site {site} at {stamp}, took {out['event_cmd_s']:.3f} s",
          file=sys.stderr)  # fmt: skip
    # Read only now: entries appended while the remap command ran (tens of
    # ms) may still have crossed the old mapping, and would hide the stall.
    commit, _ = system.commit_status()
    out["stall_s"] = None
    while time.monotonic() - t0 < 30:
        last, applied = system.commit_status()
        if commit < 0:  # no leader when first read (an election): the first one seen
            commit = last
            continue
        if applied and all(a > commit for a in applied):
            out["stall_s"] = round(time.monotonic() - t0, 3)
            return
        time.sleep(0.02)


def run(cfg: BenchConfig, progress: Callable[[str], None] = print) -> list[RunResult]:
    """Every (profile, system) window of ``cfg``; see the module doc."""
    kinds = ["symmetric" if i in cfg.symmetric else "cone" for i in range(1, cfg.sites + 1)]
    results: list[RunResult] = []
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for name in cfg.systems:
        sys_dir = cfg.out_dir / name
        shutil.rmtree(sys_dir, ignore_errors=True)
        sys_dir.mkdir(parents=True)
        prefix = (cfg.prefix or "lb" + secrets.token_hex(2)) + name[0]
        system: _System
        if name == "etcd":
            system = _Etcd(sys_dir, kinds, prefix, progress)
        else:
            system = _Raftstate(name, sys_dir, kinds, prefix, progress)
        started = time.monotonic()
        progress(f"[{name}] building the lab ({', '.join(kinds)}) and the cluster")
        system.up()
        progress(f"[{name}] up in {time.monotonic() - started:.1f}s")
        try:
            for profile in cfg.profiles:
                system.lab.impair_profile(profile)
                time.sleep(_SETTLE_S)
                progress(f"[{name}] profile {profile}: {cfg.heartbeats} heartbeats at "
                         f"{cfg.rate:g}/s")  # fmt: skip
                r = _window(system, cfg, profile, sys_dir, progress)
                lat = r.latency_ms
                progress(f"[{name}] {profile}: p50 {_fmt_ms(lat.p50)} p99 {_fmt_ms(lat.p99)} "
                         f"p99.9 {_fmt_ms(lat.p999)} max {_fmt_ms(lat.max)} ms, "
                         f"{r.success_pct:.3f} % ok, lost {r.acked_lost}"
                         + ("" if r.stall_s is None else f", stall {r.stall_s:.2f}s")
                         + ("" if r.event_cmd_s is None else f" (command {r.event_cmd_s:.2f}s)")
                         + (f" ({'; '.join(r.notes)})" if r.notes else ""))  # fmt: skip
                results.append(r)
        finally:
            system.down()
    order = {p: i for i, p in enumerate(cfg.profiles)}
    results.sort(key=lambda r: (order[r.profile], cfg.systems.index(r.system)))
    return results


def _state_words(state_bytes: int) -> str:
    return f"0-{state_bytes:,} bytes (uniform)" if state_bytes > 0 else "a tiny map"


def write_outputs(results: Sequence[RunResult], cfg: BenchConfig, stem: Path,
                  command: str) -> list[str]:  # fmt: skip
    """``stem``.json, .md and .png; returns the lines to print."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    verdicts = target_verdicts(results)
    meta = {
        "command": command, "heartbeats": cfg.heartbeats, "rate_per_s": cfg.rate,
        "deadline_s": cfg.deadline_s, "sites": cfg.sites, "symmetric_sites": cfg.symmetric,
        "nat_event": cfg.nat_event, "warmup_s": cfg.warmup_s, "cpus": os.cpu_count(),
        "state_bytes": cfg.state_bytes,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    doc = {"meta": meta, "results": [r.to_json() for r in results], "targets": verdicts}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    nat = f"symmetric: {cfg.symmetric}" if cfg.symmetric else "all cone"
    md = [f"# raftstate lab bench ({meta['finished_utc']})", "", f"`{command}`", "",
          f"{plural(cfg.sites, 'site')} ({nat}), one node each; one load process per site in its "
          f"device namespace, open loop, "
          f"{cfg.rate:g} heartbeats/s in total, deadline {cfg.deadline_s:g} s, "
          f"reported state {_state_words(cfg.state_bytes)}, to the site's "
          f"local node (followers forward to the leader). Latency over acked ops; "
          f"node CPU summed over the three nodes in the window. Host: {os.cpu_count()} CPUs.",
          "", render_markdown(results), "", *[f"- {v}" for v in verdicts], ""]  # fmt: skip
    png = stem.with_suffix(".png")
    skipped = draw_cdfs(results, png)
    if skipped is None:
        md += [f"![latency CDFs]({png.name})", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    lines = [render_table(results), "", *verdicts]
    lines.append(skipped or f"wrote {stem}.json, {stem}.md, {png}")
    if skipped:
        lines.append(f"wrote {stem}.json, {stem}.md")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        return _load_main(argv[1:])
    print("usage: python -m chaos.labbench load ... (use `raftstate lab bench`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
