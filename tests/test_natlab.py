"""NatLab: real NATs, real filtering and a real coturn between namespaces.

The first tests check the pure pieces (ruleset rendering, conntrack parsing,
argument checks) and run anywhere. The rest share one lab (two cone sites and
one symmetric site) and need root, iproute2, nftables, conntrack and coturn;
they are skipped with the reason from ``available()`` otherwise. Probes run
as subprocesses inside the namespaces and are driven line by line over
stdin/stdout; every wait is a deadline on a line, never a fixed sleep.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from cluster.natlab import (
    RELAY_PORTS,
    ConntrackEntry,
    NatKind,
    NatLab,
    available,
    parse_conntrack,
    render_router_ruleset,
)

LINE_TIMEOUT_S = 5.0
RECV_TIMEOUT_S = 3.0
"""How long an agent waits for a datagram; shorter than a line's deadline."""

# UDP sockets bound to argv[1] that obey stdin, one reply line per command:
#   new                  -> "bound PORT" (fresh sockets: no mapping, no hole)
#   stun HOST PORT       -> "mapped IP:PORT" (XOR-MAPPED-ADDRESS of a Binding response)
#   send HOST PORT TEXT  -> "sent"
#   recv SECONDS         -> "got TEXT IP:PORT" or "timeout"
#   probe HOST PORT      -> "sent" (from a second, connected socket, on which
#                           an ICMP error would surface)
#   icmp                 -> "refused" if an ICMP port unreachable came back, else "silent"
UDP_AGENT = """
import socket, sys
from aioice import stun
sock = probe = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "new":
        for old in (sock, probe):
            if old is not None:
                old.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((sys.argv[1], 0))
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        print("bound", sock.getsockname()[1], flush=True)
    elif cmd == "stun":
        req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        sock.sendto(bytes(req), (args[0], int(args[1])))
        sock.settimeout(3)
        res = stun.parse_message(sock.recv(2048))
        assert res.transaction_id == req.transaction_id
        print("mapped %s:%d" % res.attributes["XOR-MAPPED-ADDRESS"], flush=True)
    elif cmd == "send":
        sock.sendto(args[2].encode(), (args[0], int(args[1])))
        print("sent", flush=True)
    elif cmd == "recv":
        sock.settimeout(float(args[0]))
        try:
            data, (ip, port) = sock.recvfrom(2048)
            print("got", data.decode(), "%s:%d" % (ip, port), flush=True)
        except TimeoutError:
            print("timeout", flush=True)
    elif cmd == "probe":
        probe.connect((args[0], int(args[1])))
        probe.send(b"probe")
        print("sent", flush=True)
    elif cmd == "icmp":
        probe.setblocking(False)
        try:
            probe.recv(2048)
            print("data", flush=True)
        except BlockingIOError:
            print("silent", flush=True)
        except ConnectionRefusedError:
            print("refused", flush=True)
"""

# Allocates on the TURN server argv[1:4], relays one datagram to the unroutable
# argv[4] (coturn must survive it), then "ping" to argv[5] and waits for the answer.
TURN_CLIENT = """
import asyncio, sys
from aioice import turn

def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)

class Receiver(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = asyncio.get_running_loop().create_future()
    def datagram_received(self, data, addr):
        if not self.got.done():
            self.got.set_result((data, addr))

async def main():
    server, user, password = addr(sys.argv[1]), sys.argv[2], sys.argv[3]
    void, peer = addr(sys.argv[4]), addr(sys.argv[5])
    _, client = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: turn.TurnClientUdpProtocol(server, user, password, 600, 500), remote_addr=server
    )
    relay = await asyncio.wait_for(client.connect(), 5)
    print("relay %s:%d mapped %s:%d" % (*relay, *client.mapped_address), flush=True)
    client.receiver = receiver = Receiver()
    await asyncio.wait_for(client.send_data(b"void", void), 5)
    await asyncio.wait_for(client.send_data(b"ping", peer), 5)
    data, source = await asyncio.wait_for(receiver.got, 5)
    print("reply", data.decode(), "%s:%d" % source, flush=True)
    await client.delete()

asyncio.run(main())
"""

