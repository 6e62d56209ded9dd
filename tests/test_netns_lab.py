"""NetnsLab: namespaces, routing and forwarded-packet cuts between real processes.

The first tests check the pure pieces (rule rendering, partition pairs, subnet
choice) and run anywhere. The rest need root, iproute2 and nftables; they are
skipped with the reason from ``available()`` otherwise. Every wait is a
deadline on a line from a subprocess, never a fixed sleep.
"""

from __future__ import annotations

import ipaddress
import queue
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from cluster.netns import (
    LabError,
    NetnsLab,
    available,
    partition_pairs,
    pick_subnet,
    render_forward_chain,
)

PORT = 7000
LINE_TIMEOUT_S = 5.0
CUT_TIMEOUT_S = 1.0
"""How long a cut connection gets to show it is cut (connect or echo)."""

ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Connects, then obeys stdin: "send TEXT" -> "sent"; "recv SECONDS" -> "data TEXT",
# "closed" or "timeout".
ECHO_CLIENT = """
import socket, sys
try:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except OSError as exc:
    print("error", type(exc).__name__, flush=True)
    sys.exit(0)
print("connected", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "send":
        sock.sendall(arg.encode())
        print("sent", flush=True)
    elif cmd == "recv":
        sock.settimeout(float(arg))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            print("timeout", flush=True)
        else:
            print("data " + data.decode() if data else "closed", flush=True)
"""


class LineProc:
    """A subprocess whose stdout lines are read with deadlines."""

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
            raise AssertionError(
                f"no output from {self.proc.args!r} within {timeout_s} s"
            ) from None
        if line is None:
            raise AssertionError(f"{self.proc.args!r} exited ({self.proc.poll()}) without output")
        return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


# --- pure pieces -------------------------------------------------------------


def test_partition_pairs_separate_groups_and_leave_unnamed_nodes_alone() -> None:
    pairs = partition_pairs([{1}, {2, 3}], n_nodes=4)
    assert pairs == {frozenset({1, 2}), frozenset({1, 3})}
    with pytest.raises(ValueError, match="more than one"):
        partition_pairs([{1, 2}, {2}], n_nodes=3)
    with pytest.raises(ValueError, match="1..3"):
        partition_pairs([{1}, {4}], n_nodes=3)


def test_forward_chain_drops_cut_pairs_both_ways_and_never_touches_the_host_link() -> None:
    script = render_forward_chain("t", 3, {frozenset({1, 2}), frozenset({2, 3})}, {})
    assert script.splitlines() == [
        "flush chain inet t forward",
        'add rule inet t forward iifname "n1" oifname "n2" drop',
        'add rule inet t forward iifname "n2" oifname { "n1", "n3" } drop',
        'add rule inet t forward iifname "n3" oifname "n2" drop',
    ]
    assert "h0" not in script


def test_forward_chain_loss_uses_numgen_on_node_to_node_packets_only() -> None:
    script = render_forward_chain("t", 3, set(), {2: 30, 3: 0})
    assert script.splitlines()[1:] == [
        'add rule inet t forward iifname "n2" oifname { "n1", "n3" } '
        "numgen random mod 100 < 30 drop",
        'add rule inet t forward iifname { "n1", "n3" } oifname "n2" '
        "numgen random mod 100 < 30 drop",
    ]
    full = render_forward_chain("t", 2, set(), {1: 100}).splitlines()[1:]
    assert full == [
        'add rule inet t forward iifname "n1" oifname "n2" drop',
        'add rule inet t forward iifname "n2" oifname "n1" drop',
    ]


def test_pick_subnet_avoids_every_overlapping_route_but_ignores_default() -> None:
    taken = [ipaddress.IPv4Network("0.0.0.0/0")] + [
        ipaddress.IPv4Network(f"10.{x}.0.0/16") for x in range(256) if x != 42
    ]
    assert pick_subnet(random.Random(1), taken) == ipaddress.IPv4Network("10.42.0.0/16")
    with pytest.raises(LabError):
        pick_subnet(random.Random(1), [ipaddress.IPv4Network("10.0.0.0/8")])


def test_prefix_must_fit_interface_names() -> None:
    with pytest.raises(ValueError):
        NetnsLab(3, prefix="x" * 14)
    assert len(NetnsLab(3).host_ifname) <= 15


# --- real namespaces -----------------------------------------------------------


@pytest.fixture(scope="module")
def lab_support() -> None:
    reason = available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lab(lab_support: None) -> Iterator[NetnsLab]:
    with NetnsLab(3) as made:
        yield made


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], LineProc]]:
    """Start LineProcs; all are killed and reaped at teardown."""
    made: list[LineProc] = []

    def factory(argv: list[str]) -> LineProc:
        proc = LineProc(argv)
        made.append(proc)
        return proc

    yield factory
    for proc in made:
        proc.close()


def start_echo(lab: NetnsLab, spawn: Callable[[list[str]], LineProc], node: int) -> LineProc:
    argv = [*lab.exec_prefix(node), sys.executable, "-c", ECHO_SERVER, lab.node_ip(node)]
    server = spawn([*argv, str(PORT)])
    assert server.line() == "listening"
    return server


