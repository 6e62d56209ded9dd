"""The command line's numbers and flags, as a user types them: real
``raftstate`` processes, no cluster.

Every out-of-range number is refused while parsing, before anything runs:
exit status 2, one line on stderr naming the flag, never a traceback. Values
come from both edges of each range (just outside is refused, the edge itself
accepted). The client flags work before, between and after the command words.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.local import free_ports
from raftstate.cli.argtypes import SECONDS_MAX, UINT64_MAX, Integer, Real
from raftstate.cli.main import build_parser
from raftstate.cli.words import plural
from raftstate.model import TTL_MAX_S

U64 = str(UINT64_MAX)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RAFTSTATE_")}


def run(
    *argv: str, module: str = "raftstate", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


#: (command line, the flag the error must name). Each value sits just
#: outside its range (or is not a finite number).
REFUSED = [
    ("device heartbeat pump-1 --seq -1", "--seq"),
    ("device heartbeat pump-1 --seq 0", "--seq"),
    (f"device heartbeat pump-1 --seq {UINT64_MAX + 1}", "--seq"),
    ("device heartbeat pump-1 --seq 1.5", "--seq"),
    ("device heartbeat pump-1 --ttl -5", "--ttl"),
    (f"device heartbeat pump-1 --ttl {TTL_MAX_S + 1}", "--ttl"),
    ("device list --limit 0", "--limit"),
    ("device heartbeat pump-1 --set novalue", "--set"),
    ("node --config node.toml --set =x", "--set"),
    ("", "COMMAND"),
    ("device get pump-1 --deadline 0", "--deadline"),
    ("--deadline nan device get pump-1", "--deadline"),
    ("device get pump-1 --deadline inf", "--deadline"),
    ("status --deadline -1", "--deadline"),
    ("cluster up --size 0", "--size"),
    ("cluster up --size 10", "--size"),
    ("cluster up --grpc-port 0", "--grpc-port"),
    ("cluster up --grpc-port 65536", "--grpc-port"),
    ("cluster up --raft-port -1", "--raft-port"),
    # The last node's mTLS port (grpc + size - 1 + 50) must exist too.
    ("cluster up --grpc-port 65484", "--grpc-port"),
    ("cluster up --raft-port 65534", "--raft-port"),
    ("cluster up --for-seconds 0", "--for-seconds"),
    ("simulate --devices 0", "--devices"),
    ("simulate --interval 0", "--interval"),
    ("simulate --duration -1", "--duration"),
    ("rendezvous --listen :0 --max-connections 0", "--max-connections"),
    ("rendezvous --listen :0 --max-per-source -1", "--max-per-source"),
    ("rendezvous --listen :0 --handshake-timeout 0", "--handshake-timeout"),
    ("auth issue --role device --ttl 0", "--ttl"),
    ("auth issue --role device --ttl 401d", "--ttl"),
    ("bench --procs 0", "--procs"),
    ("bench --devices 0", "--devices"),
    ("bench --duration 0", "--duration"),
    ("bench --warmup -0.001", "--warmup"),
    ("bench --sequential 0", "--sequential"),
    ("bench --streams 0", "--streams"),
    ("bench --rounds 0", "--rounds"),
    ("bench --hb-rate 0", "--hb-rate"),
    ("bench --cost-gap-ms -1", "--cost-gap-ms"),
    (f"bench --duration {SECONDS_MAX * 2}", "--duration"),
    ("chaos bench --profile weak --heartbeats 0", "--heartbeats"),
    ("chaos bench --profile weak --read-rate -1", "--read-rate"),
    ("chaos flood --window 0", "--window"),
    ("lab up --sites 0", "--sites"),
    ("lab up --sites 201", "--sites"),
    ("lab bench --rate 0", "--rate"),
    ("lab bench --warmup -1", "--warmup"),
]


@pytest.mark.parametrize(("argv", "flag"), REFUSED, ids=[a for a, _ in REFUSED])
def test_out_of_range_number_is_one_line_exit_2_naming_the_flag(argv: str, flag: str) -> None:
    res = run(*argv.split())
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert flag in lines[0], lines[0]
    assert res.stdout == ""


def test_toxiproxy_port_out_of_range_is_one_line() -> None:
    res = run("--port", "65536", module="chaos.proxy")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--port" in res.stderr


def test_edge_values_reach_the_cluster_call(tmp_path: Path) -> None:
    """The largest seq and ttl get past parsing and the SDK's own checks:
    the command fails only because nothing listens at the endpoint."""
    port = free_ports(1)[0]
    res = run(
        "device", "heartbeat", "pump-1", "--seq", U64, "--ttl", str(TTL_MAX_S),
        "--endpoints", f"127.0.0.1:{port}", "--deadline", "0.3",
    )  # fmt: skip
    assert res.returncode == 1, res
    assert "Unavailable" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "argv",
    [
        "--endpoints {ep} --deadline 0.3 device get pump-1",
        "device --endpoints {ep} get pump-1 --deadline 0.3",
        "device get pump-1 --endpoints {ep} --deadline 0.3",
        "--endpoints 127.0.0.1:1 device get pump-1 --endpoints {ep} --deadline 0.3",
        "--endpoints {ep} --deadline 0.3 status",
        "--deadline 0.3 auth revoke abc --endpoints {ep}",
    ],
)
def test_client_flags_work_before_and_after_the_command(argv: str) -> None:
    """The endpoint named (innermost wins) is the one dialled: its port
    appears in the connection error."""
    port = free_ports(1)[0]
    res = run(*argv.format(ep=f"127.0.0.1:{port}").split())
    assert res.returncode == 1, res
    assert f"127.0.0.1:{port}" in res.stdout + res.stderr, res
    assert "Traceback" not in res.stderr


def test_client_flag_on_a_command_that_takes_none_is_refused() -> None:
    res = run("--endpoints", "127.0.0.1:7001", "secret")
    assert res.returncode == 2 and res.stdout == ""
    assert (
        res.stderr.strip()
        == "raftstate: --endpoints applies to status, device, auth and simulate only"
    )


def test_unreadable_credential_file_is_one_line(tmp_path: Path) -> None:
    res = run("--token-file", str(tmp_path / "missing"), "device", "get", "pump-1")
    assert res.returncode == 2 and "--token-file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run("device", "get", "pump-1", "--cert", __file__)
    assert res.returncode == 2 and "--key" in res.stderr and "Traceback" not in res.stderr


def test_edges_inside_every_range_parse() -> None:
    """In-process: each edge value just inside a range is taken as given."""
    p = build_parser()
    hb = p.parse_args(["device", "heartbeat", "x", "--seq", U64, "--ttl", "0"])
    assert hb.seq == UINT64_MAX and hb.ttl == 0
    assert p.parse_args(["device", "heartbeat", "x", "--seq", "1"]).seq == 1
    up = p.parse_args(["cluster", "up", "--size", "9", "--grpc-port", "65483", "--raft-port", "1"])
    assert (up.size, up.grpc_port, up.raft_port) == (9, 65483, 1)
    assert p.parse_args(["device", "list", "--limit", "1"]).limit == 1
    assert p.parse_args(["bench", "--warmup", "0"]).warmup == 0.0
    assert p.parse_args(["bench", "--duration", str(SECONDS_MAX)]).duration == SECONDS_MAX
    assert p.parse_args(["auth", "issue", "--role", "device", "--ttl", "400d"]).ttl == 400 * 86400
    assert p.parse_args(["lab", "up", "--sites", "200"]).sites == 200
    assert p.parse_args(["chaos", "bench", "--profile", "weak", "--read-rate", "0"]).read_rate == 0


@given(
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(0, 2**66), st.integers(0, 2**66)
)
def test_integer_type_accepts_exactly_its_range(value: int, lo: int, span: int) -> None:
    t = Integer(lo, lo + span)
    if lo <= value <= lo + span:
        assert t(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer from"):
            t(str(value))


@given(st.floats(allow_nan=True, allow_infinity=True), st.booleans())
def test_real_type_accepts_exactly_finite_values_in_range(value: float, inclusive: bool) -> None:
    t = Real(0.0, 1e6, lo_inclusive=inclusive)
    ok = math.isfinite(value) and (value >= 0 if inclusive else value > 0) and value <= 1e6
    if ok:
        assert t(repr(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="must be a number"):
            t(repr(value))


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 devices"), (1, "1 device"), (2, "2 devices"), (1000, "1,000 devices")]
)
def test_counted_nouns_agree_with_the_count(n: int, text: str) -> None:
    assert plural(n, "device") == text
    assert plural(1, "process", "processes") == "1 process"
    assert plural(3, "process", "processes") == "3 processes"


@pytest.mark.parametrize(
    ("seq", "ttl_s", "field"),
    [(-1, None, "seq"), (0, None, "seq"), (UINT64_MAX + 1, None, "seq"), (None, -5, "ttl_s"),
     (None, TTL_MAX_S + 1, "ttl_s")],
)  # fmt: skip
def test_sdk_refuses_out_of_range_seq_and_ttl_naming_the_field(
    seq: int | None, ttl_s: int | None, field: str
) -> None:
    """The root of the CLI's old traceback: the SDK raised protobuf's
    ValueError. Now InvalidArgument, before anything is sent."""
    from raftstate.errors import InvalidArgument
    from raftstate.sdk import DeviceClient

    with DeviceClient("127.0.0.1:1", deadline_s=0.1) as client:
        with pytest.raises(InvalidArgument) as exc:
            client.heartbeat("pump-1", {}, seq=seq, ttl_s=ttl_s)
        assert exc.value.field == field
        assert client._client._last_seq == {}  # noqa: SLF001 - nothing noted for a refused seq
