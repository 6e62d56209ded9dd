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


def test_cluster_up_serves_device_commands_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    # cluster up takes three consecutive ports from each base; pick bases
    # whose whole ranges are free right now (a neighbour of a free port may
    # be some other connection's ephemeral port).
    for _ in range(50):
        grpc_base = free_ports(1)[0]
        raft_base = free_ports(1)[0]
        ports = list(range(grpc_base, grpc_base + 3)) + list(range(raft_base, raft_base + 3))
        if len(set(ports)) == 6 and all(port_is_free("127.0.0.1", p) for p in ports):
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
            lambda: "cluster ready" in out.read_text() or up.poll() is not None,
            60,
            "cluster up to report ready",
        )
        assert up.poll() is None, out.read_text()
        endpoints = ",".join(f"127.0.0.1:{grpc_base + i}" for i in range(3))
        env = {**os.environ, "RAFTSTATE_ENDPOINTS": endpoints}
        hb = raftstate("device", "heartbeat", "pump-1", "--set", "temp_c=21.5", env=env)
        assert hb.returncode == 0, hb.stderr
        ack = json.loads(hb.stdout)
        got = raftstate("device", "get", "pump-1", env=env)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["reported"] == {"temp_c": "21.5"}
        assert json.loads(got.stdout)["seq"] == ack["seq"]
        listed = raftstate("device", "list", "--prefix", "pump", env=env)
        assert [json.loads(line)["device_id"] for line in listed.stdout.splitlines()] == ["pump-1"]
        bad = raftstate("device", "heartbeat", "bad id", env=env)
        assert bad.returncode == 1 and "InvalidArgument: device_id:" in bad.stderr
        status = raftstate("status", env=env)
        assert status.returncode == 0 and "3/3 nodes answering" in status.stdout
    finally:
        up.send_signal(signal.SIGINT)
        rc = up.wait(timeout=60)
    text = out.read_text()
    assert rc == 0, text
    assert "stopped 3 nodes" in text
    assert (tmp_path / "state" / "cluster.toml").exists()
