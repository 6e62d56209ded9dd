"""NatLab: sites behind real NATs, a public namespace with coturn, and a WAN between them.

Why: raftstate nodes sit behind their sites' NATs and meet through ICE (RFC
8445), STUN (RFC 8489) and TURN (RFC 8656); this lab gives them real NAT
mappings, filtering and relaying, in network namespaces, and (``wan=True``,
the default) a WAN with per-direction delay, jitter, loss and rate between
every site and the public services.

Topology (``X`` is a random free ``10.X.0.0/16``, ``i`` = 1..n, ``p`` the prefix)::

    root ns: {p}-h 10.X.0.2 ── h0 10.X.0.1: public ns {p}-pub (coturn on 10.X.0.1:3478)
                                  │ wan=True: point-to-point r{i}, routed through the
                                  │           WAN emulator (see cluster/wanlab.py)
                                  │ wan=False: one bridge br0 10.X.0.1/24 (no emulation)
    router ns {p}-r{i}: wan 10.X.0.(10+i), NAT; lan bridge 10.X.i.1/24
         ├── node ns   {p}-n{i}: eth0 10.X.i.2/24
         └── device ns {p}-d{i}: eth0 10.X.i.3/24 (device load generators)

Theory of operation:

1. ``up()`` (which registers ``down()`` with ``atexit`` unless ``detach``)
   creates namespaces and veths, each end directly in its final namespace
   (only ``{p}-h`` lives in the root one). IPv6 is off in the lab, so ICE
   gathers IPv4 candidates only, and so is ``br_netfilter`` for the bridges.
2. Under the host lock shared with ``NetnsLab`` it picks a ``10.X.0.0/16`` that
   overlaps no root route. The root namespace reaches the public addresses
   ``10.X.0.0/24`` (coturn and every router's public side), never a site LAN.
   A datagram to an unroutable peer vanishes in the public namespace instead
   of failing with ``ENETUNREACH`` (which makes coturn drop the allocation
   that sent it).
3. A router's nftables table (:func:`~cluster.natrules.render_router_ruleset`)
   masquerades out of ``wan``: plainly for ``cone``, ``fully-random`` for
   ``symmetric``; it admits established flows and port forwards only, and
   hairpins port forwards for its own LAN.
4. With ``wan=True`` the public namespace forwards between the routers and
   policy-routes everything from a router, and everything it sends to one,
   through the TUN device ``wan0`` of a ``python -m chaos.wan`` process
   that the lab starts there (:mod:`cluster.wanlab`). The root namespace's
   traffic bypasses it.
5. coturn runs in the public namespace with generated long-term credentials,
   no TLS/DTLS/CLI, relay ports :data:`RELAY_PORTS` and the lab's /16 allowed
   as peers; ``up()`` returns once it answers a STUN Binding request.
6. ``down()`` stops coturn and the emulator, kills what still runs in the lab,
   deletes ``{p}-h`` (and its routes), the namespaces (and the other links)
   and a temporary work directory. It is idempotent and safe after a partial
   ``up()``, also from another process (``NatLab(kinds, prefix).down()``).

Nothing here is thread-safe: drive one lab from one thread.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from chaos.profiles import DEFAULT_PROFILES, Profile, load_profile
from chaos.wan import Impairment
from cluster.coturn import RELAY_PORTS, STUN_PORT, Coturn
from cluster.natrules import (
    ConntrackEntry,
    NatKind,
    bridge_public_commands,
    endpoint_commands,
    parse_conntrack,
    render_router_ruleset,
    router_commands,
    wan_macs,
)
from cluster.netns import (
    _MAX_PREFIX_LEN,
    LabError,
    _host_lock,
    _link_exists,
    _netns_names,
    _root_routes,
    _run,
    kill_inside,
    pick_subnet,
)
from cluster.netns import available as _netns_available
from cluster.wancontrol import WanStats
from cluster.wanlab import (
    PUB,
    WAN_DEV,
    WanEmulator,
    plan_profile,
    render_public_routing,
    site_name,
)

__all__ = [
    "CONE_REMAP_PORTS",
    "RELAY_PORTS",
    "STUN_PORT",
    "ConntrackEntry",
    "NatKind",
    "NatLab",
    "available",
    "parse_conntrack",
    "render_router_ruleset",
]

CONE_REMAP_PORTS = ((20000, 29999), (30000, 39999))
""":meth:`NatLab.remap` moves a cone router's mappings into these ranges in turn."""
_BRIDGE_NF = ("arptables", "iptables", "ip6tables")
_MAX_SITES = 200
_NO_IPV6 = {f"net/ipv6/conf/{c}/disable_ipv6": 1 for c in ("all", "default")}