TCP_SERVER = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
conn, (ip, port) = srv.accept()
conn.sendall(("hello %s" % ip).encode())
conn.close()
"""

_REASON = available()
needs_lab = pytest.mark.skipif(_REASON is not None, reason=f"NAT lab unavailable: {_REASON}")


class Agent:
    """A subprocess answering one stdout line per stdin line, with deadlines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout_s: float = LINE_TIMEOUT_S) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no output from {self.proc.args!r} in {timeout_s} s") from None
        if line is None:
            raise AssertionError(f"{self.proc.args!r} exited ({self.proc.poll()}) without output")
        return line

    def ask(self, command: str, timeout_s: float = LINE_TIMEOUT_S) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    with NatLab(kinds=("cone", "cone", "symmetric")) as natlab:
        yield natlab


@pytest.fixture(scope="module")
def agent_procs(lab: NatLab) -> Iterator[dict[str, Agent]]:
    """``"n1".."n3"``: a UDP agent in each node ns; ``"pub"``: one on ``public_ip``."""
    places = {f"n{i}": (lab.exec_prefix(i), "0.0.0.0") for i in range(1, lab.n_sites + 1)}
    places["pub"] = (lab.public_exec_prefix(), lab.public_ip)
    started: dict[str, Agent] = {}
    try:
        for name, (prefix, bind) in places.items():
            started[name] = Agent([*prefix, sys.executable, "-c", UDP_AGENT, bind])
        yield started
    finally:
        for agent in started.values():
            agent.close()


@pytest.fixture
def agents(agent_procs: dict[str, Agent]) -> dict[str, tuple[Agent, int]]:
    """Each agent with fresh sockets, and its bound port. Lines a failed test
    left unread come before "bound" and are skipped."""
    fresh = {}
    for name, agent in agent_procs.items():
        line = agent.ask("new")
        while not line.startswith("bound "):
            line = agent.line()
        fresh[name] = (agent, int(line.split()[1]))
    return fresh


def _mapped(agent: Agent, lab: NatLab) -> tuple[str, int]:
    reply = agent.ask(f"stun {lab.public_ip} 3478")
    kind, _, where = reply.partition(" ")
    assert kind == "mapped", reply
    ip, port = where.rsplit(":", 1)
    return ip, int(port)


# --- pure pieces -------------------------------------------------------------


def test_cone_ruleset_masquerades_keeping_ports_and_drops_unsolicited_inbound() -> None:
    script = render_router_ruleset(NatKind.CONE, "10.9.1.2", ())
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["add table ip natlab", "delete table ip natlab", "table ip natlab {"]
    assert 'oifname "wan" masquerade' in lines
    assert "type filter hook forward priority filter; policy drop;" in lines
    assert 'iifname "lan" oifname "wan" accept' in lines
    assert lines.index("ct state established,related accept") < lines.index(
        'iifname "lan" oifname "wan" accept'
    )
    assert lines[-5:] == [
        "type filter hook input priority filter; policy accept;",
        'iifname "wan" ct state established,related accept',
        'iifname "wan" drop',
        "}",
        "}",
    ]
    assert "dnat" not in script.replace("ct status dnat", "")


def test_symmetric_ruleset_maps_every_flow_to_a_random_port() -> None:
    script = render_router_ruleset(NatKind.SYMMETRIC, "10.9.3.2", ())
    assert '\t\toifname "wan" masquerade fully-random\n' in script


def test_port_forwards_render_once_each_in_a_stable_order() -> None:
    forwards = [("udp", 9000), ("tcp", 50051), ("udp", 9000)]
    script = render_router_ruleset(NatKind.CONE, "10.9.2.2", forwards)
    dnats = [line.strip() for line in script.splitlines() if "dnat to" in line]
    assert dnats == [
        'iifname "wan" tcp dport 50051 dnat to 10.9.2.2:50051',
        'iifname "wan" udp dport 9000 dnat to 10.9.2.2:9000',
    ]
    assert 'iifname "wan" oifname "lan" ct status dnat accept' in script


def test_conntrack_listing_parses_both_directions_and_skips_the_summary() -> None:
    text = (
        "udp      17 28 src=10.9.1.2 dst=10.9.0.1 sport=40000 dport=3478 "
        "src=10.9.0.1 dst=10.9.0.11 sport=3478 dport=40000 mark=0 use=1\n"
        "udp      17 29 src=10.9.1.2 dst=10.9.0.2 sport=40000 dport=7 [UNREPLIED] "
        "src=10.9.0.2 dst=10.9.0.11 sport=7 dport=40000 mark=0 use=1\n"
        "tcp      6 431999 ESTABLISHED src=10.9.0.2 dst=10.9.0.11 sport=5555 dport=80 "
        "src=10.9.1.2 dst=10.9.0.2 sport=80 dport=5555 [ASSURED] mark=0 use=1\n"
        "icmp     1 29 src=10.9.1.2 dst=10.9.0.1 type=8 code=0 id=7 "
        "src=10.9.0.1 dst=10.9.0.11 type=0 code=0 id=7 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n"
    )
    first, second, third, fourth = parse_conntrack(text)
    assert first == ConntrackEntry(
        "udp", 28, "10.9.1.2", "10.9.0.1", 40000, 3478, "10.9.0.1", "10.9.0.11", 3478, 40000, True
    )
    assert not second.replied and second.reply_dport == 40000
    assert (third.proto, third.dst, third.reply_src, third.replied) == (
        "tcp",
        "10.9.0.11",
        "10.9.1.2",
        True,
    )
    assert (fourth.proto, fourth.sport, fourth.reply_dst) == ("icmp", None, "10.9.0.11")
    assert parse_conntrack("") == []


