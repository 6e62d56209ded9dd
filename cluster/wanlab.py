"""The WAN half of the NAT lab: the public namespace routes every site's packets
through the userspace WAN emulator (:mod:`chaos.wan`).

Theory of operation (``X`` is the lab's ``10.X.0.0/16``, ``i`` a site)::

    router {p}-r{i}: wan 10.X.0.(10+i)/32 ──veth── r{i} ┐  public ns {p}-pub
                                                         │  ip rule iif r{i}        → table 100
    root ns: {p}-h 10.X.0.2/29 ──veth── h0 10.X.0.1/29 ──┤  ip rule iif lo to <router> → table 100
      (coturn, rendezvous listen on 10.X.0.1)            │  table 100: default dev wan0 (TUN)
                                                         └─ python -m chaos.wan reads wan0

1. Each router's ``wan`` veth is a point-to-point link into the public
   namespace: the router holds its public address as a /32 with the public
   address ``10.X.0.1`` as its peer; both ends have fixed MAC addresses and
   permanent neighbour entries, so no ARP crosses the link (ARP for a
   policy-routed address would otherwise need proxy ARP).
2. Policy routing in the public namespace sends every packet that arrives from
   a router (``iif r{i}``), and every packet the namespace itself sends to a
   router (``iif lo to <router>``: coturn's answers and relayed data, the
   rendezvous), into table 100, whose only route is ``default dev wan0``. The
   ``local`` rule moves from preference 0 to 1000 so that packets *to*
   ``10.X.0.1`` take the detour too.
3. The emulator reads each packet from ``wan0``, classifies it by address
   (``s{i}``: the router's /32 and the site LAN; ``pub``: ``10.X.0.1``), holds
   it as the direction's :class:`~chaos.wan.Impairment` says and writes it
   back into ``wan0``. Written back, it arrives *from* ``wan0``, matches no
   policy rule and is routed by the main table (out ``r{j}``, or delivered
   locally). ``rp_filter`` is off and ``wan0`` accepts local source
   addresses, since the public namespace's own packets come back that way.
   Early demux is off: it would attach a local socket (coturn's, the
   rendezvous's) to a packet from a router before routing, and the kernel
   never forwards a packet that has a socket, so it could not reach ``wan0``.
4. The root namespace (the test harness) reaches ``10.X.0.0/24`` via
   ``10.X.0.1``; a rule for its address (preference 10, main table) keeps its
   traffic away from the emulator, so harness access is never impaired.
5. Anything else (an unroutable relay peer) leaves by the default route via
   ``10.X.0.6`` on the root link, whose permanent neighbour entry holds a MAC
   nobody has, so it is dropped silently: coturn drops an allocation whenever
   a send fails with ``ENETUNREACH``.

The emulator runs under ``SCHED_FIFO`` where the host allows it: it is the
one timing-critical process, and on a small host busy nodes would otherwise
add their scheduling delay to every emulated one. It is controlled through
:class:`~cluster.wancontrol.WanControl` (JSON over UDP on ``127.0.0.1``
inside the public namespace, no subprocess per request).

Relayed paths cross two legs (site → pub → site). :func:`plan_profile`
splits a profile's node-link impairment over the two legs by default
(``pub_legs="split"``: half the delay and jitter, and per-leg loss,
duplication and reordering so that two legs compound to the profile's), so a
TURN-relayed pair sees what a direct pair sees and transports compare on
equal paths; ``pub_legs="full"`` puts the whole profile on each leg, as for a
TURN server far from both sites.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from chaos.profiles import Profile
from chaos.wan import Impairment
from cluster.natrules import SINK_MAC
from cluster.wancontrol import WanControl, WanStats

__all__ = [
    "PUB",
    "WAN_DEV",
    "WanEmulator",
    "node_link_impairment",
    "plan_profile",
    "render_public_routing",
    "site_name",
    "split_leg",
]

PUB = "pub"
"""The emulator's name for the public services (coturn, the rendezvous)."""
WAN_DEV = "wan0"
WAN_TABLE = 100
_PUB_LEGS = ("split", "full")
_READY_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 3.0
_RT_PRIORITY = 10


def site_name(i: int) -> str:
    """The emulator's name for site ``i``: ``"s{i}"``."""
    return f"s{i}"


# --- profiles -> impairments (pure) --------------------------------------------


