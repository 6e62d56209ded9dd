"""NatLab: sites behind real NATs, a public segment and a coturn STUN/TURN server.

Why: raftstate nodes sit behind their sites' NATs and meet through ICE (RFC
8445), STUN (RFC 8489) and TURN (RFC 8656); this lab gives them real NAT
mappings, filtering and relaying, in network namespaces.

Topology (``X`` is a random free ``10.X.0.0/16``, ``i`` = 1..n, ``p`` the prefix)::

    public ns {p}-pub: bridge br0 10.X.0.1/24, coturn on 10.X.0.1:3478
        |                          |
    root ns: {p}-h 10.X.0.2/24     router ns {p}-r{i}: wan 10.X.0.(10+i)/24, NAT
                                                       lan 10.X.i.1/24
                                                        |
                                   node ns {p}-n{i}:   eth0 10.X.i.2/24

Theory of operation:

1. ``up()`` registers ``down()`` with ``atexit`` and creates namespaces and
   veths, each end directly in its final namespace (only ``{p}-h`` lives in the
   root one). IPv6 is off in the lab, so ICE gathers IPv4 candidates only, and
   so is ``br_netfilter`` for the bridge.
2. Under the host lock shared with ``NetnsLab`` it picks a ``10.X.0.0/16`` that
   overlaps no root route. The root namespace gets ``10.X.0.2/24``: one
   connected route, to the public /24, never to a site LAN. The public
   namespace does not forward, and its default route leads to a MAC nobody
   has, so a datagram to an unroutable peer vanishes instead of failing with
   ``ENETUNREACH`` (which makes coturn drop the allocation that sent it).
3. A router's nftables table (:func:`render_router_ruleset`) masquerades out of
   ``wan``: plainly for ``cone`` (endpoint-independent mapping, ports kept),
   ``fully-random`` for ``symmetric`` (a new port per flow). Forwarding is LAN
   to WAN, established flows and port forwards only; input from ``wan`` only
   if established. So filtering is address- and port-dependent (RFC 4787) and
   sites meet only through their NATs.
4. coturn runs in the public namespace with generated long-term credentials,
   no TLS/DTLS/CLI, relay ports :data:`RELAY_PORTS` and the lab's /16 allowed
   as peers; ``up()`` returns once it answers a STUN Binding request.
5. ``down()`` stops coturn, kills what still runs in the lab, deletes ``{p}-h``
   (and its route), the namespaces (and the other links) and the temporary
   directory. It is idempotent and safe after a partial ``up()``.

Nothing here is thread-safe: drive one lab from one thread.
"""

from __future__ import annotations

import atexit
import enum
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cluster.netns import (
    _KILL_DEADLINE_S,
    _MAX_PREFIX_LEN,
    LabError,
    _host_lock,
    _link_exists,
    _netns_names,
    _root_routes,
    _run,
    pick_subnet,
)
from cluster.netns import available as _netns_available

STUN_PORT = 3478
RELAY_PORTS = (49160, 49359)
"""coturn's relay port range, inclusive."""
_BRIDGE_NF = ("arptables", "iptables", "ip6tables")
_MAX_SITES = 200
_READY_TIMEOUT_S = 10.0
_SINK_MAC = "02:00:00:00:00:fe"
_STUN_COOKIE = 0x2112A442


class NatKind(enum.StrEnum):
    """How a site's router maps ports (RFC 4787 section 4.1)."""

    CONE = "cone"
    """Endpoint-independent mapping; the source port is kept when free."""
    SYMMETRIC = "symmetric"
    """A fresh random port per flow: STUN-learned ports are useless, TURN works."""


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One conntrack flow. ``src``..``dport`` describe the original direction;
    ``reply_*`` the reply direction, so for a masqueraded flow
    ``(reply_dst, reply_dport)`` is the NAT's external mapping."""

    proto: str
    timeout_s: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    reply_src: str
    reply_dst: str
    reply_sport: int | None
    reply_dport: int | None
    replied: bool
    """False while conntrack shows ``[UNREPLIED]``."""


_RULESET = """\
add table ip natlab
delete table ip natlab
table ip natlab {{
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
{dnat}	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" {masquerade}
	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "lan" oifname "wan" accept
		iifname "wan" oifname "lan" ct status dnat accept
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname "wan" ct state established,related accept
		iifname "wan" drop
	}}
}}
"""