def connect(
    lab: NetnsLab, spawn: Callable[[list[str]], LineProc], src: int, dst: int
) -> tuple[LineProc, str]:
    """A client in node ``src``'s namespace connecting to node ``dst``'s echo
    server; returns it and its first line ("connected" or "error ...")."""
    argv = [*lab.exec_prefix(src), sys.executable, "-c", ECHO_CLIENT, lab.node_ip(dst)]
    client = spawn([*argv, str(PORT), str(CUT_TIMEOUT_S)])
    return client, client.line()


def echo_once(client: LineProc, text: str, timeout_s: float) -> str:
    client.send(f"send {text}")
    assert client.line() == "sent"
    client.send(f"recv {timeout_s}")
    return client.line(timeout_s + LINE_TIMEOUT_S)


def root_echo(lab: NetnsLab, node: int, text: str = "from-root") -> str:
    with socket.create_connection((lab.node_ip(node), PORT), timeout=LINE_TIMEOUT_S) as sock:
        sock.sendall(text.encode())
        return sock.recv(4096).decode()


@pytest.mark.slow
def test_node_server_is_reachable_from_another_node_and_from_root(
    lab: NetnsLab, spawn: Callable[[list[str]], LineProc]
) -> None:
    start_echo(lab, spawn, 2)
    client, first = connect(lab, spawn, 1, 2)
    assert first == "connected"
    assert echo_once(client, "hello", LINE_TIMEOUT_S) == "data hello"
    assert root_echo(lab, 2) == "from-root"


@pytest.mark.slow
def test_isolate_cuts_node_to_node_but_not_root_and_heal_restores(
    lab: NetnsLab, spawn: Callable[[list[str]], LineProc]
) -> None:
    start_echo(lab, spawn, 2)
    start_echo(lab, spawn, 3)
    lab.isolate(2)

    _, first = connect(lab, spawn, 1, 2)
    assert first == "error TimeoutError"
    assert root_echo(lab, 2) == "from-root"
    other, first = connect(lab, spawn, 1, 3)  # the rest of the cluster still talks
    assert first == "connected"
    assert echo_once(other, "peer", LINE_TIMEOUT_S) == "data peer"

    lab.heal()
    client, first = connect(lab, spawn, 1, 2)
    assert first == "connected"
    assert echo_once(client, "healed", LINE_TIMEOUT_S) == "data healed"


@pytest.mark.slow
def test_isolate_silently_stalls_an_established_connection(
    lab: NetnsLab, spawn: Callable[[list[str]], LineProc]
) -> None:
    start_echo(lab, spawn, 2)
    client, first = connect(lab, spawn, 1, 2)
    assert first == "connected"
    assert echo_once(client, "before", LINE_TIMEOUT_S) == "data before"

    lab.isolate(2)
    assert echo_once(client, "during", CUT_TIMEOUT_S) == "timeout"

    # Wire loss, not a reset: once healed, TCP retransmits and the same
    # connection delivers the stalled bytes.
    lab.heal()
    client.send(f"recv {LINE_TIMEOUT_S}")
    assert client.line(2 * LINE_TIMEOUT_S) == "data during"


@pytest.mark.slow
def test_full_loss_and_partition_cut_only_the_named_nodes(
    lab: NetnsLab, spawn: Callable[[list[str]], LineProc]
) -> None:
    start_echo(lab, spawn, 2)
    lab.drop_percent(2, 100)
    assert connect(lab, spawn, 1, 2)[1] == "error TimeoutError"
    assert root_echo(lab, 2) == "from-root"
    lab.clear_drops()
    lab.flush_conntrack()
    assert connect(lab, spawn, 1, 2)[1] == "connected"

    lab.partition([{1, 3}, {2}])
    assert "drop" in lab.ruleset()
    assert connect(lab, spawn, 3, 2)[1] == "error TimeoutError"
    lab.heal()
    assert "drop" not in lab.ruleset()


def _lab_traces(prefix: str, subnet: str) -> list[str]:
    def out(*cmd: str) -> str:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    traces = [f"netns {ln}" for ln in out("ip", "netns", "list").splitlines() if prefix in ln]
    traces += [f"link {ln}" for ln in out("ip", "-br", "link").splitlines() if prefix in ln]
    routes = out("ip", "route", "show", "table", "all").splitlines()
    lab_net = ".".join(subnet.split(".")[:2]) + "."  # "10.X."
    traces += [f"route {ln}" for ln in routes if prefix in ln or lab_net in ln]
    traces += [f"nft {ln}" for ln in out("nft", "list", "tables").splitlines() if prefix in ln]
    return traces


@pytest.mark.slow
def test_down_leaves_nothing_behind_and_is_idempotent(
    lab_support: None, spawn: Callable[[list[str]], LineProc]
) -> None:
    lab = NetnsLab(2)
    lab.up()
    subnet = str(lab.subnet)
    assert _lab_traces(lab.prefix, subnet)  # the check can see a live lab
    straggler = spawn([*lab.exec_prefix(1), "sleep", "60"])
    lab.down()
    assert straggler.proc.wait(timeout=5) != 0  # killed: it would pin the namespace
    assert _lab_traces(lab.prefix, subnet) == []
    lab.down()
    assert _lab_traces(lab.prefix, subnet) == []
