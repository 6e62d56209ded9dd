"""NetnsLab: real node processes in network namespaces, behind one router we can cut.

Why: the in-memory network tests Raft logic; this lab tests real processes and
real TCP. Cutting traffic must look like wire loss to the nodes. A drop on the
sender's OUTPUT hook is reported to the local TCP stack (``EPERM``), so the
sender learns about it at once; a drop of a *forwarded* packet on a router
is silent, exactly like a lost packet. So all cuts happen on the router.

Topology (``X`` is a random free ``10.X.0.0/16``, ``i`` = 1..n)::

    root ns (test harness)            router ns {prefix}-r          node ns {prefix}-n{i}
    {prefix}-h 10.X.0.2/24 <--veth--> h0 10.X.0.1/24
                                      n{i} 10.X.i.1/24 <--veth-->   eth0 10.X.i.2/24

Theory of operation:

1. ``up()`` registers ``down()`` with ``atexit``, creates the namespaces (``lo``
   up in each) and the veth pairs, each end created directly in its final
   namespace. Only ``{prefix}-h`` ever lives in the root namespace.
2. Under a host-wide lock file (so two labs starting together cannot pick the
   same range), it reads every IPv4 route of the root namespace, picks a random
   ``10.X.0.0/16`` overlapping none of them, assigns the addresses, gives every
   node a default route via its router address and the root namespace one route
   for the lab's /16 via ``10.X.0.1`` (the kernel adds the connected /24 of
   ``{prefix}-h`` itself). ``net.ipv4.ip_forward=1`` is set inside the router
   namespace only; the root namespace's sysctls are never touched. No bridge is
   used, so ``br_netfilter`` plays no part.
3. The router holds the nftables table ``inet {prefix}`` with one base chain,
   ``forward`` (policy accept). The lab keeps the wanted cuts as plain data
   (blocked node pairs, per-node loss percentages); every change re-renders the
   whole chain with :func:`render_forward_chain` and loads it in one ``nft -f``
   transaction, so no packet ever sees a half-applied rule set. Rules match the
   router's interface names, never conntrack state, so they hit packets of
   connections that are already established. Traffic between a node and the
   root namespace (``h0``) is never cut.
4. ``down()`` kills any process still inside the lab's namespaces (it would keep
   a namespace alive), deletes the nft table, the root route, ``{prefix}-h``
   (which takes its router peer with it) and the namespaces (which take the
   remaining veths), then checks that nothing is left. It is idempotent and safe
   after a partial ``up()``.

Nothing here is thread-safe: drive one lab from one thread.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

_IFNAMSIZ = 15
_MAX_PREFIX_LEN = _IFNAMSIZ - len("-h")
_LAB_SUPERNET = ipaddress.IPv4Network("10.0.0.0/8")
_ROUTER_HOST_IF = "h0"
_NODE_IF = "eth0"
_LOCK_NAME = "raftstate-netns.lock"
_KILL_DEADLINE_S = 3.0


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


def node_ifname(i: int) -> str:
    """Name, inside the router namespace, of the veth that leads to node ``i``."""
    return f"n{i}"


def partition_pairs(groups: Sequence[Iterable[int]], n_nodes: int) -> set[frozenset[int]]:
    """Unordered node pairs that ``groups`` separate: every pair of nodes that
    sit in different groups. Nodes named in no group are not affected.

    Raises ``ValueError`` if a node is out of ``1..n_nodes`` or in two groups."""
    sets = [set(g) for g in groups]
    seen: set[int] = set()
    for group in sets:
        for node in group:
            _check_node(node, n_nodes)
            if node in seen:
                raise ValueError(f"node {node} appears in more than one partition group")
            seen.add(node)
    pairs: set[frozenset[int]] = set()
    for a_idx, a in enumerate(sets):
        for b in sets[a_idx + 1 :]:
            pairs.update(frozenset((x, y)) for x in a for y in b)
    return pairs


def render_forward_chain(
    table: str, n_nodes: int, blocked: Iterable[frozenset[int]], loss: Mapping[int, int]
) -> str:
    """The ``nft -f`` script that replaces the forward chain of ``inet table``.

    ``blocked`` holds unordered node pairs that may not talk at all; ``loss``
    maps a node to the percentage (0..100) of its node-to-node packets to drop,
    in each direction. A packet between two lossy nodes meets both rules, so
    its survival odds multiply; 100 renders as a plain drop. Pure: no I/O."""
    peers: dict[int, set[int]] = {}
    for pair in blocked:
        a, b = sorted(pair)
        peers.setdefault(a, set()).add(b)
        peers.setdefault(b, set()).add(a)
    lines = [f"flush chain inet {table} forward"]
    for node in sorted(peers):
        lines.append(
            f"add rule inet {table} forward iifname {_ifset([node])} "
            f"oifname {_ifset(peers[node])} drop"
        )
    for node, pct in sorted(loss.items()):
        if pct <= 0:
            continue
        others = [j for j in range(1, n_nodes + 1) if j != node]
        if not others:
            continue
        # numgen yields 0..99 and nft rejects "< 100" as out of range.
        cond = "drop" if pct >= 100 else f"numgen random mod 100 < {pct} drop"
        lines.append(
            f"add rule inet {table} forward iifname {_ifset([node])} "
            f"oifname {_ifset(others)} {cond}"
        )
        lines.append(
            f"add rule inet {table} forward iifname {_ifset(others)} "
            f"oifname {_ifset([node])} {cond}"
        )
    return "\n".join(lines) + "\n"


def pick_subnet(
    rng: random.Random, taken: Iterable[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """A random ``10.X.0.0/16`` that overlaps none of ``taken`` (default routes
    excluded by the caller). Raises ``LabError`` if all 256 are taken. Pure."""
    specific = [t for t in taken if t.prefixlen > 0]
    free = [
        net
        for net in _LAB_SUPERNET.subnets(new_prefix=16)
        if not any(net.overlaps(t) for t in specific)
    ]
    if not free:
        raise LabError("every 10.X.0.0/16 overlaps a route on this host; no room for a lab")
    return rng.choice(free)


def available() -> str | None:
    """``None`` if a lab can run here, else the reason it cannot (for
    ``pytest.skip``). Creates and deletes a probe namespace, so it costs a few
    tens of milliseconds. Never raises."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (the lab needs iproute2 and nftables)"
    probe = f"rsprobe-{secrets.token_hex(3)}"
    steps = [
        ["ip", "netns", "add", probe],
        ["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"],
        ["ip", "netns", "exec", probe, "nft", "list", "tables"],
        ["ip", "netns", "exec", probe, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
    ]
    try:
        for cmd in steps:
            try:
                _run(cmd)
            except LabError as exc:
                return f"namespace lab not permitted here: {exc}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


class NetnsLab:
    """A router namespace and ``n_nodes`` node namespaces; see the module doc.

    Node indices run from 1 to ``n_nodes``. Methods other than ``up``/``down``
    raise ``LabError`` if the lab is not up or a command fails, and
    ``ValueError`` for a node index out of range."""

    def __init__(self, n_nodes: int, prefix: str | None = None) -> None:
        if not 1 <= n_nodes <= 254:
            raise ValueError(f"n_nodes must be in 1..254, got {n_nodes}")
        if prefix is None:
            prefix = "rs" + secrets.token_hex(2)
        if not (prefix.isascii() and prefix.isalnum() and prefix[0].isalpha()):
            raise ValueError(
                f"prefix must be letters and digits, starting with a letter: {prefix!r}"
            )
        if len(prefix) > _MAX_PREFIX_LEN:
            raise ValueError(f"prefix {prefix!r} is longer than {_MAX_PREFIX_LEN} characters")
        self.n_nodes = n_nodes
        self.prefix = prefix
        self._subnet: ipaddress.IPv4Network | None = None
        self._blocked: set[frozenset[int]] = set()
        self._loss: dict[int, int] = {}
        self._up = False

    # --- names and addresses -------------------------------------------------

    @property
    def router_netns(self) -> str:
        return f"{self.prefix}-r"

    @property
    def host_ifname(self) -> str:
        """The root-namespace end of the root<->router veth."""
        return f"{self.prefix}-h"

    @property
    def table(self) -> str:
        """Name of the ``inet`` nftables table in the router namespace."""
        return self.prefix

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The lab's ``10.X.0.0/16``. Raises ``LabError`` before ``up()``."""
        if self._subnet is None:
            raise LabError("the lab is not up")
        return self._subnet

    @property
    def host_ip(self) -> str:
        """The root namespace's address in the lab (``10.X.0.2``)."""
        return self._addr(0, 2)

    def netns(self, i: int) -> str:
        """Name of node ``i``'s namespace (valid before ``up()``)."""
        _check_node(i, self.n_nodes)
        return f"{self.prefix}-n{i}"

    def node_ip(self, i: int) -> str:
        """Node ``i``'s address, ``10.X.i.2``."""
        _check_node(i, self.n_nodes)
        return self._addr(i, 2)

    def exec_prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command inside node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.netns(i)]

    # --- lifecycle -----------------------------------------------------------

    def up(self) -> None:
        """Build the lab. Raises ``LabError`` if a command fails (after undoing
        what was built) or if a namespace or link with this prefix already
        exists (touching nothing: it may belong to another lab; a stale lab is
        removed with ``NetnsLab(n, prefix).down()``)."""
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
        names = self._all_netns()
        present = set(_netns_names()) & set(names)
        kill_inside(present)
        if self.router_netns in present:
            self._ns_run(
                self.router_netns, ["nft", "delete", "table", "inet", self.table], check=False
            )
        if self._subnet is not None:
            _run(["ip", "route", "del", str(self._subnet), "dev", self.host_ifname], check=False)
        if _link_exists(self.host_ifname):
            _run(["ip", "link", "del", self.host_ifname], check=False)
        for name in names:
            if name in present:
                _run(["ip", "netns", "del", name], check=False)
        leftovers = sorted(set(_netns_names()) & set(names))
        if _link_exists(self.host_ifname):
            leftovers.append(f"link {self.host_ifname}")
        self._subnet = None
        self._blocked.clear()
        self._loss.clear()
        if leftovers:
            raise LabError(f"lab {self.prefix} left behind: {', '.join(leftovers)}")

    def __enter__(self) -> NetnsLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # --- faults --------------------------------------------------------------

    def isolate(self, i: int) -> None:
        """Drop every forwarded packet between node ``i`` and every other node.
        Node ``i`` still reaches the root namespace. Adds to earlier cuts."""
        others = [{j for j in range(1, self.n_nodes + 1) if j != i}]
        self.partition([{i}, *others])

    def partition(self, groups: Sequence[Iterable[int]]) -> None:
        """Cut every pair of nodes that sit in different ``groups``. Adds to
        earlier cuts; nodes named in no group keep their links."""
        pairs = partition_pairs(groups, self.n_nodes)
        self._apply(self._blocked | pairs, self._loss)
        self._blocked |= pairs

    def heal(self) -> None:
        """Remove every cut made by ``isolate``/``partition`` (loss stays)."""
        self._apply(set(), self._loss)
        self._blocked.clear()

    def drop_percent(self, i: int, pct: int) -> None:
        """Drop ``pct`` percent (0..100) of node ``i``'s node-to-node packets in
        each direction, chosen by ``numgen random``. Replaces node ``i``'s
        previous setting; 0 removes it."""
        _check_node(i, self.n_nodes)
        if not 0 <= pct <= 100:
            raise ValueError(f"pct must be in 0..100, got {pct}")
        loss = {**self._loss, i: pct}
        if pct == 0:
            del loss[i]
        self._apply(self._blocked, loss)
        self._loss = loss

    def clear_drops(self) -> None:
        """Remove every ``drop_percent`` rule (cuts stay)."""
        self._apply(self._blocked, {})
        self._loss = {}

    def flush_conntrack(self) -> None:
        """Empty the router namespace's conntrack table (needs ``conntrack``)."""
        self._require_up()
        self._ns_run(self.router_netns, ["conntrack", "-F"])

    def ruleset(self) -> str:
        """The router's current nftables table, as ``nft list`` prints it."""
        self._require_up()
        return self._ns_run(self.router_netns, ["nft", "list", "table", "inet", self.table])

    # --- internals -----------------------------------------------------------

    def _all_netns(self) -> list[str]:
        return [self.router_netns, *(self.netns(i) for i in range(1, self.n_nodes + 1))]

    def _addr(self, third: int, fourth: int) -> str:
        return str(self.subnet.network_address + third * 256 + fourth)

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.prefix} is not up")

    def _apply(self, blocked: Iterable[frozenset[int]], loss: Mapping[int, int]) -> None:
        self._require_up()
        script = render_forward_chain(self.table, self.n_nodes, blocked, loss)
        self._ns_run(self.router_netns, ["nft", "-f", "-"], stdin=script)

    def _ns_run(
        self, ns: str, cmd: list[str], *, check: bool = True, stdin: str | None = None
    ) -> str:
        return _run(["ip", "netns", "exec", ns, *cmd], check=check, stdin=stdin)

    def _build(self) -> None:
        r = self.router_netns
        for ns in self._all_netns():
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Names are validated letters, digits and dashes, so splitting on spaces is safe.
        host_peer = f"peer name {_ROUTER_HOST_IF} netns {r}"
        _run(f"ip link add {self.host_ifname} type veth {host_peer}".split())
        for i in range(1, self.n_nodes + 1):
            peer = f"peer name {_NODE_IF} netns {self.netns(i)}"
            _run(f"ip link add {node_ifname(i)} netns {r} type veth {peer}".split())
        self._ns_run(r, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        self._ns_run(
            r,
            ["nft", "-f", "-"],
            stdin=(
                f"add table inet {self.table}\n"
                f"add chain inet {self.table} forward "
                "{ type filter hook forward priority filter; policy accept; }\n"
            ),
        )
        with _host_lock():
            self._subnet = pick_subnet(random.SystemRandom(), _root_routes())
            self._address(r)

    def _address(self, r: str) -> None:
        for i in range(1, self.n_nodes + 1):
            ns, gw = self.netns(i), self._addr(i, 1)
            _run(["ip", "-n", r, "addr", "add", f"{gw}/24", "dev", node_ifname(i)])
            _run(["ip", "-n", r, "link", "set", node_ifname(i), "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", _NODE_IF])
            _run(["ip", "-n", ns, "link", "set", _NODE_IF, "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", gw])
        _run(["ip", "-n", r, "addr", "add", f"{self._addr(0, 1)}/24", "dev", _ROUTER_HOST_IF])
        _run(["ip", "-n", r, "link", "set", _ROUTER_HOST_IF, "up"])
        _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_ifname])
        _run(["ip", "link", "set", self.host_ifname, "up"])
        _run(f"ip route add {self.subnet} via {self._addr(0, 1)} dev {self.host_ifname}".split())