def render_router_ruleset(kind: NatKind, node_ip: str, forwards: Iterable[tuple[str, int]]) -> str:
    """The ``nft -f`` script that (re)creates a router's ``ip natlab`` table in
    one transaction. ``forwards`` holds ``(proto, port)`` pairs to DNAT from the
    WAN address to ``node_ip``. Pure: no I/O."""
    masquerade = "masquerade" if kind is NatKind.CONE else "masquerade fully-random"
    dnat = "".join(
        f'\t\tiifname "wan" {proto} dport {port} dnat to {node_ip}:{port}\n'
        for proto, port in sorted(set(forwards))
    )
    return _RULESET.format(dnat=dnat, masquerade=masquerade)


_FIELD = re.compile(r"(src|dst|sport|dport)=(\S+)")


def parse_conntrack(text: str) -> list[ConntrackEntry]:
    """Parse ``conntrack -L`` output (default format); lines it cannot read,
    such as the summary, are skipped. Pure."""
    entries = []
    for line in text.splitlines():
        tokens = line.split()
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for key, value in _FIELD.findall(line):
            (reply if key in orig else orig)[key] = value
        if len(tokens) < 3 or not tokens[2].isdigit() or "dst" not in reply:
            continue
        replied = "[UNREPLIED]" not in tokens
        entries.append(
            ConntrackEntry(tokens[0], int(tokens[2]), *_flow(orig), *_flow(reply), replied)
        )
    return entries


def _flow(fields: dict[str, str]) -> tuple[str, str, int | None, int | None]:
    sport, dport = (int(fields[k]) if k in fields else None for k in ("sport", "dport"))
    return fields["src"], fields["dst"], sport, dport


def available() -> str | None:
    """``None`` if a NAT lab can run here, else the reason it cannot (for
    ``pytest.skip``). Never raises."""
    reason = _netns_available()
    if reason is not None:
        return reason
    for tool, package in (("conntrack", "conntrack"), ("turnserver", "coturn")):
        if shutil.which(tool) is None:
            return (
                f"`{tool}` is not installed (apt-get install {package}; see scripts/bootstrap.sh)"
            )
    return None


