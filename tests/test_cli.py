"""The CLI as an operator uses it: cluster up, device commands, status, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import free_ports, port_is_free, wait_until

pytestmark = pytest.mark.cluster


def raftstate(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raftstate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


SDK_FROM_ENV = """
import os
from raftstate.sdk import DeviceClient
with DeviceClient(os.environ["RAFTSTATE_ENDPOINTS"]) as client:  # credentials from the env
    print(client.get("pump-1").seq)
"""


def printed_exports(text: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines ``cluster up`` prints, as a shell
    would evaluate them (``$(cat FILE)`` included)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            if value.startswith("$(cat ") and value.endswith(")"):
                value = Path(value[len("$(cat ") : -1]).read_text().strip()
            out[name] = value
    return out


def test_cluster_up_serves_device_commands_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    # cluster up takes three consecutive ports from each base; pick bases
    # whose whole ranges are free right now (a neighbour of a free port may
    # be some other connection's ephemeral port).
    for _ in range(50):
        grpc_base = free_ports(1)[0]
        raft_base = free_ports(1)[0]
        ports = list(range(grpc_base, grpc_base + 3)) + list(range(raft_base, raft_base + 3))
        ports += [p + 50 for p in range(grpc_base, grpc_base + 3)]  # the mTLS ports
        ports += [p + 90 for p in range(grpc_base, grpc_base + 3)]  # the /metrics ports
        if len(set(ports)) == 12 and all(port_is_free("127.0.0.1", p) for p in ports):
            break
    else:
        pytest.fail("found no two free ranges of three ports")
    out = tmp_path / "up.out"
    with open(out, "w") as fh:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raftstate",
                "cluster",
                "up",
                "--dir",
                str(tmp_path / "state"),
                "--grpc-port",
                str(grpc_base),
                "--raft-port",
                str(raft_base),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until(
            lambda: "Ctrl-C stops the cluster" in out.read_text() or up.poll() is not None,
            60,
            "cluster up to report ready",
        )
        assert up.poll() is None, out.read_text()
        endpoints = ",".join(f"127.0.0.1:{grpc_base + i}" for i in range(3))
        exports = printed_exports(out.read_text())
        assert exports["RAFTSTATE_ENDPOINTS"] == endpoints
        assert set(exports) == {"RAFTSTATE_ENDPOINTS", "RAFTSTATE_CA", "RAFTSTATE_TOKEN"}
        bare = {k: v for k, v in os.environ.items() if not k.startswith("RAFTSTATE_")}
        # Without the printed credentials the secure cluster refuses the CLI.
        refused = raftstate(
            "device",
            "get",
            "pump-1",
            "--deadline",
            "2",
            env={**bare, "RAFTSTATE_ENDPOINTS": endpoints, "RAFTSTATE_CA": exports["RAFTSTATE_CA"]},
        )
        assert refused.returncode == 1 and "Unauthenticated" in refused.stderr, refused.stderr
        env = {**bare, **exports}
        hb = raftstate("device", "heartbeat", "pump-1", "--set", "temp_c=21.5", env=env)
        assert hb.returncode == 0, hb.stderr
        ack = json.loads(hb.stdout)
        got = raftstate("device", "get", "pump-1", env=env)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["reported"] == {"temp_c": "21.5"}
        assert json.loads(got.stdout)["seq"] == ack["seq"]
        sdk = subprocess.run(
            [sys.executable, "-c", SDK_FROM_ENV],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert sdk.returncode == 0 and int(sdk.stdout) == ack["seq"], sdk.stderr
        listed = raftstate("device", "list", "--prefix", "pump", env=env)
        assert [json.loads(line)["device_id"] for line in listed.stdout.splitlines()] == ["pump-1"]
        assert listed.stderr.strip() == "1 device"
        # The client flags instead of the environment, before or after the command.
        flags = ["--endpoints", endpoints, "--ca", exports["RAFTSTATE_CA"]]
        flags += ["--token-file", str(tmp_path / "state" / "pki" / "admin.token")]
        for argv in (
            [*flags, "device", "get", "pump-1"],
            ["device", "get", "pump-1", *flags],
        ):
            by_flags = raftstate(*argv, env=bare)
            assert by_flags.returncode == 0, by_flags.stderr
            assert json.loads(by_flags.stdout)["seq"] == ack["seq"]
        bad = raftstate("device", "heartbeat", "bad id", env=env)
        assert bad.returncode == 1 and "InvalidArgument: device_id:" in bad.stderr
        status = raftstate("status", env=env)
        assert status.returncode == 0 and "3/3 nodes answering" in status.stdout
        # Followers send each other nothing: those links have measured no
        # loss, and say so ("-"), instead of showing the 2 % prior.
        leader = status.stdout.rsplit("leader: ", 1)[1].strip()
        links = [line.split() for line in status.stdout.splitlines() if " -> " in line]
        idle = [row for row in links if leader not in (row[0], row[2])]
        assert len(links) == 6 and len(idle) == 2, status.stdout
        assert all(row[6] == "-" for row in idle), status.stdout
    finally:
        up.send_signal(signal.SIGINT)
        rc = up.wait(timeout=60)
    text = out.read_text()
    assert rc == 0, text
    assert "stopped 3 nodes" in text
    assert (tmp_path / "state" / "cluster.toml").exists()
    for key in ("ca.key", "n1.key", "admin.key", "token.key", "admin.token"):
        assert (tmp_path / "state" / "pki" / key).stat().st_mode & 0o777 == 0o600
