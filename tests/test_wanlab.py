"""The WAN lab: NATed sites whose every inter-site packet crosses the WAN emulator.

The first tests check the pure pieces (profile -> per-direction impairments,
the public namespace's routing, router rulesets, the lab state file, the
CLI's root check) and run anywhere. The rest need root, a TUN device,
nftables, conntrack and coturn, and are skipped with the reason otherwise:

* a one-site lab: impairment reaches a node's packets, blackhole/heal, and
  ``remap`` moves a cone site to new ports while keeping it endpoint-independent;
* a three-node ICE cluster across two cone sites and one symmetric site: the
  expected paths form, ``weak`` is applied, a recorded workload runs through a
  conntrack flush on the symmetric router, the replication stall is measured
  and the shared verifier passes;
* ``raftstate lab up`` / ``status`` / ``impair`` / ``down`` as subprocesses,
  leaving no namespace or process behind.

Every wait is a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_caught_up

from chaos.profiles import ToxicSetting, load_profile
from chaos.verify import verify
from chaos.wan import Impairment
from chaos.workload import Workload
from cluster.labcluster import LabCluster, LabProcess, LabState
from cluster.local import LocalCluster, wait_until
from cluster.natlab import CONE_REMAP_PORTS, NatLab, available, render_router_ruleset
from cluster.natrules import NatKind
from cluster.wanlab import PUB, node_link_impairment, plan_profile, render_public_routing
from raftstate.cli.main import main as cli_main
from raftstate.config import NodeConfig
from raftstate.v1 import cluster_pb2

REPO = Path(__file__).resolve().parent.parent
EXPECTED_PATHS = {
    frozenset({"n1", "n2"}): "srflx",
    frozenset({"n1", "n3"}): "relay",
    frozenset({"n2", "n3"}): "relay",
}

_REASON = available()
needs_lab = pytest.mark.skipif(_REASON is not None, reason=f"WAN lab unavailable: {_REASON}")


# --- pure pieces -------------------------------------------------------------


def test_a_profile_impairs_site_pairs_fully_and_splits_the_pub_legs() -> None:
    weak = load_profile("weak")
    plan = plan_profile(weak, 3)
    assert len(plan) == 3 * 2 + 3 * 2  # ordered site pairs + site<->pub both ways
    direct = plan[("s1", "s3")]
    assert direct == node_link_impairment(weak)
    assert (direct.delay_ms, direct.jitter_ms, direct.loss, direct.loss_correlation) == (
        30.0,
        10.0,
        0.03,
        0.25,
    )
    assert (direct.reorder, direct.reorder_extra_ms) == (0.05, 20.0)
    leg = plan[("s3", PUB)]
    assert leg == plan[(PUB, "s1")]
    assert (leg.delay_ms, leg.jitter_ms, leg.reorder_extra_ms) == (15.0, 5.0, 10.0)
    # Two legs in series lose, duplicate and reorder as much as one direct path.
    assert (1 - leg.loss) ** 2 == pytest.approx(1 - direct.loss)
    assert (1 - leg.reorder) ** 2 == pytest.approx(1 - direct.reorder)
    assert plan_profile(weak, 3, pub_legs="full")[("s3", PUB)] == direct
    assert set(plan_profile(load_profile("lan"), 2).values()) == {Impairment()}
    with pytest.raises(ValueError, match="pub_legs"):
        plan_profile(weak, 3, pub_legs="half")


def test_bandwidth_toxics_become_kilobit_rates() -> None:
    node = (ToxicSetting("bandwidth", (("rate", 125.0),)),)
    slow = dataclasses.replace(load_profile("wan"), node=node)
    assert node_link_impairment(slow).rate_kbit == 1000.0  # 125 KB/s = 1 Mbit/s


def test_public_routing_sends_router_traffic_through_the_tun_before_local_delivery() -> None:
    routers = [("r1", "10.9.0.11", "02:00:00:00:00:01"), ("r2", "10.9.0.12", "02:00:00:00:00:02")]
    lines = render_public_routing("10.9.0.1", "10.9.0.2", "10.9.0.6", routers)
    assert "route add default dev wan0 table 100" in lines
    assert "rule add to 10.9.0.2 lookup main pref 10" in lines  # the harness bypasses it
    assert "rule add iif r2 lookup 100 pref 102" in lines
    assert "rule add iif lo to 10.9.0.12 lookup 100 pref 103" in lines
    assert "neigh add 10.9.0.11 lladdr 02:00:00:00:00:01 dev r1 nud permanent" in lines
    # The local table moves behind the router rules, in that order (never without one).
    assert lines[-2:] == ["rule add lookup local pref 1000", "rule del pref 0 lookup local"]


def test_router_ruleset_hairpins_forwards_and_can_move_a_cone_to_a_port_range() -> None:
    script = render_router_ruleset(
        NatKind.CONE, "10.9.2.2", [("tcp", 7001)], ports=(20000, 29999),
        hairpin=("10.9.0.12", "10.9.2.0/24"),
    )  # fmt: skip
    lines = [line.strip() for line in script.splitlines()]
    assert 'oifname "wan" meta l4proto { tcp, udp } masquerade to :20000-29999' in lines
    assert 'oifname "wan" masquerade' in lines  # ICMP
    assert "ip daddr 10.9.0.12 tcp dport 7001 dnat to 10.9.2.2:7001" in lines  # wan and lan
    assert 'oifname "lan" ip saddr 10.9.2.0/24 ct status dnat masquerade' in lines
    assert 'iifname "lan" oifname "lan" ct status dnat accept' in lines
    symmetric = render_router_ruleset(NatKind.SYMMETRIC, "10.9.3.2", (), ports=(20000, 20100))
    assert "masquerade to :20000-20100 fully-random\n" in symmetric
    no_forwards = render_router_ruleset(
        NatKind.CONE, "10.9.2.2", (), hairpin=("10.9.0.12", "10.9.2.0/24")
    )
    assert "ip daddr" not in no_forwards and "ip saddr" not in no_forwards
    with pytest.raises(ValueError, match="ports"):
        render_router_ruleset(NatKind.CONE, "10.9.2.2", (), ports=(30000, 20000))


def test_lab_state_round_trips_and_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    me = LabProcess.of("self", os.getpid())
    assert me.alive()
    recycled = dataclasses.replace(me, start_ticks=(me.start_ticks or 0) + 1)
    assert not recycled.alive()
    state = LabState("labx", ("cone", "symmetric"), "udp", "weak", processes=(me,))
    path = tmp_path / "lab.json"
    state.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert LabState.from_json(path.read_text()) == state


def test_lab_commands_need_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for cmd in ("up", "down"):
        assert cli_main(["lab", cmd, "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"raftstate lab {cmd}: needs root") and "\n" not in err


# --- a one-site lab ------------------------------------------------------------

# Binds a UDP socket, learns its mapping from coturn (STUN), then asks a second
# server (argv[2]) which source it sees: one JSON line {"stun": [ip, port],
# "peer": [ip, port]}. Equal for an endpoint-independent mapping.
MAPPING_PROBE = """
import json, socket, sys
from aioice import stun
def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
sock.settimeout(3)
req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
sock.sendto(bytes(req), addr(sys.argv[1]))
mapped = stun.parse_message(sock.recv(2048)).attributes["XOR-MAPPED-ADDRESS"]
sock.sendto(b"who", addr(sys.argv[2]))
print(json.dumps({"stun": list(mapped), "peer": sock.recv(2048).decode().split(":")}))
"""

# Answers every datagram with "ip:port" of its source, on argv[1] (port 9999).
SOURCE_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
print("ready", flush=True)
while True:
    data, (ip, port) = s.recvfrom(2048)
    s.sendto(f"{ip}:{port}".encode(), (ip, port))
"""


