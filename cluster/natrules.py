"""The NAT lab's pure pieces: router rulesets and conntrack listings. No I/O.

A site router (:class:`~cluster.natlab.NatLab`) holds one nftables table,
``ip natlab``, rendered here and loaded in one ``nft -f`` transaction:

* ``postrouting`` masquerades out of ``wan``. ``cone``: plain ``masquerade``
  keeps the source port when it is free, and Linux reuses a source's existing
  mapping for its later flows, so the mapping is endpoint-independent (RFC
  4787 section 4.1). ``symmetric``: ``masquerade fully-random`` gives every
  flow a fresh random port. With a port range (``masquerade to :lo-hi``) a
  cone router still reuses a source's mapping for all its flows but picks the
  first one at random in the range; :meth:`NatLab.remap` uses that to move a
  cone site's mappings to new ports.
* ``forward`` lets out what the LAN starts, lets in established flows and
  port forwards, drops the rest; ``input`` drops unsolicited packets from
  ``wan``. So filtering is address- and port-dependent and sites meet only
  through their NATs.
* ``prerouting`` DNATs port forwards from ``wan`` to the node. With
  ``hairpin`` it DNATs whatever is addressed to the router's public address,
  so LAN hosts that use that address are forwarded too (RFC 4787 REQ-9,
  hairpinning), and it masquerades those flows so the node's answers come
  back through the router: a device can then use any node's advertised
  address, its own site's included.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ConntrackEntry",
    "NatKind",
    "SINK_MAC",
    "bridge_public_commands",
    "endpoint_commands",
    "parse_conntrack",
    "render_router_ruleset",
    "router_commands",
    "wan_macs",
]

SINK_MAC = "02:00:00:00:00:fe"
"""A MAC nobody has: a default route via a neighbour with it drops silently."""


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
{snat}	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "lan" oifname "wan" accept
		iifname "wan" oifname "lan" ct status dnat accept
{forward}	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname "wan" ct state established,related accept
		iifname "wan" drop
	}}
}}
"""


def render_router_ruleset(
    kind: NatKind,
    node_ip: str,
    forwards: Iterable[tuple[str, int]],
    *,
    ports: tuple[int, int] | None = None,
    hairpin: tuple[str, str] | None = None,
) -> str:
    """The ``nft -f`` script that (re)creates a router's ``ip natlab`` table in
    one transaction. ``forwards`` holds ``(proto, port)`` pairs to DNAT from the
    WAN address to ``node_ip``. ``ports`` limits the external ports the
    masquerade picks from (``(lo, hi)``, inclusive). ``hairpin`` is
    ``(public_ip, lan_cidr)``: DNAT the forwards for LAN hosts too. Raises
    ``ValueError`` for a bad port range. Pure: no I/O."""
    flags = " fully-random" if kind is NatKind.SYMMETRIC else ""
    masquerade = f"masquerade{flags}"
    if ports is not None:
        lo, hi = ports
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError(f"ports must satisfy 1024 <= lo <= hi <= 65535, got {ports}")
        # A port range needs a transport protocol; other protocols (ICMP) keep
        # the plain masquerade of the next rule.
        masquerade = (
            f"meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}{flags}\n"
            f'\t\toifname "wan" {masquerade}'
        )
    rules = sorted(set(forwards))
    # Without hairpinning a forward is for whatever arrives on wan; with it,
    # for whatever is addressed to the public address, from either side.
    match = 'iifname "wan"' if hairpin is None else f"ip daddr {hairpin[0]}"
    dnat = "".join(
        f"\t\t{match} {proto} dport {port} dnat to {node_ip}:{port}\n" for proto, port in rules
    )
    snat = forward = ""
    if hairpin is not None and rules:
        snat = f'\t\toifname "lan" ip saddr {hairpin[1]} ct status dnat masquerade\n'
        forward = '\t\tiifname "lan" oifname "lan" ct status dnat accept\n'
    return _RULESET.format(dnat=dnat, masquerade=masquerade, snat=snat, forward=forward)


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


# --- namespace wiring: ``ip -batch`` lines (pure) --------------------------------


def wan_macs(i: int) -> tuple[str, str]:
    """Fixed MACs of site ``i``'s point-to-point WAN link: ``(router side,
    public side)``. Each link is its own segment, so they need not be unique
    across labs."""
    return f"02:72:73:00:00:{i:02x}", f"02:72:73:00:01:{i:02x}"


def endpoint_commands(address: str, gateway: str) -> list[str]:
    """A node or device namespace: ``eth0`` at ``address``/24, default via ``gateway``."""
    return [
        "link set lo up",
        f"addr add {address}/24 dev eth0",
        "link set eth0 up",
        f"route add default via {gateway}",
    ]


def router_commands(
    lan_gateway: str, router_ip: str, public_ip: str, *, public_mac: str | None
) -> list[str]:
    """A router namespace: the ``lan`` bridge over ``ln`` (node) and ``ld``
    (device) at ``lan_gateway``/24, and ``wan`` at ``router_ip``, default via
    ``public_ip``. With ``public_mac`` (the WAN lab) ``wan`` is a
    point-to-point /32 with a permanent neighbour entry for the public side;
    without, it sits on the public /24 (the bridged lab)."""
    lines = [
        "link set lo up",
        "link add lan type bridge",
        "link set ln master lan up",
        "link set ld master lan up",
        "link set lan up",
        f"addr add {lan_gateway}/24 dev lan",
    ]
    if public_mac is not None:
        lines += [
            f"addr add {router_ip}/32 peer {public_ip}/32 dev wan",
            f"neigh add {public_ip} lladdr {public_mac} dev wan nud permanent",
        ]
    else:
        lines.append(f"addr add {router_ip}/24 dev wan")
    return [*lines, "link set wan up", f"route add default via {public_ip}"]


def bridge_public_commands(public_ip: str, sink: str, ports: list[str]) -> list[str]:
    """The bridged public namespace (``wan=False``): ``br0`` over ``ports`` at
    ``public_ip``/24, default route via ``sink``, a neighbour whose MAC nobody
    has, so datagrams to unroutable peers vanish silently."""
    return [
        "link set lo up",
        "link add br0 type bridge",
        "link set br0 up",
        *(f"link set {port} master br0 up" for port in ports),
        f"addr add {public_ip}/24 dev br0",
        f"neigh add {sink} lladdr {SINK_MAC} dev br0 nud permanent",
        f"route add default via {sink}",
    ]