def available() -> str | None:
    """``None`` if a NAT lab (with its WAN) can run here, else the reason it
    cannot (for ``pytest.skip``). Never raises."""
    reason = _netns_available()
    if reason is not None:
        return reason
    for tool, package in (("conntrack", "conntrack"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return (
                f"`{tool}` is not installed (apt-get install {package}; see scripts/bootstrap.sh)"
            )
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (the WAN emulator needs a TUN device)"
    return None


class NatLab:
    """Sites behind NATs, a public namespace with coturn and a WAN; see the module doc.

    Site indices run from 1 to ``n_sites``. Methods other than ``up``/``down``
    raise ``LabError`` if the lab is not up or a command fails, and
    ``ValueError`` for a site index out of range. ``detach=True`` makes a lab
    that outlives this process: no ``atexit`` teardown, and coturn and the
    emulator run in their own sessions. ``workdir`` (default: a temporary
    directory that ``down()`` removes) holds coturn's and the emulator's logs."""

    def __init__(
        self,
        kinds: Iterable[NatKind | str] = ("cone", "cone", "symmetric"),
        prefix: str | None = None,
        *,
        wan: bool = True,
        detach: bool = False,
        workdir: str | Path | None = None,
    ) -> None:
        self.kinds = tuple(NatKind(k) for k in kinds)
        if not 1 <= len(self.kinds) <= _MAX_SITES:
            raise ValueError(f"a lab needs 1..{_MAX_SITES} sites, got {len(self.kinds)}")
        if prefix is None:
            prefix = "nat" + secrets.token_hex(2)
        if not (prefix.isascii() and prefix.isalnum() and prefix[0].isalpha()):
            raise ValueError(
                f"prefix must be letters and digits, starting with a letter: {prefix!r}"
            )
        if len(prefix) > _MAX_PREFIX_LEN:
            raise ValueError(f"prefix {prefix!r} is longer than {_MAX_PREFIX_LEN} characters")
        self.prefix = prefix
        self.wan = wan
        self.detach = detach
        self.turn_username = "raftstate"
        self.turn_password = secrets.token_hex(32)  # 32 random bytes, like every secret
        self.turn_realm = f"{prefix}.natlab"
        self._given_workdir = None if workdir is None else Path(workdir).resolve()
        self._subnet: ipaddress.IPv4Network | None = None
        self._forwards: dict[int, set[tuple[str, int]]] = {}
        self._remaps: dict[int, int] = {}
        self._workdir: Path | None = None
        self._turnserver: Coturn | None = None
        self._emulator: WanEmulator | None = None
        self._up = False

    # --- names and addresses -------------------------------------------------

    @property
    def n_sites(self) -> int:
        return len(self.kinds)

    @property
    def public_netns(self) -> str:
        return f"{self.prefix}-pub"

    @property
    def host_ifname(self) -> str:
        """The root-namespace end of the root<->public veth."""
        return f"{self.prefix}-h"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The lab's ``10.X.0.0/16``. Raises ``LabError`` before ``up()``."""
        if self._subnet is None:
            raise LabError("the lab is not up")
        return self._subnet

    @property
    def public_ip(self) -> str:
        """The public services' address (coturn, the rendezvous), ``10.X.0.1``."""
        return self._addr(0, 1)

    @property
    def host_ip(self) -> str:
        """The root namespace's address in the lab, ``10.X.0.2``."""
        return self._addr(0, 2)

    @property
    def stun_address(self) -> str:
        """``"10.X.0.1:3478"``: coturn, for both STUN and TURN (UDP or TCP)."""
        return f"{self.public_ip}:{STUN_PORT}"

    @property
    def workdir(self) -> Path:
        """Where coturn's and the emulator's files live while the lab is up."""
        if self._workdir is None:
            raise LabError("the lab is not up")
        return self._workdir

    @property
    def turn_log(self) -> Path:
        """coturn's log file (it lives until ``down()``)."""
        return self.workdir / "turnserver.log"

    @property
    def wan_log(self) -> Path:
        """The WAN emulator's stdout and stderr (JSON lines)."""
        return self.workdir / "wan.log"

    @property
    def turnserver_pid(self) -> int | None:
        """coturn's process id while the lab is up, else ``None``."""
        return None if self._turnserver is None else self._turnserver.pid

    @property
    def wan_pid(self) -> int | None:
        """The WAN emulator's process id while the lab is up, else ``None``."""
        return None if self._emulator is None else self._emulator.pid

    @property
    def wan_realtime(self) -> bool:
        """Whether the WAN emulator runs under ``SCHED_FIFO`` (see :mod:`cluster.wanlab`)."""
        return self._emulator is not None and self._emulator.realtime

    @property
    def wan_control_port(self) -> int | None:
        """The emulator's control port on ``127.0.0.1`` inside the public namespace."""
        return None if self._emulator is None else self._emulator.control_port

    def netns(self, i: int) -> str:
        """Name of site ``i``'s node namespace (valid before ``up()``)."""
        self._check_site(i)
        return f"{self.prefix}-n{i}"

    def router_netns(self, i: int) -> str:
        """Name of site ``i``'s router namespace (valid before ``up()``)."""
        self._check_site(i)
        return f"{self.prefix}-r{i}"

    def device_netns(self, i: int) -> str:
        """Name of site ``i``'s device namespace (valid before ``up()``)."""
        self._check_site(i)
        return f"{self.prefix}-d{i}"

    def node_ip(self, i: int) -> str:
        """Site ``i``'s node address, ``10.X.i.2`` (private: unroutable elsewhere)."""
        self._check_site(i)
        return self._addr(i, 2)

    def device_ip(self, i: int) -> str:
        """Site ``i``'s device address, ``10.X.i.3``, on the node's LAN."""
        self._check_site(i)
        return self._addr(i, 3)

    def router_public_ip(self, i: int) -> str:
        """Site ``i``'s router WAN address, ``10.X.0.(10+i)``: its NAT's public side."""
        self._check_site(i)
        return self._addr(0, 10 + i)

    def lan(self, i: int) -> ipaddress.IPv4Network:
        """Site ``i``'s LAN, ``10.X.i.0/24``."""
        self._check_site(i)
        return ipaddress.IPv4Network(f"{self._addr(i, 0)}/24")

    def site_name(self, i: int) -> str:
        """Site ``i``'s name in the WAN emulator, ``"s{i}"``; the public
        services are ``"pub"``."""
        self._check_site(i)
        return site_name(i)

    def exec_prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command inside site ``i``'s node namespace."""
        return ["ip", "netns", "exec", self.netns(i)]

    def device_exec_prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command inside site ``i``'s device namespace."""
        return ["ip", "netns", "exec", self.device_netns(i)]

    def public_exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command in the public namespace (it may bind
        ``10.X.0.1`` on any port but 3478 and :data:`RELAY_PORTS`)."""
        return ["ip", "netns", "exec", self.public_netns]

    def all_netns(self) -> list[str]:
        """Every namespace the lab makes (valid before ``up()``)."""
        sites = self._sites()
        return [
            self.public_netns,
            *(self.router_netns(i) for i in sites),
            *(self.netns(i) for i in sites),
            *(self.device_netns(i) for i in sites),
        ]

    # --- lifecycle -----------------------------------------------------------

    def up(self) -> None:
        """Build the lab, start the WAN emulator (``wan=True``) and coturn.
        Raises ``LabError`` if a command fails or a server does not start
        (after undoing what was built), or if a namespace or link with this
        prefix already exists (touching nothing; a stale lab is removed with
        ``NatLab(kinds, prefix).down()``)."""
        if self._up:
            raise LabError(f"lab {self.prefix} is already up")
        in_use = sorted(set(_netns_names()) & set(self.all_netns()))
        if _link_exists(self.host_ifname):
            in_use.append(f"link {self.host_ifname}")
        if in_use:
            raise LabError(f"prefix {self.prefix!r} is in use: {', '.join(in_use)}")
        if not self.detach:
            atexit.register(self.down)
        try:
            if self._given_workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            else:
                self._workdir = self._given_workdir
                self._workdir.mkdir(parents=True, exist_ok=True)
            self._build()
            if self.wan:
                self._start_wan()
            self._start_turnserver()
        except BaseException:
            try:
                self.down()
            except LabError:
                pass  # The build error is the one worth reporting.
            raise
        self._up = True

    def down(self) -> None:
        """Remove everything the lab made; idempotent. Kills processes still
        running inside the lab's namespaces. Raises ``LabError`` if a namespace
        or the root veth is still there afterwards."""
        atexit.unregister(self.down)
        self._up = False
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None
        if self._turnserver is not None:
            self._turnserver.stop()
            self._turnserver = None
        names = self.all_netns()
        present = set(_netns_names()) & set(names)
        kill_inside(present)
        if _link_exists(self.host_ifname):
            _run(["ip", "link", "del", self.host_ifname], check=False)
        for name in names:
            if name in present:
                _run(["ip", "netns", "del", name], check=False)
        leftovers = sorted(set(_netns_names()) & set(names))
        if _link_exists(self.host_ifname):
            leftovers.append(f"link {self.host_ifname}")
        if self._workdir is not None and self._given_workdir is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None
        self._subnet = None
        self._forwards.clear()
        self._remaps.clear()
        if leftovers:
            raise LabError(f"lab {self.prefix} left behind: {', '.join(leftovers)}")

    def __enter__(self) -> NatLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # --- NAT operations ------------------------------------------------------

    def port_forward(self, i: int, proto: str, port: int) -> None:
        """DNAT ``router_public_ip(i):port`` to ``node_ip(i):port`` for ``proto``
        (``"tcp"`` or ``"udp"``), from the WAN side (the root namespace, other
        sites) and, hairpinned, from site ``i``'s own LAN. Adding the same
        forward twice is harmless."""
        self._require_up()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', got {proto!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port}")
        forwards = self._forwards.get(i, set()) | {(proto, port)}
        self._load_ruleset(i, forwards)
        self._forwards[i] = forwards

    def flush_conntrack(self, i: int, proto: str | None = None) -> None:
        """Forget site ``i``'s router conntrack flows (only ``proto``'s, e.g.
        ``"udp"``, if given): every NAT mapping and hole, as when a NAT reboots.
        A symmetric router maps the next flow to a new port, which also breaks
        its TCP connections mid-stream; a cone router keeps ports, but drops
        inbound packets until the node sends again."""
        self._require_up()
        if proto is None:
            self._router_run(i, ["conntrack", "-F"])
            return
        cmd = ["ip", "netns", "exec", self.router_netns(i), "conntrack", "-D", "-p", proto]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0 and " 0 flow entries" not in res.stderr:  # exit 1: none found
            raise LabError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")

    def remap(self, i: int) -> tuple[int, int] | None:
        """Give site ``i``'s NAT new external ports mid-run, then forget every
        flow (:meth:`flush_conntrack`). A symmetric router picks new random
        ports anyway. A cone router switches its masquerade to the next range
        of :data:`CONE_REMAP_PORTS` (alternating, so every mapping moves); it
        stays endpoint-independent (Linux reuses a source's mapping for its
        later flows). Returns the cone router's range now in use, else
        ``None``. Established TCP flows through the router break, as when a
        real NAT reboots."""
        self._require_up()
        ports = None
        if self.kinds[i - 1] is NatKind.CONE:
            self._remaps[i] = self._remaps.get(i, 0) + 1
            ports = self._cone_ports(i)
            self._load_ruleset(i, self._forwards.get(i, set()))
        self.flush_conntrack(i)
        return ports

    def conntrack_entries(self, i: int, proto: str | None = None) -> list[ConntrackEntry]:
        """Site ``i``'s router conntrack flows, optionally only ``proto``'s."""
        self._require_up()
        extra = [] if proto is None else ["-p", proto]
        return parse_conntrack(self._router_run(i, ["conntrack", "-L", *extra]))

    def ruleset(self, i: int) -> str:
        """Site ``i``'s router nftables table, as ``nft list`` prints it."""
        self._require_up()
        return self._router_run(i, ["nft", "list", "table", "ip", "natlab"])

    # --- WAN operations (wan=True) -------------------------------------------

    def impair(
        self, src: int | str, dst: int | str, *, both: bool = False, **fields: float
    ) -> None:
        """Replace the impairment of the direction ``src`` -> ``dst`` (and back
        if ``both``). Ends are site indices or ``"pub"``; ``fields`` are
        :class:`~chaos.wan.Impairment` fields (``delay_ms``, ``jitter_ms``,
        ``loss``, ``loss_correlation``, ``duplicate``, ``reorder``,
        ``reorder_extra_ms``, ``rate_kbit``, ``queue_limit_ms``); none means a
        perfect link. Raises ``ValueError`` (``ImpairmentError``) for a bad
        field or end, ``OSError`` if the emulator does not answer."""
        a, b = self._wan_end(src), self._wan_end(dst)
        if a == b:
            raise ValueError(f"src and dst are the same ({src!r})")
        directions = [(a, b), (b, a)] if both else [(a, b)]
        self._wan().impair(directions, Impairment.from_mapping(fields))

    def impair_profile(
        self, name: str, *, pub_legs: str = "split", path: str | Path = DEFAULT_PROFILES
    ) -> Profile:
        """Apply profile ``name``'s node-link impairment to every site <-> site
        direction and, split over the two legs of a relayed path (or whole,
        ``pub_legs="full"``), to every site <-> pub direction; see
        :func:`cluster.wanlab.plan_profile`. Replaces every earlier
        impairment (blackholes stay). A profile's outage ``schedule`` is not
        run: use :meth:`blackhole`/:meth:`heal`. Returns the profile. Raises
        ``ProfileError`` for an unknown profile, ``OSError`` as :meth:`impair`."""
        wan = self._wan()
        profile = load_profile(name, path)
        wan.apply_plan(plan_profile(profile, self.n_sites, pub_legs=pub_legs))
        return profile

    def blackhole(self, i: int) -> None:
        """Drop every WAN packet to and from site ``i`` (other sites and the
        public services); its LAN and the root namespace's access stay."""
        self._wan().blackhole(self.site_name(i))

    def heal(self) -> None:
        """Undo every :meth:`blackhole`; impairments stay."""
        self._wan().heal()

    def wan_stats(self) -> WanStats:
        """The emulator's counters and every direction's impairment. Raises
        ``OSError`` if it does not answer."""
        return self._wan().stats()

    # --- internals -----------------------------------------------------------

    def _check_site(self, i: int) -> None:
        if not 1 <= i <= self.n_sites:
            raise ValueError(f"site index must be in 1..{self.n_sites}, got {i}")

    def _sites(self) -> range:
        return range(1, self.n_sites + 1)

    def _addr(self, third: int, fourth: int) -> str:
        return str(self.subnet.network_address + third * 256 + fourth)

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.prefix} is not up")

    def _router_run(self, i: int, cmd: list[str]) -> str:
        return _run(["ip", "netns", "exec", self.router_netns(i), *cmd])

    def _cone_ports(self, i: int) -> tuple[int, int] | None:
        n = self._remaps.get(i, 0)
        return None if n == 0 else CONE_REMAP_PORTS[(n - 1) % len(CONE_REMAP_PORTS)]

    def _load_ruleset(self, i: int, forwards: Iterable[tuple[str, int]]) -> None:
        script = render_router_ruleset(
            self.kinds[i - 1], self.node_ip(i), forwards,
            ports=self._cone_ports(i), hairpin=(self.router_public_ip(i), str(self.lan(i))),
        )  # fmt: skip
        _run(["ip", "netns", "exec", self.router_netns(i), "nft", "-f", "-"], stdin=script)

    def _wan_end(self, end: int | str) -> str:
        if end == PUB:
            return PUB
        if isinstance(end, int) and not isinstance(end, bool):
            return self.site_name(end)
        raise ValueError(f"a WAN end is a site index or {PUB!r}, got {end!r}")

    def _wan(self) -> WanEmulator:
        self._require_up()
        if self._emulator is None:
            raise LabError(f"lab {self.prefix} has no WAN emulator (it was built with wan=False)")
        return self._emulator

    def _build(self) -> None:
        pub = self.public_netns
        for ns in self.all_netns():
            _run(["ip", "netns", "add", ns])
            _set_sysctls(ns, _NO_IPV6)
        _set_sysctls(pub, {f"net/bridge/bridge-nf-call-{t}": 0 for t in _BRIDGE_NF})
        # Names are validated letters, digits and dashes, so splitting on spaces is safe.
        _run(f"ip link add {self.host_ifname} type veth peer name h0 netns {pub}".split())
        for i in self._sites():
            r = self.router_netns(i)
            _set_sysctls(r, {
                "net/ipv4/ip_forward": 1,
                # Hairpinned flows leave by the interface they came in on; a
                # redirect would send the device straight to the node.
                "net/ipv4/conf/all/send_redirects": 0,
                "net/ipv4/conf/default/send_redirects": 0,
                **{f"net/bridge/bridge-nf-call-{t}": 0 for t in _BRIDGE_NF},
            })  # fmt: skip
            if self.wan:
                mac_r, mac_p = wan_macs(i)
                peer = f"peer name r{i} address {mac_p} netns {pub}"
                _run(f"ip link add wan netns {r} address {mac_r} type veth {peer}".split())
            else:
                _run(f"ip link add wan netns {r} type veth peer name s{i} netns {pub}".split())
            for ifname, ns in (("ln", self.netns(i)), ("ld", self.device_netns(i))):
                _run(f"ip link add {ifname} netns {r} type veth peer name eth0 netns {ns}".split())
        with _host_lock():
            self._subnet = pick_subnet(random.SystemRandom(), _root_routes())
            plen = 29 if self.wan else 24
            _run(["ip", "addr", "add", f"{self.host_ip}/{plen}", "dev", self.host_ifname])
            _run(["ip", "link", "set", self.host_ifname, "up"])
        if self.wan:
            routers = [(f"r{i}", self.router_public_ip(i), wan_macs(i)[0]) for i in self._sites()]
            sink = self._addr(0, 6)
            script = {pub: render_public_routing(self.public_ip, self.host_ip, sink, routers)}
        else:
            ports = ["h0", *(f"s{i}" for i in self._sites())]
            script = {pub: bridge_public_commands(self.public_ip, self._addr(0, 254), ports)}
        for i in self._sites():
            gateway = self._addr(i, 1)
            public_mac = wan_macs(i)[1] if self.wan else None
            script[self.router_netns(i)] = router_commands(
                gateway, self.router_public_ip(i), self.public_ip, public_mac=public_mac
            )
            script[self.netns(i)] = endpoint_commands(self.node_ip(i), gateway)
            script[self.device_netns(i)] = endpoint_commands(self.device_ip(i), gateway)
        for ns, commands in script.items():
            _run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")
        if self.wan:
            # Written-back packets arrive on wan0 from the sites' (and this
            # namespace's own) addresses: no reverse-path filter, local sources ok.
            ifnames = ["all", "default", "h0", WAN_DEV, *(f"r{i}" for i in self._sites())]
            conf = {f"net/ipv4/conf/{n}/rp_filter": 0 for n in ifnames}
            conf |= {"net/ipv4/ip_forward": 1, f"net/ipv4/conf/{WAN_DEV}/accept_local": 1}
            # Early demux would tie a packet from a router to coturn's or the
            # rendezvous's socket before routing, and ip_forward drops packets
            # that have a socket: they must reach wan0 first.
            conf |= {f"net/ipv4/{p}_early_demux": 0 for p in ("ip", "tcp", "udp")}
            _set_sysctls(pub, conf | {"net/ipv4/conf/all/send_redirects": 0})
            route = f"{self.subnet[0]}/24 via {self.public_ip} dev {self.host_ifname}"
            _run(["ip", "route", "add", *route.split()])
        for i in self._sites():
            self._load_ruleset(i, ())

    def _start_wan(self) -> None:
        sites = {
            site_name(i): [f"{self.router_public_ip(i)}/32", str(self.lan(i))]
            for i in self._sites()
        }
        sites[PUB] = [f"{self.public_ip}/32"]
        self._emulator = WanEmulator(self.public_netns, sites, self.wan_log)
        try:
            self._emulator.start(detach=self.detach)
        except RuntimeError as exc:
            raise LabError(str(exc)) from exc

    def _start_turnserver(self) -> None:
        self._turnserver = Coturn(
            self.public_netns, self.public_ip, self.subnet, self.workdir,
            username=self.turn_username, password=self.turn_password, realm=self.turn_realm,
        )  # fmt: skip
        try:
            self._turnserver.start(probe_from=self.host_ip, detach=self.detach)
        except RuntimeError as exc:
            raise LabError(str(exc)) from exc


def _set_sysctls(ns: str, values: dict[str, int]) -> None:
    """Write ``/proc/sys`` entries inside ``ns``, skipping ones that do not
    exist there (no IPv6, or ``br_netfilter`` not loaded)."""
    script = "".join(
        f"[ ! -e /proc/sys/{k} ] || echo {v} > /proc/sys/{k}\n" for k, v in values.items()
    )
    _run(["ip", "netns", "exec", ns, "sh", "-ec", script])
