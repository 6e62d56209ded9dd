"""HeartbeatBatch admission and deadlines, in process: the real server wiring
and the real Proposer in front of a Raft whose commits the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from raftstate.config import NodeConfig
from raftstate.node import grpc_server
from raftstate.proposer import Proposer
from raftstate.raftnode import SUCCESS, ProposeCallback
from raftstate.server import NodeServices
from raftstate.statemachine import DeviceTable
from raftstate.v1 import device_pb2, device_pb2_grpc

HB = device_pb2.HeartbeatRequest
OK = 0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


class HeldRaft:
    """A leader whose proposals commit only when the test says."""

    def __init__(self) -> None:
        self.table = DeviceTable()
        self.entries: list[tuple[bytes, ProposeCallback]] = []

    def leader_raft_address(self) -> str | None:
        return "leader"

    def propose(self, entry: bytes, callback: ProposeCallback) -> None:
        self.entries.append((entry, callback))

    def commit(self, n: int | None = None) -> None:
        todo = self.entries[:n] if n is not None else self.entries
        self.entries = self.entries[len(todo) :]
        for entry, callback in todo:
            callback(self.table.apply(entry), SUCCESS)


async def serve(**cfg: Any) -> tuple[grpc.aio.Server, str, HeldRaft, Proposer]:
    config = NodeConfig.default(**{"auth": "off", "insecure_grpc": True, **cfg})
    raft = HeldRaft()
    proposer = Proposer(config, raft.propose, asyncio.get_running_loop())
    services = NodeServices(config, raft.table, raft, proposer, None)  # type: ignore[arg-type]
    server, _guard, _health = grpc_server(services)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", raft, proposer


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def reqs(prefix: str, n: int) -> device_pb2.HeartbeatBatchRequest:
    return device_pb2.HeartbeatBatchRequest(
        heartbeats=[HB(device_id=f"{prefix}{i}", seq=1) for i in range(n)]
    )


def test_a_full_proposer_refuses_the_later_items_of_a_request_per_item() -> None:
    async def main() -> None:
        server, addr, raft, proposer = await serve(
            max_pending_heartbeats=10, batch_rpc_max_heartbeats=10
        )
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                first = asyncio.ensure_future(stub.HeartbeatBatch(reqs("a", 6), timeout=10))
                await until(lambda: proposer.room == 4)
                second = asyncio.ensure_future(stub.HeartbeatBatch(reqs("b", 6), timeout=10))
                await until(lambda: proposer.room == 0)
                while not (first.done() and second.done()):
                    raft.commit()
                    await asyncio.sleep(0.005)
                assert [a.code for a in (await first).acks] == [OK] * 6
                acks = (await second).acks
                assert [a.code for a in acks] == [OK] * 4 + [EXHAUSTED] * 2
                assert acks[4].message.startswith("max_pending_heartbeats:")
                assert len(raft.table) == 10
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_items_not_committed_by_the_deadline_are_unavailable_and_no_longer_proposed() -> None:
    async def main() -> None:
        server, addr, raft, proposer = await serve(
            batch_max_heartbeats=2, max_inflight_batches=1
        )
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                call = asyncio.ensure_future(stub.HeartbeatBatch(reqs("d", 5), timeout=1.0))
                await until(lambda: bool(raft.entries))
                raft.commit(1)  # the first two commit; the rest never do
                res = await call
                assert [a.code for a in res.acks] == [OK, OK] + [UNAVAILABLE] * 3
                assert "not committed in time" in res.acks[2].message
                await until(lambda: proposer.room == NodeConfig().max_pending_heartbeats)
                raft.commit()  # whatever was in flight; nothing new is proposed after
                await asyncio.sleep(0.05)
                assert not raft.entries
                assert sorted(d for d in ("d0", "d1") if raft.table.get(d)) == ["d0", "d1"]
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_concurrent_batch_calls_are_bounded_by_their_own_gate() -> None:
    async def main() -> None:
        server, addr, raft, _proposer = await serve(max_concurrent_batch_rpcs=1)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                held = asyncio.ensure_future(stub.HeartbeatBatch(reqs("g", 3), timeout=10))
                await until(lambda: bool(raft.entries))
                try:
                    await stub.HeartbeatBatch(reqs("h", 3), timeout=10)
                    raise AssertionError("a second batch call was admitted")
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert (err.details() or "").startswith("max_concurrent_batch_rpcs:")
                # Unary heartbeats are not held back by the batch gate.
                unary = asyncio.ensure_future(stub.Heartbeat(HB(device_id="u", seq=1), timeout=10))
                while not (held.done() and unary.done()):
                    raft.commit()
                    await asyncio.sleep(0.005)
                assert [a.code for a in (await held).acks] == [OK] * 3
        finally:
            await server.stop(None)

    asyncio.run(main())
