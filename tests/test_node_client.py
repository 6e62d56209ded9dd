"""A Node (grpc-js) client generated from proto/ alone works end to end.

tests/node/smoke.js loads every .proto under proto/ with @grpc/proto-loader
(the packages come from tests/node/package-lock.json, installed by
scripts/bootstrap.sh) and runs heartbeat, retry, get, list, a Watch stream, status, an error
whose google.rpc.Status details it decodes from the grpc-status-details-bin
trailer, and reflection's service list against a real three-node cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.local import LocalCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "tests" / "node"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (scripts/bootstrap.sh installs nodejs)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("tests/node/node_modules missing: run scripts/bootstrap.sh (npm ci)")
    return node


def test_a_grpc_js_client_built_from_proto_runs_the_smoke_flow(
    tmp_path: Path,
) -> None:
    node = _node()
    from raftstate.config import NodeConfig

    cluster = LocalCluster(tmp_path / "c", 3, base_config=NodeConfig.for_tests())
    cluster.start(timeout_s=60)
    try:
        run = subprocess.run(
            [node, "smoke.js", cluster.endpoints[1], str(REPO / "proto"), "nodejs"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        cluster.stop()
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert int(out["heartbeat"]["revision"]) > 0 and not out["heartbeat"]["duplicate"]
    assert out["retry_duplicate"] is True
    got = out["get"]
    assert got["device_id"] == "nodejs-1" and got["reported"] == {"fw": "1.2.3"}
    assert got["ttl_s"] == 60 and got["online"] is True
    assert got["seq"] == out["heartbeat"]["stored_seq"]
    assert out["list"] == ["nodejs-1"]
    watch = out["watch"]
    assert watch["created"] is True
    assert watch["events"][0] == {
        "revision": out["heartbeat"]["revision"],
        "device_id": "nodejs-1",
        "kinds": ["EVENT_KIND_REPORTED_CHANGED", "EVENT_KIND_HEARTBEAT", "EVENT_KIND_ONLINE"],
    }
    assert out["status"]["members"] == 3
    assert out["status"]["role"] in ("ROLE_LEADER", "ROLE_FOLLOWER")

    err = out["error"]
    assert err is not None and err["code"] == 3  # INVALID_ARGUMENT
    status = err["status"]
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status["code"] == 3 and status["message"].startswith("seq:")
    details = status["details"]
    assert details["google.rpc.ErrorInfo"]["domain"] == "raftstate.dev"
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    violations = details["google.rpc.BadRequest"]["fieldViolations"]
    assert [v["field"] for v in violations] == ["seq"]

    assert out["reflection"] == sorted(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "raftstate.v1.AuthService",
            "raftstate.v1.ClusterService",
            "raftstate.v1.DeviceStateService",
        ]
    )