def node_link_impairment(profile: Profile) -> Impairment:
    """The one-way impairment of a profile's ``node`` section (``latency``,
    ``packet_loss``, ``duplicate``, ``reorder``, ``bandwidth``; units as in
    ``chaos/profiles.toml``: one-way ms, fractions, KB/s with 1 KB = 1000 B).
    Several toxics of one type add up, as they do in the proxy. Pure."""
    values: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        values[key] = values.get(key, 0.0) + value

    for toxic in profile.node:
        attrs = toxic.attribute_map()
        if toxic.type == "latency":
            add("delay_ms", attrs.get("latency", 0.0))
            add("jitter_ms", attrs.get("jitter", 0.0))
        elif toxic.type == "packet_loss":
            values["loss"] = attrs.get("loss_rate", 0.0)
            values["loss_correlation"] = attrs.get("correlation", 0.0)
        elif toxic.type == "duplicate":
            values["duplicate"] = attrs.get("probability", 0.0)
        elif toxic.type == "reorder":
            values["reorder"] = attrs.get("probability", 0.0)
            values["reorder_extra_ms"] = attrs.get("delay", 0.0)
        elif toxic.type == "bandwidth":
            values["rate_kbit"] = attrs.get("rate", 0.0) * 8.0
    return Impairment.from_mapping(values)


def split_leg(end_to_end: Impairment, legs: int) -> Impairment:
    """The impairment of each of ``legs`` legs in series that add up to
    ``end_to_end``: delay, jitter range and reorder hold-back divide; loss,
    duplication and reordering compound (``1 - (1 - p) ** (1 / legs)``); the
    rate and loss correlation stay. Pure."""
    if legs < 1:
        raise ValueError(f"legs must be at least 1, got {legs}")

    def per_leg(p: float) -> float:
        return 1.0 - (1.0 - p) ** (1.0 / legs) if p < 1.0 else 1.0

    return replace(
        end_to_end,
        delay_ms=end_to_end.delay_ms / legs,
        jitter_ms=end_to_end.jitter_ms / legs,
        reorder_extra_ms=end_to_end.reorder_extra_ms / legs,
        loss=per_leg(end_to_end.loss),
        duplicate=per_leg(end_to_end.duplicate),
        reorder=per_leg(end_to_end.reorder),
    )


def plan_profile(
    profile: Profile, n_sites: int, *, pub_legs: str = "split"
) -> dict[tuple[str, str], Impairment]:
    """Every direction's impairment for ``profile``: each ordered pair of
    sites gets the node-link impairment, each site <-> ``pub`` direction gets
    it split over two legs (``"split"``) or whole (``"full"``); see the module
    doc. Outage schedules are not part of it. Raises ``ValueError``. Pure."""
    if pub_legs not in _PUB_LEGS:
        raise ValueError(f"pub_legs must be one of {_PUB_LEGS}, got {pub_legs!r}")
    direct = node_link_impairment(profile)
    leg = split_leg(direct, 2) if pub_legs == "split" else direct
    sites = [site_name(i) for i in range(1, n_sites + 1)]
    plan = {(a, b): direct for a in sites for b in sites if a != b}
    for s in sites:
        plan[(s, PUB)] = plan[(PUB, s)] = leg
    return plan


# --- routing (pure) ------------------------------------------------------------


def render_public_routing(
    public_ip: str, host_ip: str, sink: str, routers: Sequence[tuple[str, str, str]]
) -> list[str]:
    """``ip -batch`` lines that wire the public namespace for the WAN lab
    (module doc, steps 1-5; the sysctls are the caller's). ``routers`` holds
    ``(public-side ifname, router address, router MAC)``; ``sink`` is an
    unused address of the root link (``h0``, a /29). The veths must exist.
    Pure."""
    lines = [
        "link set lo up",
        f"tuntap add dev {WAN_DEV} mode tun",
        f"link set {WAN_DEV} up",
        f"addr add {public_ip}/29 dev h0",
        "link set h0 up",
        f"neigh add {sink} lladdr {SINK_MAC} dev h0 nud permanent",
        f"route add default via {sink}",
        f"route add default dev {WAN_DEV} table {WAN_TABLE}",
        f"rule add to {host_ip} lookup main pref 10",
    ]
    for n, (ifname, address, mac) in enumerate(routers):
        lines += [
            f"link set {ifname} up",
            f"neigh add {address} lladdr {mac} dev {ifname} nud permanent",
            f"route add {address}/32 dev {ifname} src {public_ip}",
            f"rule add iif {ifname} lookup {WAN_TABLE} pref {100 + 2 * n}",
            f"rule add iif lo to {address} lookup {WAN_TABLE} pref {101 + 2 * n}",
        ]
    return [*lines, "rule add lookup local pref 1000", "rule del pref 0 lookup local"]


# --- the emulator process ------------------------------------------------------