def test_lab_arguments_are_checked_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match="'nat'"):
        NatLab(kinds=("cone", "nat"))
    with pytest.raises(ValueError, match="1..200 sites"):
        NatLab(kinds=())
    with pytest.raises(ValueError, match="letters and digits"):
        NatLab(prefix="bad-prefix")
    lab = NatLab(kinds=("symmetric",), prefix="nx1")
    assert lab.kinds == (NatKind.SYMMETRIC,)
    assert (lab.netns(1), lab.router_netns(1), lab.public_netns) == ("nx1-n1", "nx1-r1", "nx1-pub")
    with pytest.raises(ValueError, match="1..1"):
        lab.node_ip(2)


# --- the lab -----------------------------------------------------------------


@needs_lab
def test_stun_sees_each_site_as_its_router_public_address(
    lab: NatLab, agents: dict[str, tuple[Agent, int]]
) -> None:
    for i in range(1, lab.n_sites + 1):
        ip, _ = _mapped(agents[f"n{i}"][0], lab)
        assert ip == lab.router_public_ip(i), f"site {i} ({lab.kinds[i - 1]})"
    assert lab.stun_address == f"{lab.public_ip}:3478"


@needs_lab
def test_cone_keeps_one_mapping_per_socket_and_symmetric_maps_per_destination(
    lab: NatLab, agents: dict[str, tuple[Agent, int]]
) -> None:
    pub, pub_port = agents["pub"]
    for i in range(1, lab.n_sites + 1):
        node, local_port = agents[f"n{i}"]
        _, via_turn_server = _mapped(node, lab)
        assert node.ask(f"send {lab.public_ip} {pub_port} hello{i}") == "sent"
        got, text, source = pub.ask(f"recv {RECV_TIMEOUT_S}").split()
        assert (got, text) == ("got", f"hello{i}")
        ip, via_pub = source.rsplit(":", 1)
        assert ip == lab.router_public_ip(i)
        mappings = {
            (e.reply_dst, e.reply_dport)
            for e in lab.conntrack_entries(i, "udp")
            if e.sport == local_port
        }
        assert mappings == {(ip, via_turn_server), (ip, int(via_pub))}
        if lab.kinds[i - 1] is NatKind.CONE:
            assert via_turn_server == int(via_pub) == local_port
        else:
            assert via_turn_server != int(via_pub)


@needs_lab
def test_routers_drop_unsolicited_inbound_silently_until_the_node_sends(
    lab: NatLab, agents: dict[str, tuple[Agent, int]]
) -> None:
    node, _ = agents["n1"]
    pub, pub_port = agents["pub"]
    router = lab.router_public_ip(1)
    _, port = _mapped(node, lab)  # a mapping exists, but only towards coturn
    assert pub.ask(f"send {router} {port} unsolicited") == "sent"
    assert pub.ask(f"probe {router} 9") == "sent"  # no mapping at all
    # The node punches a hole towards the public agent; the public agent's answer
    # then travels the same path as "unsolicited" did, so it would arrive second.
    assert node.ask(f"send {lab.public_ip} {pub_port} punch") == "sent"
    assert pub.ask(f"recv {RECV_TIMEOUT_S}") == f"got punch {router}:{port}"
    assert pub.ask(f"send {router} {port} answer") == "sent"
    assert node.ask(f"recv {RECV_TIMEOUT_S}") == f"got answer {lab.public_ip}:{pub_port}"
    assert pub.ask("icmp") == "silent", "the router answered a probe of a closed port"


