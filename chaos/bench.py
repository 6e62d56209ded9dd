"""``raftstate chaos bench``: device-visible heartbeat latency under weak-network profiles.

For each ``--profile``:

1. start a 3-node cluster with every link through the chaos proxy
   (:class:`~chaos.harness.ChaosCluster`; with ``--transport tcp``,
   :class:`TcpChaosCluster`) and apply the profile;
2. drive an *open-loop* device load through the device proxies: heartbeats
   at ``--rate`` per second in total, dealt round-robin over ``--devices``
   devices and sent on schedule whatever the answers do, until
   ``--heartbeats`` were attempted; plus ``--read-rate`` linearizable reads
   per second. SDK clients use ``prefer_leader=False`` (device *k* talks to
   proxy *k mod 3* first) and a ``--deadline`` per call, retries included.
   Every call is recorded in a :class:`~chaos.history.History`;
3. measure heartbeat ack latency as the device sees it (call to ack,
   retries included), linearizable read latency, and the replication
   success rate = acked within the deadline / attempted;
4. end in the shared verifier (:func:`chaos.verify.verify`: acked present on
   every node, identical tables, linearizable history) and count lost acked
   heartbeats: acked ``(device, seq)`` that some node does not hold.

Prints a table, saves JSON + Markdown under ``--out`` (and, if matplotlib is
installed, a PNG of the latency CDFs). Exit 0 only if every profile verified.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chaos.harness import ChaosCluster
from chaos.history import DeviceValue, History, ReadResult, WriteResult
from chaos.linearizability import check
from chaos.profiles import Profile, ProfileError, load_profile
from chaos.verify import Verdict, node_table, verify
from cluster.local import LocalCluster, free_ports
from raftstate.bench.stats import LatencySummary
from raftstate.config import Member, NodeConfig
from raftstate.errors import NotFound, RaftStateError
from raftstate.model import Consistency
from raftstate.sdk.client import AsyncDeviceClient

__all__ = ["BenchSettings", "ProfileResult", "TcpChaosCluster", "add_arguments", "bench_main"]


@dataclass(frozen=True, slots=True)
class BenchSettings:
    heartbeats: int = 100_000
    devices: int = 64
    rate: float = 200.0
    read_rate: float = 10.0
    deadline_s: float = 5.0
    transport: str = "udp"


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """One profile's row of the table and entry of the JSON."""

    profile: str
    transport: str
    attempted: int
    acked: int
    success_rate: float
    heartbeat_ms: LatencySummary
    reads_attempted: int
    read_ms: LatencySummary
    lost_acked: int
    linearizable: bool | None
    verifier_ok: bool
    problems: tuple[str, ...]
    load_s: float
    notes: tuple[str, ...] = ()
    #: (latency ms, cumulative fraction) points of the acked heartbeats' CDF.
    cdf: tuple[tuple[float, float], ...] = field(default=(), repr=False)


