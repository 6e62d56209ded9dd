"""The WAN emulator on a real TUN device: two site namespaces joined through a "wan" namespace.

Topology (``P`` is a unique prefix; the namespaces are not connected to the
root namespace, so their fixed addresses cannot clash with the host's)::

    {P}-a  eth0 10.201.1.2/24 <--veth--> wa 10.201.1.1/24 ┐
                                                          {P}-w: ip rule iif wa|wb → table 100,
    {P}-b  eth0 10.201.2.2/24 <--veth--> wb 10.201.2.1/24 ┘       default dev wan0 (TUN)

Packets from either site are policy-routed into ``wan0``; the emulator
(``python -m chaos.wan`` run with ``ip netns exec {P}-w``) writes them back into
``wan0`` when due, and the main table forwards them on. Waits are deadlines on
lines from subprocesses, never fixed sleeps. Needs root, ``/dev/net/tun`` and
``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SITE_A = "10.201.1.0/24"
SITE_B = "10.201.2.0/24"
A_IP = "10.201.1.2"
B_IP = "10.201.2.2"
PORT = 7100
LINE_TIMEOUT_S = 10.0

ECHO_SERVER = """
import socket, sys, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", int(sys.argv[1])))
tcp = socket.create_server(("0.0.0.0", int(sys.argv[1])))
def serve_tcp():
    while True:
        conn, _ = tcp.accept()
        conn.close()
threading.Thread(target=serve_tcp, daemon=True).start()
print("listening", flush=True)
while True:
    data, addr = udp.recvfrom(65535)
    udp.sendto(data, addr)
"""

# argv: host port count interval_s timeout_s -> one JSON line.
ECHO_CLIENT = """
import json, socket, struct, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interval, timeout = float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
sent = {}
rtts = {}
start = time.monotonic()
for seq in range(count):
    t = time.monotonic()
    sent[seq] = t
    s.send(struct.pack("!Id", seq, t) + bytes(56))
    deadline = start + (seq + 1) * interval
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(2048)
        except TimeoutError:
            break
        got, ts = struct.unpack("!Id", data[:12])
        rtts.setdefault(got, (time.monotonic() - ts) * 1000)