@needs_lab
def test_cone_sites_meet_only_through_their_nats(
    lab: NatLab, agents: dict[str, tuple[Agent, int]]
) -> None:
    (one, _), (two, two_port) = agents["n1"], agents["n2"]
    ip1, port1 = _mapped(one, lab)
    ip2, port2 = _mapped(two, lab)
    assert one.ask(f"send {lab.node_ip(2)} {two_port} private") == "sent"
    assert one.ask(f"send {ip2} {port2} early") == "sent"  # dropped by router 2, opens router 1
    assert two.ask(f"send {ip1} {port1} punch") == "sent"
    assert one.ask(f"recv {RECV_TIMEOUT_S}") == f"got punch {ip2}:{port2}"
    assert one.ask(f"send {ip2} {port2} hello") == "sent"
    assert two.ask(f"recv {RECV_TIMEOUT_S}") == f"got hello {ip1}:{port1}"


@needs_lab
def test_turn_relays_for_the_symmetric_site_with_the_lab_credentials(lab: NatLab) -> None:
    pytest.importorskip("aioice")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((lab.host_ip, 0))
        peer.settimeout(LINE_TIMEOUT_S)
        peer_addr = "{}:{}".format(*peer.getsockname())
        argv = [*lab.exec_prefix(3), sys.executable, "-c", TURN_CLIENT, lab.stun_address]
        argv += [lab.turn_username, lab.turn_password, f"{lab.node_ip(1)}:9", peer_addr]
        client = Agent(argv)
        try:
            kind, relay, _, mapped = client.line().split()
            relay_ip, relay_port = relay.rsplit(":", 1)
            assert (kind, relay_ip) == ("relay", lab.public_ip)
            assert RELAY_PORTS[0] <= int(relay_port) <= RELAY_PORTS[1]
            assert mapped.rsplit(":", 1)[0] == lab.router_public_ip(3)
            try:
                data, source = peer.recvfrom(2048)
            except TimeoutError:
                pytest.fail("nothing relayed: coturn dropped the allocation (no default route?)")
            assert (data, source) == (b"ping", (lab.public_ip, int(relay_port)))
            peer.sendto(b"pong", source)
            assert client.line() == f"reply pong {peer_addr}"
        finally:
            client.close()


@needs_lab
def test_flush_conntrack_forgets_mappings_and_rebinds_the_symmetric_site(
    lab: NatLab, agents: dict[str, tuple[Agent, int]]
) -> None:
    before = {i: _mapped(agents[f"n{i}"][0], lab) for i in (1, 3)}
    for i, proto in ((1, None), (3, "udp")):
        assert lab.conntrack_entries(i, "udp"), f"site {i} has no UDP flow to flush"
        lab.flush_conntrack(i, proto)
        assert lab.conntrack_entries(i, "udp") == []
    lab.flush_conntrack(3, "udp")  # nothing left to delete is not an error
    after = {i: _mapped(agents[f"n{i}"][0], lab) for i in (1, 3)}
    assert after[1] == before[1]
    assert after[3][0] == before[3][0] and after[3][1] != before[3][1]


@needs_lab
def test_port_forward_lets_the_root_namespace_reach_a_node_listener(lab: NatLab) -> None:
    port = 7100
    server = Agent([*lab.exec_prefix(2), sys.executable, "-c", TCP_SERVER, str(port)])
    try:
        assert server.line() == "listening"
        lab.port_forward(2, "tcp", port)
        lab.port_forward(2, "tcp", port)
        assert lab.ruleset(2).count(f"dnat to {lab.node_ip(2)}:{port}") == 1
        with socket.create_connection((lab.router_public_ip(2), port), timeout=5) as conn:
            assert conn.recv(100) == f"hello {lab.host_ip}".encode()
    finally:
        server.close()


@needs_lab
def test_down_leaves_no_namespace_link_route_or_process() -> None:
    lab = NatLab(kinds=("cone", "symmetric"))
    lab.up()
    subnet, pid, log = lab.subnet, lab.turnserver_pid, lab.turn_log
    sleepers = [
        subprocess.Popen([*prefix, "sleep", "60"])
        for prefix in (lab.exec_prefix(1), lab.public_exec_prefix())
    ]
    assert pid is not None and log.exists()
    lab.down()
    lab.down()
    for proc in sleepers:
        assert proc.wait(timeout=5) != 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in namespaces
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert lab.host_ifname not in links
    routes = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    )
    dsts = [
        r["dst"] for r in json.loads(routes.stdout or "[]") if r.get("dst", "default") != "default"
    ]
    assert not [d for d in dsts if ipaddress.IPv4Network(d, strict=False).overlaps(subnet)]
    assert not log.parent.exists()