class WanEmulator:
    """One ``python -m chaos.wan`` process inside a namespace, and the
    impairments it should apply.

    ``start()`` returns once the emulator has attached to the TUN device and
    bound its control port (its ready line, read from ``log_path``). The
    wanted impairment of each direction is kept here, so a blackhole can be
    laid over it and lifted again. Methods that talk to the emulator raise
    ``OSError`` if it does not answer and ``RuntimeError`` if it is not
    running. Not thread-safe."""

    def __init__(self, netns: str, sites: Mapping[str, Sequence[str]], log_path: Path) -> None:
        self.netns = netns
        self.sites = {name: tuple(cidrs) for name, cidrs in sites.items()}
        self.log_path = log_path
        self.control_port: int | None = None
        self.realtime = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: WanControl | None = None
        self._plan: dict[tuple[str, str], Impairment] = {}
        self._blackholed: set[str] = set()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def sites_arg(self) -> str:
        """The ``--sites`` value, e.g. ``s1=10.9.0.11/32,s1=10.9.1.0/24,pub=10.9.0.1/32``."""
        return ",".join(f"{name}={cidr}" for name, cidrs in self.sites.items() for cidr in cidrs)

    def start(
        self, *, detach: bool = False, seed: int | None = None, realtime: bool = True
    ) -> None:
        """Start and wait until ready. ``detach``: its own session, so it
        outlives this process's terminal. ``realtime``: run it under
        ``SCHED_FIFO`` (priority 10) if the host allows, so busy node
        processes on the same cores cannot add their scheduling delay to the
        emulated one (:attr:`realtime` says whether it took). Raises
        ``RuntimeError`` (with the log's tail) if it exits or is not ready
        within 10 s."""
        if self._proc is not None:
            raise RuntimeError("the WAN emulator is already running")
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "chaos.wan",
                "--dev", WAN_DEV, "--sites", self.sites_arg(),
                "--control", "127.0.0.1:0"]  # fmt: skip
        if seed is not None:
            argv += ["--seed", str(seed)]
        repo = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path}, start_new_session=detach,
            )  # fmt: skip
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            ready = _ready_line(self.log_path)
            if ready is not None:
                self.control_port = int(str(ready["control"]).rpartition(":")[2])
                if realtime:
                    self.realtime = _make_realtime(self._proc.pid)
                return
            code = self._proc.poll()
            if code is not None or time.monotonic() >= deadline:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                self.stop()
                state = f"exited with status {code}" if code is not None else "was not ready"
                raise RuntimeError(f"the WAN emulator {state}; its log says:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (it logs a summary), SIGKILL after 3 s. Idempotent."""
        if self._control is not None:
            self._control.close()
            self._control = None
        proc, self._proc = self._proc, None
        self.control_port = None
        self.realtime = False
        self._plan.clear()
        self._blackholed.clear()
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def impair(self, directions: Iterable[tuple[str, str]], impairment: Impairment) -> None:
        """Set ``impairment`` on each ``(src, dst)`` direction."""
        directions = list(directions)
        for direction in directions:
            self._plan[direction] = impairment
        self._push(directions)

    def apply_plan(self, plan: Mapping[tuple[str, str], Impairment]) -> None:
        """Replace every wanted impairment with ``plan`` (unlisted directions
        become perfect links); blackholes stay."""
        old = set(self._plan)
        self._plan = dict(plan)
        self._push(sorted(old | set(plan)))

    def blackhole(self, site: str) -> None:
        """Drop every packet to and from ``site``."""
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        self._blackholed.add(site)
        self._push(self._directions_of(site))

    def heal(self) -> None:
        """Lift every blackhole; the wanted impairments apply again."""
        healed, self._blackholed = self._blackholed, set()
        self._push([d for site in sorted(healed) for d in self._directions_of(site)])

    def stats(self) -> WanStats:
        return self._client().stats()

    def _directions_of(self, site: str) -> list[tuple[str, str]]:
        others = [name for name in self.sites if name != site]
        return [d for other in others for d in ((site, other), (other, site))]

    def _client(self) -> WanControl:
        if self._control is None:
            if self.control_port is None:
                raise RuntimeError("the WAN emulator is not running")
            self._control = WanControl(self.netns, self.control_port)
        return self._control

    def _push(self, directions: Iterable[tuple[str, str]]) -> None:
        """Send each direction's wanted impairment, blackholed if an end is."""
        control = self._client()
        for src, dst in directions:
            impairment = self._plan.get((src, dst), Impairment())
            if src in self._blackholed or dst in self._blackholed:
                impairment = replace(impairment, blackhole=True)
            control.set(src, dst, impairment)


def _make_realtime(pid: int) -> bool:
    """Put ``pid`` under ``SCHED_FIFO`` at :data:`_RT_PRIORITY`; whether it took.
    Measured on a two-core host at load 12: ping through a 20 ms-each-way
    link had p99 48 ms under the normal scheduler and 40.7 ms under FIFO. The
    kernel's RT throttling still leaves other tasks 5 % of each core."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))
    except OSError:
        return False
    return True


def _ready_line(log_path: Path) -> dict[str, object] | None:
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("{") and '"ready"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "ready" and "control" in event:
                return event
    return None