def kill_inside(namespaces: Iterable[str]) -> None:
    """SIGKILL every process in ``namespaces`` and wait until they are gone
    (up to 3 s; a namespace that keeps a process is reported by the caller)."""
    namespaces = list(namespaces)
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
                break  # the caller reports the namespace as left behind
            time.sleep(0.02)


def _check_node(i: int, n_nodes: int) -> None:
    if not 1 <= i <= n_nodes:
        raise ValueError(f"node index must be in 1..{n_nodes}, got {i}")


def _ifset(nodes: Iterable[int]) -> str:
    names = [f'"{node_ifname(n)}"' for n in sorted(nodes)]
    return names[0] if len(names) == 1 else "{ " + ", ".join(names) + " }"


def _run(cmd: list[str], *, check: bool = True, stdin: str | None = None) -> str:
    """Run ``cmd``; return its stdout. With ``check``, raise ``LabError`` naming
    the command and its stderr when it fails or cannot start."""
    try:
        res = subprocess.run(cmd, check=check, capture_output=True, text=True, input=stdin)
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.strip() or f"exit status {exc.returncode}"
        raise LabError(f"`{' '.join(cmd)}` failed: {detail}") from exc
    except OSError as exc:
        if not check:
            return ""
        raise LabError(f"`{' '.join(cmd)}` could not start: {exc}") from exc
    return res.stdout


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    res = subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, check=False)
    return res.returncode == 0


def _root_routes() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination in every routing table of the root namespace."""
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]")
    nets = []
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


@contextmanager
def _host_lock() -> Iterator[None]:
    """Serialise subnet choice between labs starting at once on this host."""
    run_lock = Path("/run/lock")
    lock_dir = run_lock if run_lock.is_dir() else Path(tempfile.gettempdir())
    with open(lock_dir / _LOCK_NAME, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