end = time.monotonic() + timeout
while len(rtts) < count and (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data = s.recv(2048)
    except TimeoutError:
        break
    got, ts = struct.unpack("!Id", data[:12])
    rtts.setdefault(got, (time.monotonic() - ts) * 1000)
print(json.dumps({"sent": count, "rtts_ms": [rtts[k] for k in sorted(rtts)]}))
"""

# argv: host port -> one JSON line with the TCP connect (SYN, SYN-ACK) time.
TCP_CLIENT = """
import json, socket, sys, time
t = time.monotonic()
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
print(json.dumps({"connect_ms": (time.monotonic() - t) * 1000}))
"""

CONTROL_CLIENT = """
import socket, sys
host, _, port = sys.argv[1].rpartition(":")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(sys.argv[2].encode(), (host, int(port)))
print(s.recv(65535).decode())
"""


def _unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "TUN namespaces need Linux"
    if os.geteuid() != 0:
        return "the WAN lab needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


def _run(cmd: list[str], check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
    return res.stdout


class WanLab:
    """Site namespaces ``a`` and ``b`` joined by the wan namespace ``w``; see module doc."""

    def __init__(self) -> None:
        self.prefix = "wt" + secrets.token_hex(3)
        self.ns = {k: f"{self.prefix}-{k}" for k in ("a", "b", "w")}
        self.procs: list[subprocess.Popen[str]] = []
        self.control = ""

    def up(self) -> None:
        atexit.register(self.down)
        a, b, w = self.ns["a"], self.ns["b"], self.ns["w"]
        for ns in (a, b, w):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for site, ns, net in (("a", a, "10.201.1"), ("b", b, "10.201.2")):
            _run(f"ip link add w{site} netns {w} type veth peer name eth0 netns {ns}".split())
            _run(["ip", "-n", w, "addr", "add", f"{net}.1/24", "dev", f"w{site}"])
            _run(["ip", "-n", w, "link", "set", f"w{site}", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", f"{net}.1"])
            _run(["ip", "-n", w, "rule", "add", "iif", f"w{site}", "lookup", "100", "pref", "100"])
        _run(["ip", "-n", w, "tuntap", "add", "dev", "wan0", "mode", "tun"])
        _run(["ip", "-n", w, "link", "set", "wan0", "up"])
        _run(["ip", "-n", w, "route", "add", "default", "dev", "wan0", "table", "100"])
        sysctls = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.wan0.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
        ]
        for setting in sysctls:
            key, value = setting.split("=")
            path = "/proc/sys/" + key.replace(".", "/")
            self.exec("w", ["sh", "-c", f"echo {value} > {path}"])

    def exec(self, site: str, cmd: list[str]) -> str:
        return _run(["ip", "netns", "exec", self.ns[site], *cmd])

    def spawn(self, site: str, args: list[str]) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[site], *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def start_emulator(self, *impairs: str) -> dict[str, object]:
        args = [sys.executable, "-m", "chaos.wan", "--dev", "wan0", "--seed", "1"]
        args += ["--sites", f"a={SITE_A},b={SITE_B}", "--control", "127.0.0.1:0"]
        for spec in impairs:
            args += ["--impair", spec]
        proc = self.spawn("w", args)
        ready = json.loads(read_line(proc))
        assert ready["event"] == "ready", ready
        self.control = str(ready["control"])
        return dict(ready)

    def control_request(self, request: dict[str, object]) -> dict[str, object]:
        out = self.exec(
            "w", [sys.executable, "-c", CONTROL_CLIENT, self.control, json.dumps(request)]
        )
        reply: dict[str, object] = json.loads(out)
        return reply

    def start_echo_server(self) -> None:
        proc = self.spawn("b", [sys.executable, "-c", ECHO_SERVER, str(PORT)])
        assert read_line(proc) == "listening"

    def udp_echo(self, count: int = 20, interval: float = 0.05) -> dict[str, object]:
        out = self.exec(
            "a",
            [sys.executable, "-c", ECHO_CLIENT, B_IP, str(PORT), str(count), str(interval), "1"],
        )
        result: dict[str, object] = json.loads(out)
        return result

    def down(self) -> None:
        atexit.unregister(self.down)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        present = set(_run(["ip", "netns", "list"], check=False).split())
        for ns in self.ns.values():
            if ns not in present:
                continue
            for pid in _run(["ip", "netns", "pids", ns], check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run(["ip", "netns", "del", ns], check=False)


def read_line(proc: subprocess.Popen[str], timeout: float = LINE_TIMEOUT_S) -> str:
    """The next stdout line of ``proc``, or fail with its stderr after ``timeout``."""
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"no line from {proc.args!r}: {err[-2000:]}")
    return line.strip()


@pytest.fixture
def lab() -> Iterator[WanLab]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    made = WanLab()
    try:
        made.up()
        yield made
    finally:
        made.down()
    leftovers = set(_run(["ip", "netns", "list"], check=False).split()) & set(made.ns.values())
    assert not leftovers, f"namespaces left behind: {leftovers}"


def ping_rtts_ms(lab: WanLab) -> list[float] | None:
    """RTTs from the ``ping`` binary (``None`` if it is not installed)."""
    if shutil.which("ping") is None:
        return None
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns["a"],
            "ping",
            "-n",
            "-c",
            "20",
            "-i",
            "0.05",
            "-W",
            "1",
            B_IP,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return [float(tok.split("=")[1]) for tok in res.stdout.split() if tok.startswith("time=")]


def test_delay_profile_applies_to_udp_tcp_and_icmp(lab: WanLab) -> None:
    lab.start_emulator("a<>b:delay_ms=40")
    lab.start_echo_server()
    result = lab.udp_echo()
    rtts = result["rtts_ms"]
    assert isinstance(rtts, list)
    assert len(rtts) >= 18, result
    assert min(rtts) >= 80.0, result
    tcp = json.loads(lab.exec("a", [sys.executable, "-c", TCP_CLIENT, B_IP, str(PORT)]))
    assert tcp["connect_ms"] >= 80.0
    pings = ping_rtts_ms(lab)
    if pings is not None:
        assert len(pings) >= 18 and min(pings) >= 80.0, pings


def test_loss_one_drops_everything_and_control_changes_it(lab: WanLab) -> None:
    lab.start_emulator("a<>b:delay_ms=5")
    lab.start_echo_server()
    assert len(lab.udp_echo(count=5)["rtts_ms"]) == 5  # type: ignore[arg-type]
    reply = lab.control_request({"cmd": "set", "src": "a", "dst": "b", "impairment": {"loss": 1.0}})
    assert reply == {"ok": True}
    assert lab.udp_echo()["rtts_ms"] == []
    stats = lab.control_request({"cmd": "get"})
    directions = {f"{d['src']}>{d['dst']}": d for d in stats["directions"]}  # type: ignore[attr-defined]
    assert directions["a>b"]["stats"]["lost"] >= 20
    lab.control_request({"cmd": "set", "src": "a", "dst": "b", "impairment": {}})
    assert len(lab.udp_echo(count=5)["rtts_ms"]) == 5  # type: ignore[arg-type]


def test_control_rejects_bad_requests(lab: WanLab) -> None:
    lab.start_emulator()
    reply = lab.control_request({"cmd": "set", "src": "a", "dst": "b", "impairment": {"loss": 2}})
    assert reply["ok"] is False and "loss" in str(reply["error"])
    assert lab.control_request({"cmd": "nope"})["ok"] is False
