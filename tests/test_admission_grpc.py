"""The node's gRPC admission layer, in process: the real server wiring
(``raftstate.node.grpc_server``) in front of a proposer whose commits the
test controls, so limits and back-pressure are checked exactly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from raftstate.admission import STREAM_WINDOW_KEY, Quota
from raftstate.config import NodeConfig
from raftstate.model import Heartbeat, HeartbeatResult
from raftstate.node import grpc_server
from raftstate.sdk import AsyncDeviceClient
from raftstate.sdk.inflight import InFlight
from raftstate.server import NodeServices
from raftstate.statemachine import DeviceTable
from raftstate.v1 import device_pb2, device_pb2_grpc

REQ = device_pb2.HeartbeatRequest


class FakeProposer:
    """Hands out futures the test resolves; records the most heartbeats
    ever waiting at once."""

    def __init__(self, auto_commit_s: float | None = None) -> None:
        self.quota = Quota()
        self.pending: list[asyncio.Future[HeartbeatResult]] = []
        self.submitted = 0
        self.widest = 0
        self.auto_commit_s = auto_commit_s

    def submit(self, hb: Heartbeat) -> asyncio.Future[HeartbeatResult]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[HeartbeatResult] = loop.create_future()
        self.submitted += 1
        self.pending = [f for f in self.pending if not f.done()] + [fut]
        self.widest = max(self.widest, len(self.pending))
        if self.auto_commit_s is not None:
            loop.call_later(self.auto_commit_s, _commit, fut, hb.seq)
        return fut

    def commit(self, n: int) -> None:
        for fut in [f for f in self.pending if not f.done()][:n]:
            _commit(fut, 1)


def _commit(fut: asyncio.Future[HeartbeatResult], seq: int) -> None:
    if not fut.done():
        fut.set_result(HeartbeatResult(1, False, seq))


class FakeRaft:
    def leader_raft_address(self) -> str | None:
        return "leader"


async def _serve(proposer: FakeProposer, **cfg: Any) -> tuple[grpc.aio.Server, str]:
    config = NodeConfig.default(**{"auth": "off", "insecure_grpc": True, **cfg})
    services = NodeServices(config, DeviceTable(), FakeRaft(), proposer, None)  # type: ignore[arg-type]
    server, _guard, _health = grpc_server(services)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_a_stream_is_not_read_past_its_window_until_acks_free_it() -> None:
    async def run() -> None:
        proposer = FakeProposer()
        server, addr = await _serve(proposer, stream_window=8)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                call = device_pb2_grpc.DeviceStateServiceStub(ch).HeartbeatStream()
                assert (STREAM_WINDOW_KEY, "8") in tuple(await call.initial_metadata())
                for i in range(1, 21):
                    await call.write(REQ(device_id=f"d{i}", seq=1))
                await _until(lambda: proposer.submitted == 8)
                await asyncio.sleep(0.3)  # give an unbounded reader the chance to overrun
                assert proposer.submitted == 8
                proposer.commit(3)
                for i in range(1, 4):
                    ack = await call.read()
                    assert ack.device_id == f"d{i}" and ack.code == 0
                await _until(lambda: proposer.submitted == 11)
                proposer.commit(100)
                while proposer.submitted < 20 or any(not f.done() for f in proposer.pending):
                    proposer.commit(100)
                    await asyncio.sleep(0.005)
                await call.done_writing()
                acks = []
                while (ack := await call.read()) is not grpc.aio.EOF:
                    acks.append(ack)
                assert [a.device_id for a in acks] == [f"d{i}" for i in range(4, 21)]
                assert proposer.widest == 8
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_the_sdk_stream_keeps_within_the_nodes_window(monkeypatch: pytest.MonkeyPatch) -> None:
    widest = 0
    sent = InFlight.sent

    def spy(self: InFlight, msg: Any) -> None:
        nonlocal widest
        sent(self, msg)
        widest = max(widest, len(self))

    monkeypatch.setattr(InFlight, "sent", spy)

    async def run() -> None:
        proposer = FakeProposer(auto_commit_s=0.01)
        server, addr = await _serve(proposer, stream_window=4)
        try:
            async with AsyncDeviceClient([addr], prefer_leader=False) as client:
                async with client.stream(max_in_flight=100) as stream:
                    acks = await asyncio.gather(
                        *(stream.send(f"dev-{i}", {"k": "v"}) for i in range(60))
                    )
            assert len(acks) == 60 and stream.reconnects == 0
        finally:
            await server.stop(None)

    asyncio.run(run())
    assert widest == 4


def test_unary_calls_past_max_concurrent_rpcs_are_refused_naming_it() -> None:
    async def run() -> None:
        proposer = FakeProposer()
        server, addr = await _serve(proposer, max_concurrent_rpcs=4)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                held = [
                    asyncio.ensure_future(stub.Heartbeat(REQ(device_id=f"h{i}", seq=1), timeout=20))
                    for i in range(4)
                ]
                await _until(lambda: proposer.submitted == 4)
                for i in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Heartbeat(REQ(device_id=f"x{i}", seq=1), timeout=5)
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "max_concurrent_rpcs" in (info.value.details() or "")
                assert proposer.submitted == 4  # refused before reaching the handler
                proposer.commit(4)
                await asyncio.gather(*held)
                proposer.auto_commit_s = 0.0
                res = await stub.Heartbeat(REQ(device_id="after", seq=1), timeout=5)
                assert res.stored_seq == 1  # the gate was released
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_streams_past_max_streams_are_refused_naming_it_and_freed_on_close() -> None:
    async def run() -> None:
        server, addr = await _serve(FakeProposer(), max_streams=3)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = device_pb2_grpc.DeviceStateServiceStub(ch)
                open_calls = [stub.HeartbeatStream() for _ in range(3)]
                for call in open_calls:
                    await call.initial_metadata()
                extra = stub.HeartbeatStream()
                assert await extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = await extra.details()
                assert "max_streams" in details and "3" in details
                await open_calls[0].done_writing()
                assert await open_calls[0].code() == grpc.StatusCode.OK
                again = stub.HeartbeatStream()
                assert (STREAM_WINDOW_KEY, "256") in tuple(await again.initial_metadata())
                for call in [*open_calls[1:], again]:
                    call.cancel()
        finally:
            await server.stop(None)

    asyncio.run(run())


def _identity(b: bytes) -> bytes:
    return b


BAD = {
    "corrupt": b"\xff\xff\xff\xff",
    "utf8": REQ(device_id="x", seq=1).SerializeToString().replace(b"x", b"\xff"),
}


def test_undecodable_requests_are_invalid_argument_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def run() -> list[device_pb2.HeartbeatStreamResponse]:
        server, addr = await _serve(FakeProposer(auto_commit_s=0.0))
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                unary = ch.unary_unary(
                    "/raftstate.v1.DeviceStateService/Heartbeat",
                    request_serializer=_identity,
                    response_deserializer=_identity,
                )
                for _ in range(100):
                    for kind, raw in BAD.items():
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await unary(raw, timeout=5)
                        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                        details = info.value.details() or ""
                        assert "raftstate.v1.HeartbeatRequest" in details
                        if kind == "utf8":
                            assert "UTF-8" in details
                stream = ch.stream_stream(
                    "/raftstate.v1.DeviceStateService/HeartbeatStream",
                    request_serializer=_identity,
                    response_deserializer=device_pb2.HeartbeatStreamResponse.FromString,
                )

                async def requests() -> AsyncIterator[bytes]:
                    yield REQ(device_id="ok", seq=1).SerializeToString()
                    yield BAD["utf8"]

                call = stream(requests())
                acks: list[device_pb2.HeartbeatStreamResponse] = []
                try:
                    async for ack in call:
                        acks.append(ack)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                return acks
        finally:
            await server.stop(None)

    acks = asyncio.run(run())
    assert [(a.device_id, a.code) for a in acks] == [("ok", 0)]  # answered before the end
    refusals = [r for r in caplog.records if r.name == "raftstate.rpcguard"]
    # 200 bad unary calls and one bad stream: one line per method.
    assert len(refusals) == 2, [r.getMessage() for r in refusals]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