class TcpChaosCluster(ChaosCluster):
    """pysyncobj's TCP transport with every node link through a TCP proxy.

    Each member *advertises* its proxy's address as its ``raft`` address and
    listens on its real one (``raft_listen``), so every peer dials node j
    through proxy j. One proxy per node, not per directed pair: a TCP proxy
    carries both directions, so a profile's node ``latency`` is applied to
    both streams (same RTT as UDP). Loss, duplication and reordering cannot
    be applied to a byte stream; :meth:`apply` leaves them out and says so
    in :attr:`skipped`. Nor can one node be isolated: pysyncobj keeps one
    connection per pair, dialled through either end's proxy, so
    :meth:`isolate` raises ``NotImplementedError``.
    """

    skipped: tuple[str, ...] = ()

    def _start(self, timeout_s: float) -> None:
        from toxiproxy import Toxiproxy  # type: ignore[import-untyped]

        api_host, _, api_port = self.server.start().rpartition(":")
        Toxiproxy().update_api_consumer(api_host, int(api_port))
        ids = [f"n{i + 1}" for i in range(self.size)]
        ports = free_ports(2 * self.size, self.host)
        grpc_ports, raft_ports = ports[: self.size], ports[self.size :]
        server = Toxiproxy()
        members = []
        for nid, gp, rp in zip(ids, grpc_ports, raft_ports, strict=True):
            self.device_proxies[nid] = server.create(
                upstream=f"{self.host}:{gp}", name=f"device_{nid}", listen=f"{self.host}:0"
            )
            proxy = server.create(
                upstream=f"{self.host}:{rp}", name=f"raft_{nid}", listen=f"{self.host}:0"
            )
            # Keyed (node, node): isolate()/heal() then cut every link touching it.
            self.node_proxies[(nid, nid)] = proxy
            members.append(Member(nid, proxy.listen, f"{self.host}:{gp}"))
        overrides: dict[str, dict[str, Any]] = {
            nid: {"members": tuple(members), "raft_listen": f"{self.host}:{rp}"}
            for nid, rp in zip(ids, raft_ports, strict=True)
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

    def isolate(self, node_id: str) -> None:
        raise NotImplementedError(
            "TCP node links go through one proxy per node, which cannot cut one node off "
            "from its peers only; use the UDP transport for outage schedules"
        )

    def apply(self, profile: Profile) -> None:
        for proxy in [*self.device_proxies.values(), *self.node_proxies.values()]:
            for name in self._toxic_names.pop(proxy.name, []):
                proxy.destroy_toxic(name)
        skipped = []
        for proxies, toxics in (
            (self.device_proxies.values(), profile.device),
            (self.node_proxies.values(), profile.node),
        ):
            for toxic in toxics:
                if toxic.type not in ("latency", "bandwidth"):
                    skipped.append(toxic.type)
                    continue
                for proxy in proxies:
                    for stream in ("upstream", "downstream"):
                        self._add_toxic(proxy, toxic.type, stream, toxic.attribute_map())
        self.skipped = tuple(sorted(set(skipped)))


def new_cluster(base_dir: Path, transport: str) -> ChaosCluster:
    """A not yet started chaos cluster for ``transport`` (``udp`` or ``tcp``)."""
    if transport == "tcp":
        cc: ChaosCluster = TcpChaosCluster(base_dir, 3)
        cc.base_config = dataclasses.replace(NodeConfig.for_tests(), transport="tcp")
        return cc
    return ChaosCluster(base_dir, 3)


@dataclass
class _Load:
    """What the load loop saw (mutable while it runs)."""

    attempted: int = 0
    acked_in_deadline: int = 0
    failures: int = 0
    hb_ms: list[float] = field(default_factory=list)
    reads: int = 0
    read_ms: list[float] = field(default_factory=list)
    acked: list[tuple[str, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    ambiguous: int = 0


async def _drive(endpoints: list[str], s: BenchSettings, history: History, name: str) -> _Load:
    """Open loop: heartbeat i leaves at ``i / rate`` seconds, read j at ``j / read_rate``."""
    clients = [
        AsyncDeviceClient(
            endpoints[k:] + endpoints[:k], deadline_s=s.deadline_s, prefer_leader=False
        )
        for k in range(len(endpoints))
    ]
    ids = [f"bench-{d:04d}" for d in range(s.devices)]
    load = _Load()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def note_error(err: RaftStateError) -> None:
        load.errors[type(err).__name__] = load.errors.get(type(err).__name__, 0) + 1

    async def heartbeat(i: int) -> None:
        d = i % s.devices
        client, device_id = clients[d % len(clients)], ids[d]
        seq = client.next_seq(device_id)
        reported = {"i": str(i)}
        op = history.invoke_write(f"hb{i}", device_id, seq, reported)
        start = time.perf_counter()
        try:
            ack = await client.heartbeat(device_id, reported, seq=seq)
        except RaftStateError as err:
            history.fail(op)
            load.failures += 1
            note_error(err)
            return
        ms = (time.perf_counter() - start) * 1000
        if ack.duplicate and ack.stored_seq != seq:
            # Acked, but another of this device's heartbeats (open loop: they
            # overlap) is stored: this one may have been applied by an earlier
            # attempt before it, or never. Unknown outcome, not "changed nothing".
            history.fail(op)
            load.ambiguous += 1
        else:
            history.ok(op, WriteResult(False, ack.stored_seq, ack.revision))
        load.hb_ms.append(ms)
        load.acked.append((device_id, seq))
        if ms <= s.deadline_s * 1000:
            load.acked_in_deadline += 1

    async def read(j: int) -> None:
        d = (j * 7) % s.devices
        client, device_id = clients[j % len(clients)], ids[d]
        op = history.invoke_read(f"rd{j}", device_id)
        start = time.perf_counter()
        try:
            dev = await client.get(device_id, Consistency.LINEARIZABLE, deadline_s=2.0)
        except NotFound:
            history.ok(op, ReadResult.not_found())
        except RaftStateError as err:
            history.fail(op)
            note_error(err)
            return
        else:
            history.ok(op, ReadResult(DeviceValue.of(dev.seq, dict(dev.reported))))
        load.read_ms.append((time.perf_counter() - start) * 1000)

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    next_read, next_report = 0, 1.0
    try:
        while load.attempted < s.heartbeats:
            now = loop.time() - t0
            while load.attempted < s.heartbeats and load.attempted / s.rate <= now:
                spawn(heartbeat(load.attempted))
                load.attempted += 1
            while s.read_rate > 0 and next_read / s.read_rate <= now:
                spawn(read(next_read))
                next_read += 1
                load.reads += 1
            if now >= next_report:
                next_report += 5.0
                print(
                    f"   {name}: {load.attempted}/{s.heartbeats} sent, "
                    f"{len(load.hb_ms)} acked, {load.failures} failed, "
                    f"{len(tasks)} in flight",
                    flush=True,
                )
            await asyncio.sleep(min(1 / s.rate, 0.01))
        if tasks:
            await asyncio.wait(set(tasks))
    finally:
        for c in clients:
            await c.close()
    return load


def _applied(cc: ChaosCluster) -> str:
    """Each node's role and last applied index, for a convergence failure."""
    parts = []
    for node_id in cc.nodes.nodes:
        st = cc.nodes.status(node_id)
        parts.append(
            f"{node_id} unreachable"
            if st is None
            else f"{node_id} role {st.role} term {st.term} applied {st.last_applied}"
        )
    return ", ".join(parts)


def _cdf(samples: list[float], points: int = 200) -> tuple[tuple[float, float], ...]:
    s = sorted(samples)
    if not s:
        return ()
    idx = sorted({min(len(s) - 1, math.ceil(q * len(s) / points)) for q in range(points + 1)})
    return tuple((round(s[i], 3), round((i + 1) / len(s), 5)) for i in idx)


def run_profile(
    name: str, s: BenchSettings, workdir: Path, failures: Path | None = None
) -> ProfileResult:
    """Run one profile end to end on a fresh cluster. Raises ``ProfileError``
    for an unknown profile, ``RuntimeError``/``TimeoutError`` if the cluster
    does not start. If verification fails, the recorded history and the node
    logs are saved as ``{failures}-history.json`` and ``{failures}-n1.log``..."""
    profile = load_profile(name)
    notes: list[str] = []
    if profile.schedule:
        notes.append("outage schedule played from the start of the load, ended (healed) with it")
    with new_cluster(workdir / f"{name}-{s.transport}", s.transport) as cc:
        cc.apply(profile)
        if isinstance(cc, TcpChaosCluster) and cc.skipped:
            notes.append(
                f"tcp: node toxics not applicable to a byte stream: {', '.join(cc.skipped)}"
            )
        cc.nodes.wait_for_leader(30)
        history = History()
        schedule: threading.Thread | None = None
        stop = threading.Event()
        if profile.schedule:
            schedule = threading.Thread(target=cc.run_schedule, args=(profile, stop), daemon=True)
            schedule.start()
        started = time.monotonic()
        load = asyncio.run(_drive(cc.endpoints, s, history, name))
        load_s = time.monotonic() - started
        stop.set()
        if schedule is not None:
            schedule.join()
        acked_max: dict[str, int] = {}
        for device_id, seq in load.acked:
            acked_max[device_id] = max(acked_max.get(device_id, 0), seq)
        try:
            verdict = verify(cc.node_endpoints, acked_max, history, timeout_s=60)
            need = cc.size
        except TimeoutError:
            lin = check(history)
            problems = [f"nodes did not converge within 60 s after the load: {_applied(cc)}"]
            problems += [] if lin.ok else [f"history is not linearizable ({lin.verdict.name})"]
            verdict = Verdict(False, tuple(problems), lin, 0, 0)
            need = cc.size // 2 + 1
            notes.append("not converged: lost acked = acked heartbeats missing on a majority")
        tables = [node_table(e) for e in cc.node_endpoints]
        lost = sum(
            1
            for device_id, seq in load.acked
            if sum(t.get(device_id, (0,))[0] >= seq for t in tables) < need
        )
        if not verdict.ok:
            notes.append(verdict.explain())
            if failures is not None:
                Path(f"{failures}-history.json").write_text(history.to_json())
                for node_id, text in cc.nodes.logs():
                    Path(f"{failures}-{node_id}.log").write_text(text)
                notes.append(f"history and node logs saved as {failures}-*")
    if load.ambiguous:
        notes.append(
            f"{load.ambiguous} acks answered 'duplicate' with a newer seq stored: recorded as "
            "unknown outcome for the linearizability check"
        )
    if load.errors:
        notes.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(load.errors.items())))
    return ProfileResult(
        profile=name,
        transport=s.transport,
        attempted=load.attempted,
        acked=len(load.acked),
        success_rate=load.acked_in_deadline / load.attempted if load.attempted else math.nan,
        heartbeat_ms=LatencySummary.of(load.hb_ms),
        reads_attempted=load.reads,
        read_ms=LatencySummary.of(load.read_ms),
        lost_acked=lost,
        linearizable=None if verdict.lin is None else verdict.lin.ok,
        verifier_ok=verdict.ok,
        problems=verdict.problems,
        load_s=round(load_s, 2),
        notes=tuple(notes),
        cdf=_cdf(load.hb_ms),
    )


_COLUMNS = tuple(
    "profile|hb sent|success|hb p50|hb p99|hb p99.9|hb max|read p50|read p99|lost acked"
    "|linearizable|load s".split("|")
)


def _row(r: ProfileResult) -> tuple[str, ...]:
    def ms(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    lin = "n/a" if r.linearizable is None else ("yes" if r.linearizable else "NO")
    hb, rd = r.heartbeat_ms, r.read_ms
    latencies = [ms(v) for v in (hb.p50, hb.p99, hb.p999, hb.max, rd.p50, rd.p99)]
    label = f"{r.profile}/{r.transport}"
    return (
        label,
        str(r.attempted),
        f"{r.success_rate:.4f}",
        *latencies,
        str(r.lost_acked),
        lin,
        f"{r.load_s:.0f}",
    )


def render_table(results: list[ProfileResult]) -> str:
    """A fixed-width table, one row per profile; latencies in ms."""
    rows = [_COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def render_markdown(results: list[ProfileResult]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines) + "\n\nLatencies in ms, as the device sees them (retries included).\n"


def plot_cdf(results: list[ProfileResult], path: Path) -> str:
    """Draw every profile's heartbeat latency CDF into ``path``; return what happened."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "plot skipped: matplotlib not installed"
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r.cdf:
            ax.plot(
                [p[0] for p in r.cdf], [p[1] for p in r.cdf], label=f"{r.profile}/{r.transport}"
            )
    ax.set_xscale("log")
    ax.set_xlabel("heartbeat ack latency (ms, log)")
    ax.set_ylabel("fraction of acked heartbeats")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"plot saved {path.resolve()}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``raftstate chaos bench``'s flags to ``p``."""
    d = BenchSettings()
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="NAME",
        help="a profile of chaos/profiles.toml (repeat for several)",
    )
    p.add_argument("--heartbeats", type=int, default=d.heartbeats, help="to attempt per profile")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--rate", type=float, default=d.rate, help="heartbeats/s offered in total")
    p.add_argument(
        "--read-rate",
        type=float,
        default=d.read_rate,
        help="linearizable reads/s offered in total (0: none)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=d.deadline_s,
        help="seconds per device call, retries included",
    )
    p.add_argument(
        "--transport",
        choices=["udp", "tcp"],
        default=d.transport,
        help="node links: our UDP transport (every toxic) or pysyncobj's TCP "
        "(latency/bandwidth toxics only)",
    )
    p.add_argument("--out", default="bench-results", help="directory for JSON/Markdown/PNG")


def bench_main(args: argparse.Namespace) -> int:
    """The ``raftstate chaos bench`` command. Returns the exit status."""
    if args.heartbeats < 1 or args.devices < 1 or args.rate <= 0 or args.deadline <= 0:
        print(
            "raftstate chaos bench: --heartbeats/--devices/--rate/--deadline must be > 0",
            file=sys.stderr,
        )
        return 2
    for name in args.profile:
        try:
            load_profile(name)
        except ProfileError as err:
            print(f"raftstate chaos bench: {err}", file=sys.stderr)
            return 2
    s = BenchSettings(
        args.heartbeats, args.devices, args.rate, args.read_rate, args.deadline, args.transport
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(
        f"== {s.heartbeats} heartbeats per profile at {s.rate:g}/s from {s.devices} devices, "
        f"{s.read_rate:g} linearizable reads/s, deadline {s.deadline_s:g}s, "
        f"node transport {s.transport}; {os.cpu_count()} cpus shared by nodes, proxy and load",
        flush=True,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    results: list[ProfileResult] = []
    with tempfile.TemporaryDirectory(prefix="raftstate-chaos-bench-") as tmp:
        for name in args.profile:
            if s.transport == "tcp" and load_profile(name).schedule:
                print(
                    f"== {name}: SKIPPED with --transport tcp: its outage schedule isolates "
                    "one node, which one TCP proxy per node cannot do (use udp)",
                    flush=True,
                )
                continue
            print(f"== {name}: starting cluster", flush=True)
            r = run_profile(name, s, Path(tmp), out / f"chaos-bench-{stamp}-{name}")
            results.append(r)
            print(render_table([r]).splitlines()[-1], flush=True)
            for line in r.notes:
                print(f"   {line}", flush=True)
    if not results:
        print("raftstate chaos bench: nothing ran", file=sys.stderr)
        return 2
    table = render_table(results)
    print()
    print(table)
    plot = plot_cdf(results, out / f"chaos-bench-{stamp}.png")
    print(plot)
    record = {
        "command": shlex.join(["raftstate", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "settings": asdict(s),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": [asdict(r) for r in results],
        "plot": plot,
    }
    json_path = out / f"chaos-bench-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2))
    (out / f"chaos-bench-{stamp}.md").write_text(render_markdown(results))
    bad = [r for r in results if r.lost_acked or not r.verifier_ok]
    print(
        f"saved {json_path.resolve()} (+ .md)\n{len(results)} profile(s) in "
        f"{time.time() - started:.0f}s, "
        + (f"{len(bad)} FAILED verification" if bad else "0 lost acked, all verified")
    )
    return 1 if bad else 0