LISTEN_PORT = 7100
TCP_LISTENER = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    srv.accept()[0].close()
"""


def _ping_ms(lab: NatLab, count: int) -> list[float]:
    res = subprocess.run(
        [*lab.exec_prefix(1), "ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "2",
         lab.public_ip],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # "rtt min/avg/max/mdev = 40.2/40.5/41.0/0.2 ms"; no line at all if nothing came back.
    stats = [line for line in res.stdout.splitlines() if "min/avg/max" in line]
    return [float(x) for x in stats[0].split("=")[1].split()[0].split("/")[:3]] if stats else []


@pytest.fixture(scope="module")
def small_lab() -> Iterator[NatLab]:
    if _REASON is not None:
        pytest.skip(f"WAN lab unavailable: {_REASON}")
    with NatLab(kinds=("cone",)) as lab:
        yield lab


@needs_lab
@pytest.mark.skipif(
    subprocess.run(["which", "ping"], capture_output=True).returncode != 0,
    reason="`ping` is not installed (apt-get install iputils-ping)",
)
def test_impairment_delays_a_site_and_a_blackhole_cuts_it_until_healed(
    small_lab: NatLab,
) -> None:
    lab = small_lab
    lab.impair(1, "pub", both=True, delay_ms=20)
    rtt_min, _, _ = _ping_ms(lab, 10)
    assert rtt_min >= 40.0
    lab.blackhole(1)
    assert _ping_ms(lab, 3) == []
    stats = lab.wan_stats().direction("s1", PUB)
    assert stats is not None and stats.stats.blackholed >= 3
    assert stats.impairment.delay_ms == 20.0  # the wanted impairment survives the cut
    # The root namespace's access through a port forward is never impaired.
    server = subprocess.Popen(
        [*lab.exec_prefix(1), sys.executable, "-c", TCP_LISTENER, str(LISTEN_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        lab.port_forward(1, "tcp", LISTEN_PORT)
        started = time.monotonic()
        socket.create_connection((lab.router_public_ip(1), LISTEN_PORT), timeout=5).close()
        assert time.monotonic() - started < 0.04  # a SYN through s1>pub alone would take 20 ms
    finally:
        server.kill()
        server.wait(timeout=5)
    lab.heal()
    assert _ping_ms(lab, 3)[0] >= 40.0
    lab.impair_profile("lan")
    assert _ping_ms(lab, 3)[2] < 40.0


@needs_lab
def test_remap_moves_a_cone_site_to_new_ports_and_keeps_it_endpoint_independent(
    small_lab: NatLab,
) -> None:
    lab = small_lab
    echo = subprocess.Popen(
        [*lab.public_exec_prefix(), sys.executable, "-c", SOURCE_ECHO, lab.public_ip],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"

        def probe() -> tuple[tuple[str, int], tuple[str, int]]:
            out = subprocess.run(
                [*lab.exec_prefix(1), sys.executable, "-c", MAPPING_PROBE, lab.stun_address,
                 f"{lab.public_ip}:9999"],
                capture_output=True, text=True, check=True, cwd=REPO,
            ).stdout  # fmt: skip
            got = json.loads(out)
            return (got["stun"][0], int(got["stun"][1])), (got["peer"][0], int(got["peer"][1]))

        for expected_range in (None, *CONE_REMAP_PORTS):
            via_stun, via_peer = probe()
            assert via_stun == via_peer  # endpoint-independent, before and after remaps
            assert via_stun[0] == lab.router_public_ip(1)
            if expected_range is not None:
                lo, hi = expected_range
                assert lo <= via_stun[1] <= hi, (via_stun, expected_range)
            if expected_range != CONE_REMAP_PORTS[-1]:
                assert lab.remap(1) in CONE_REMAP_PORTS
    finally:
        echo.kill()
        echo.wait(timeout=5)


# --- an ICE cluster across the WAN --------------------------------------------


@pytest.fixture(scope="module")
def wan_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    if _REASON is not None:
        pytest.skip(f"WAN lab unavailable: {_REASON}")
    lab = LabCluster(
        tmp_path_factory.mktemp("wanlab"), ("cone", "cone", "symmetric"),
        base_config=NodeConfig.for_tests(),
    )  # fmt: skip
    lab.up(timeout_s=60)
    try:
        yield lab
    finally:
        prefix = lab.lab.prefix
        lab.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left


def _links(cluster: LocalCluster) -> dict[tuple[str, str], cluster_pb2.Member]:
    out = {}
    for node_id in cluster.nodes:
        st = cluster.status(node_id)
        for m in st.members if st is not None else ():
            if m.node_id != node_id:
                out[(node_id, m.node_id)] = m
    return out


def _paths_as_expected(cluster: LocalCluster) -> bool:
    seen = _links(cluster)
    return len(seen) == 6 and all(
        m.connected and m.path == EXPECTED_PATHS[frozenset(pair)] for pair, m in seen.items()
    )


def _applied(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for node_id in cluster.nodes:
        st = cluster.status(node_id, timeout_s=0.5)
        out[node_id] = -1 if st is None else st.last_applied
    return out


@needs_lab
def test_ice_cluster_over_a_weak_wan_survives_a_nat_flush_without_loss(
    wan_cluster: LabCluster,
) -> None:
    cluster, lab = wan_cluster.cluster, wan_cluster.lab
    assert cluster is not None
    try:
        wait_until(lambda: _paths_as_expected(cluster), 60, "the expected ICE paths")
    finally:
        for pair, m in sorted(_links(cluster).items()):
            print(pair, m.path, m.connected, f"{m.rtt_ms:.2f} ms")
    lab.impair_profile("weak")
    endpoints = cluster.endpoints
    with Workload(endpoints, endpoints, devices=8) as w:
        wait_until(lambda: w.completed >= 100, 30, "traffic over the weak WAN")
        leader = cluster.wait_for_leader(30)
        status = cluster.status(leader)
        assert status is not None
        target = status.commit_index
        builds = {pair: m.paths for pair, m in _links(cluster).items() if "n3" in pair}
        flushed_at = time.monotonic()
        lab.flush_conntrack(3)  # the symmetric site: n3's relay allocations lose their mapping
        caught_up: dict[str, float] = {}

        def all_past_target() -> bool:
            for node_id, applied in _applied(cluster).items():
                if applied > target:
                    caught_up.setdefault(node_id, time.monotonic() - flushed_at)
            return len(caught_up) == len(cluster.nodes)

        wait_until(all_past_target, 60, "every node applying an entry committed after the flush")
        per_node = ", ".join(f"{n} {t:.2f} s" for n, t in sorted(caught_up.items()))
        print(
            f"replication stall after flushing site 3's NAT (leader {leader}): "
            f"{max(caught_up.values()):.2f} s ({per_node})"
        )
        rebuilt = {p: m.paths - builds[p] for p, m in _links(cluster).items() if p in builds}
        print(f"paths rebuilt since the flush: {rebuilt}")
        done = w.completed
        wait_until(lambda: w.completed >= done + 50, 30, "traffic after the flush")
    wait_caught_up(cluster, timeout_s=30)
    stats = lab.wan_stats()
    lost = sum(d.stats.lost for d in stats.directions)
    print(f"WAN: {stats.driver.read} packets through the emulator, {lost} lost by the profile")
    assert lost > 0  # the profile really applied
    verdict = verify(endpoints, w.acked, w.history)
    print(verdict.explain())
    assert verdict.ok, verdict.explain()


# --- the CLI ---------------------------------------------------------------------


def _cli(
    *args: str, timeout_s: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftstate", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@needs_lab
def test_lab_up_and_down_as_commands_leave_nothing_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "lab"
    prefix = "t" + os.urandom(3).hex()
    up = _cli("lab", "up", "--sites", "3", "--symmetric", "3", "--transport", "tcp",
              "--profile", "wan", "--prefix", prefix, "--dir", str(state_dir))  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"lab {prefix} is up" in up.stdout.splitlines()[-1]
        state = LabState.from_json((state_dir / "lab.json").read_text())
        assert {p.name for p in state.processes} == {"n1", "n2", "n3", "coturn", "wan"}
        assert all(p.alive() for p in state.processes)  # they outlive `lab up`
        # gRPC is TLS with auth; `lab up` printed the credentials to export.
        exports = dict(
            line.strip()[len("export ") :].split("=", 1)
            for line in up.stdout.splitlines()
            if line.strip().startswith("export RAFTSTATE_")
        )
        assert set(exports) == {"RAFTSTATE_CA", "RAFTSTATE_TOKEN"}, up.stdout
        status = _cli("status", "--endpoints", ",".join(state.endpoints), env=exports)
        assert status.returncode == 0, status.stdout + status.stderr
        impair = _cli("lab", "impair", "--profile", "weak", "--dir", str(state_dir))
        assert impair.returncode == 0, impair.stderr
        assert _cli("lab", "status", "--dir", str(state_dir)).returncode == 0
    finally:
        down = _cli("lab", "down", "--dir", str(state_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 5 processes" in down.stdout
    assert not any(p.alive() for p in state.processes)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"{prefix}-h" not in links
    assert not (state_dir / "lab.json").exists()
    again = _cli("lab", "down", "--dir", str(state_dir))
    assert again.returncode == 0 and "nothing to do" in again.stdout