class NatLab:
    """Sites behind NATs, a public segment and coturn; see the module doc.

    Site indices run from 1 to ``n_sites``. Methods other than ``up``/``down``
    raise ``LabError`` if the lab is not up or a command fails, and
    ``ValueError`` for a site index out of range."""

    def __init__(
        self,
        kinds: Iterable[NatKind | str] = ("cone", "cone", "symmetric"),
        prefix: str | None = None,
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
        self.turn_username = "raftstate"
        self.turn_password = secrets.token_hex(12)
        self.turn_realm = f"{prefix}.natlab"
        self._subnet: ipaddress.IPv4Network | None = None
        self._forwards: dict[int, set[tuple[str, int]]] = {}
        self._workdir: Path | None = None
        self._turnserver: subprocess.Popen[bytes] | None = None
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
        """The public services' address (coturn), ``10.X.0.1``."""
        return self._addr(0, 1)

    @property
    def host_ip(self) -> str:
        """The root namespace's address on the public segment, ``10.X.0.2``."""
        return self._addr(0, 2)

    @property
    def stun_address(self) -> str:
        """``"10.X.0.1:3478"``: coturn, for both STUN and TURN (UDP or TCP)."""
        return f"{self.public_ip}:{STUN_PORT}"

    @property
    def turn_log(self) -> Path:
        """coturn's log file (it lives until ``down()``)."""
        if self._workdir is None:
            raise LabError("the lab is not up")
        return self._workdir / "turnserver.log"

    @property
    def turnserver_pid(self) -> int | None:
        """coturn's process id while the lab is up, else ``None``."""
        return None if self._turnserver is None else self._turnserver.pid

    def netns(self, i: int) -> str:
        """Name of site ``i``'s node namespace (valid before ``up()``)."""
        self._check_site(i)
        return f"{self.prefix}-n{i}"

    def router_netns(self, i: int) -> str:
        """Name of site ``i``'s router namespace (valid before ``up()``)."""
        self._check_site(i)
        return f"{self.prefix}-r{i}"

    def node_ip(self, i: int) -> str:
        """Site ``i``'s node address, ``10.X.i.2`` (private: unroutable elsewhere)."""
        self._check_site(i)
        return self._addr(i, 2)

    def router_public_ip(self, i: int) -> str:
        """Site ``i``'s router WAN address, ``10.X.0.(10+i)``: its NAT's public side."""
        self._check_site(i)
        return self._addr(0, 10 + i)

    def exec_prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command inside site ``i``'s node namespace."""
        return ["ip", "netns", "exec", self.netns(i)]

    def public_exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command in the public namespace (it may bind
        ``10.X.0.1`` on any port but 3478 and :data:`RELAY_PORTS`)."""
        return ["ip", "netns", "exec", self.public_netns]

    # --- lifecycle -----------------------------------------------------------

    def up(self) -> None:
        """Build the lab and start coturn. Raises ``LabError`` if a command
        fails or coturn does not answer (after undoing what was built), or if
        a namespace or link with this prefix already exists (touching nothing;
        a stale lab is removed with ``NatLab(kinds, prefix).down()``)."""
        if self._up:
            raise LabError(f"lab {self.prefix} is already up")
        in_use = sorted(set(_netns_names()) & set(self._all_netns()))
        if _link_exists(self.host_ifname):
            in_use.append(f"link {self.host_ifname}")
        if in_use:
            raise LabError(f"prefix {self.prefix!r} is in use: {', '.join(in_use)}")
        atexit.register(self.down)
        try:
            self._build()
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
        if self._turnserver is not None:
            self._turnserver.terminate()
            try:
                self._turnserver.wait(timeout=_KILL_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self._turnserver.kill()
                self._turnserver.wait()
            self._turnserver = None
        names = self._all_netns()
        present = set(_netns_names()) & set(names)
        _kill_inside(present)
        if _link_exists(self.host_ifname):
            _run(["ip", "link", "del", self.host_ifname], check=False)
        for name in names:
            if name in present:
                _run(["ip", "netns", "del", name], check=False)
        leftovers = sorted(set(_netns_names()) & set(names))
        if _link_exists(self.host_ifname):
            leftovers.append(f"link {self.host_ifname}")
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._subnet = None
        self._forwards.clear()
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

    # --- operations ----------------------------------------------------------

    def port_forward(self, i: int, proto: str, port: int) -> None:
        """DNAT ``router_public_ip(i):port`` to ``node_ip(i):port`` for ``proto``
        (``"tcp"`` or ``"udp"``), so the root namespace can reach a node's
        listener through its NAT. Adding the same forward twice is harmless."""
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

    def conntrack_entries(self, i: int, proto: str | None = None) -> list[ConntrackEntry]:
        """Site ``i``'s router conntrack flows, optionally only ``proto``'s."""
        self._require_up()
        extra = [] if proto is None else ["-p", proto]
        return parse_conntrack(self._router_run(i, ["conntrack", "-L", *extra]))

    def ruleset(self, i: int) -> str:
        """Site ``i``'s router nftables table, as ``nft list`` prints it."""
        self._require_up()
        return self._router_run(i, ["nft", "list", "table", "ip", "natlab"])

    # --- internals -----------------------------------------------------------

    def _check_site(self, i: int) -> None:
        if not 1 <= i <= self.n_sites:
            raise ValueError(f"site index must be in 1..{self.n_sites}, got {i}")

    def _sites(self) -> range:
        return range(1, self.n_sites + 1)

    def _all_netns(self) -> list[str]:
        routers = [self.router_netns(i) for i in self._sites()]
        return [self.public_netns, *routers, *(self.netns(i) for i in self._sites())]

    def _addr(self, third: int, fourth: int) -> str:
        return str(self.subnet.network_address + third * 256 + fourth)

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.prefix} is not up")

    def _router_run(self, i: int, cmd: list[str]) -> str:
        return _run(["ip", "netns", "exec", self.router_netns(i), *cmd])

    def _load_ruleset(self, i: int, forwards: Iterable[tuple[str, int]]) -> None:
        script = render_router_ruleset(self.kinds[i - 1], self.node_ip(i), forwards)
        _run(["ip", "netns", "exec", self.router_netns(i), "nft", "-f", "-"], stdin=script)

    def _build(self) -> None:
        pub = self.public_netns
        no_ipv6 = {f"net/ipv6/conf/{c}/disable_ipv6": 1 for c in ("all", "default")}
        for ns in self._all_netns():
            _run(["ip", "netns", "add", ns])
            _set_sysctls(ns, no_ipv6)
        _set_sysctls(pub, {f"net/bridge/bridge-nf-call-{t}": 0 for t in _BRIDGE_NF})
        # Names are validated letters, digits and dashes, so splitting on spaces is safe.
        _run(f"ip link add {self.host_ifname} type veth peer name h0 netns {pub}".split())
        for i in self._sites():
            r, n = self.router_netns(i), self.netns(i)
            _set_sysctls(r, {"net/ipv4/ip_forward": 1})
            _run(f"ip link add wan netns {r} type veth peer name s{i} netns {pub}".split())
            _run(f"ip link add lan netns {r} type veth peer name eth0 netns {n}".split())
        with _host_lock():
            self._subnet = pick_subnet(random.SystemRandom(), _root_routes())
            _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_ifname])
            _run(["ip", "link", "set", self.host_ifname, "up"])
        sink = self._addr(0, 254)
        ports = ["h0", *(f"s{i}" for i in self._sites())]
        script = {pub: ["link set lo up", "link add br0 type bridge", "link set br0 up"]}
        script[pub] += [f"link set {port} master br0 up" for port in ports]
        script[pub] += [
            f"addr add {self.public_ip}/24 dev br0",
            f"neigh add {sink} lladdr {_SINK_MAC} dev br0 nud permanent",
            f"route add default via {sink}",
        ]
        for i in self._sites():
            script[self.router_netns(i)] = [
                "link set lo up",
                f"addr add {self.router_public_ip(i)}/24 dev wan",
                f"addr add {self._addr(i, 1)}/24 dev lan",
                "link set wan up",
                "link set lan up",
                f"route add default via {self.public_ip}",
            ]
            script[self.netns(i)] = [
                "link set lo up",
                f"addr add {self.node_ip(i)}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {self._addr(i, 1)}",
            ]
        for ns, commands in script.items():
            _run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")
        for i in self._sites():
            self._load_ruleset(i, ())

    def _start_turnserver(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        lo, hi = RELAY_PORTS
        # -n: no /etc/turnserver.conf, whose denied-peer-ip lines (if a host has
        # them) would refuse the lab's private peers; allowed-peer-ip wins anyway.
        argv = [
            *self.public_exec_prefix(),
            "turnserver", "-n", "--no-tls", "--no-dtls", "--no-cli",
            "--listening-ip", self.public_ip, "--listening-port", str(STUN_PORT),
            "--relay-ip", self.public_ip, "--min-port", str(lo), "--max-port", str(hi),
            "--lt-cred-mech", "--realm", self.turn_realm,
            "--user", f"{self.turn_username}:{self.turn_password}",
            "--allowed-peer-ip", f"{self.subnet[0]}-{self.subnet[-1]}",
            "--userdb", str(self._workdir / "turndb"),
            "--pidfile", str(self._workdir / "turnserver.pid"),
            "--log-file", "stdout",
        ]  # fmt: skip
        with open(self.turn_log, "wb") as log:
            self._turnserver = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not _stun_answers(self.host_ip, (self.public_ip, STUN_PORT), timeout_s=0.1):
            code = self._turnserver.poll()
            if code is not None or time.monotonic() >= deadline:
                lines = self.turn_log.read_text(errors="replace").splitlines()
                notes = [ln for ln in lines if re.search("error|unrecognized", ln, re.I)]
                tail = "\n".join(notes[:10] or lines[-20:])
                state = f"exited with status {code}" if code is not None else "did not answer"
                raise LabError(f"turnserver {state}; its log says:\n{tail}")


def _set_sysctls(ns: str, values: dict[str, int]) -> None:
    """Write ``/proc/sys`` entries inside ``ns``, skipping ones that do not
    exist there (no IPv6, or ``br_netfilter`` not loaded)."""
    script = "".join(
        f"[ ! -e /proc/sys/{k} ] || echo {v} > /proc/sys/{k}\n" for k, v in values.items()
    )
    _run(["ip", "netns", "exec", ns, "sh", "-ec", script])


def _kill_inside(namespaces: Iterable[str]) -> None:
    """SIGKILL every process in ``namespaces`` and wait (as ``NetnsLab`` does)."""
    pids: set[int] = set()
    for ns in namespaces:
        out = _run(["ip", "netns", "pids", ns], check=False)
        pids.update(int(tok) for tok in out.split() if tok.isdigit())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _KILL_DEADLINE_S
    for ns in namespaces:
        while _run(["ip", "netns", "pids", ns], check=False).split():
            if time.monotonic() >= deadline:
                break  # down() reports the namespace as left behind.
            time.sleep(0.02)


def _stun_answers(local_ip: str, server: tuple[str, int], timeout_s: float) -> bool:
    """Whether ``server`` answers one STUN Binding request (RFC 8489 section 5)
    sent from ``local_ip`` within ``timeout_s``."""
    txid = secrets.token_bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((local_ip, 0))
        sock.settimeout(timeout_s)
        sock.sendto(struct.pack("!HHI12s", 0x0001, 0, _STUN_COOKIE, txid), server)
        try:
            data = sock.recv(2048)
        except OSError:
            return False
    return data[:2] == b"\x01\x01" and data[8:20] == txid
