"""Log entries of a real (single-member, in-process) RaftNode are
raftstate commands, never pickles: proposals apply and reach the callback,
anything else is refused before the log and never unpickled on apply."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import FAIL_REASON

from cluster.local import free_ports, wait_until
from raftstate import logcommand
from raftstate.config import Member, NodeConfig
from raftstate.errors import DecodeError
from raftstate.model import Heartbeat
from raftstate.raftnode import SUCCESS, RaftNode
from raftstate.secretcheck import generate_secret
from raftstate.statemachine import DeviceTable, encode_batch

SECRET = generate_secret()

REQUEST_DENIED = FAIL_REASON.REQUEST_DENIED


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.fixture
def node(tmp_path: Path) -> Any:
    raft_port, grpc_port = free_ports(2)
    cfg = NodeConfig.for_tests(
        transport="tcp",
        node_id="n1",
        members=(Member("n1", f"127.0.0.1:{raft_port}", f"127.0.0.1:{grpc_port}"),),
        cluster_secret=SECRET,
        data_dir=str(tmp_path / "n1"),
    )
    cfg.validate()
    raft = RaftNode(cfg, DeviceTable())
    try:
        wait_until(raft.is_leader, 10, "the single member to lead")
        yield raft
    finally:
        raft.destroy()


def _call(fn: Any, *args: Any) -> tuple[Any, int]:
    done = threading.Event()
    out: list[tuple[Any, int]] = []

    def callback(result: Any, err: int) -> None:
        out.append((result, err))
        done.set()

    fn(*args, callback)
    assert done.wait(10), "no callback"
    return out[0]


def test_proposal_is_applied_and_its_results_reach_the_callback(node: RaftNode) -> None:
    entry = encode_batch([Heartbeat("dev-1", 1, {"k": "v"})], 1)
    results, err = _call(node.propose, entry)
    assert err == SUCCESS
    assert [(r.stored_seq, r.duplicate) for r in results] == [(1, False)]
    command = node._SyncObj__getEntries(node._last_log_index())[0][0]
    assert command == logcommand.encode(entry)


def test_foreign_commands_never_enter_the_log(node: RaftNode, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    pickled = b"\x00" + pickle.dumps((0, (_Evil(str(sentinel)),)), 2)
    before = node._last_log_index()
    result, err = _call(node._applyCommand, pickled)
    assert (result, err) == (None, REQUEST_DENIED)
    assert node._last_log_index() == before
    assert not sentinel.exists()


def test_applying_a_pickled_command_raises_decode_error_without_unpickling(
    node: RaftNode, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"
    pickled = b"\x00" + pickle.dumps((0, (_Evil(str(sentinel)),)), 2)
    with pytest.raises(DecodeError):
        node._SyncObj__doApplyCommand(pickled)
    assert node._SyncObj__doApplyCommand(b"\x01") is None  # NO_OP
    assert not sentinel.exists()
