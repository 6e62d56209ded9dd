"""CANCELLED: a typed, retriable error when the server cancels; never retried
when the caller cancels.

The statuses come from a real gRPC server on loopback that ends its first
calls with ``CANCELLED`` (the status clients met while a node restarted).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from raftstate.errors import Cancelled, RaftStateError, Unavailable, from_status
from raftstate.sdk import AsyncDeviceClient
from raftstate.sdk.retry import Backoff, retry_allowed
from raftstate.v1 import device_pb2, device_pb2_grpc

# ---- the mapping and the policy ----------------------------------------------


def test_cancelled_status_maps_to_a_typed_retriable_error() -> None:
    err = from_status(grpc.StatusCode.CANCELLED, "Cancelled")
    assert isinstance(err, Cancelled)
    assert err.retriable
    assert err.grpc_code == grpc.StatusCode.CANCELLED


def test_retry_policy_never_retries_a_caller_cancellation() -> None:
    server = Cancelled("Cancelled")
    local = Cancelled("Locally cancelled by application!")
    assert retry_allowed(server, caller_cancelling=False)
    assert not retry_allowed(server, caller_cancelling=True)
    assert not retry_allowed(local, caller_cancelling=False)
    assert retry_allowed(Unavailable("x"), caller_cancelling=True)
    assert not retry_allowed(RaftStateError("x"), caller_cancelling=False)


# ---- against a real gRPC server -------------------------------------------------


class CancellingServicer(device_pb2_grpc.DeviceStateServiceServicer):  # type: ignore[misc]
    """Ends the first ``cancel_first`` calls of each method with CANCELLED,
    then answers. ``hang``: never answers."""

    def __init__(self, cancel_first: int, hang: bool = False) -> None:
        self.cancel_first = cancel_first
        self.hang = hang
        self.heartbeats: list[tuple[str, int]] = []
        self.reads = 0

    async def _maybe_cancel(self, n: int, context: grpc.aio.ServicerContext) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if n <= self.cancel_first:
            await context.abort(grpc.StatusCode.CANCELLED, "Cancelled")

    async def Heartbeat(  # noqa: N802
        self, request: device_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HeartbeatResponse:
        self.heartbeats.append((request.device_id, request.seq))
        await self._maybe_cancel(len(self.heartbeats), context)
        return device_pb2.HeartbeatResponse(revision=7, stored_seq=request.seq)

    async def GetDevice(  # noqa: N802
        self, request: device_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.GetDeviceResponse:
        self.reads += 1
        await self._maybe_cancel(self.reads, context)
        return device_pb2.GetDeviceResponse(
            device=device_pb2.Device(device_id=request.device_id, seq=3), revision=7
        )


async def serve(servicer: CancellingServicer) -> AsyncIterator[str]:
    server = grpc.aio.server()
    device_pb2_grpc.add_DeviceStateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def client(endpoint: str) -> AsyncDeviceClient:
    return AsyncDeviceClient(
        [endpoint], prefer_leader=False, deadline_s=5.0, backoff=Backoff(0.001, 0.01)
    )


async def _raw_code(endpoint: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(endpoint) as ch:
        try:
            await device_pb2_grpc.DeviceStateServiceStub(ch).Heartbeat(
                device_pb2.HeartbeatRequest(device_id="d", seq=1), timeout=5
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_the_test_server_really_sends_cancelled() -> None:
    async def main() -> grpc.StatusCode:
        async for ep in serve(CancellingServicer(cancel_first=1)):
            return await _raw_code(ep)
        raise AssertionError("unreachable")

    assert asyncio.run(main()) == grpc.StatusCode.CANCELLED


def test_a_heartbeat_cancelled_by_the_server_is_retried_with_the_same_seq() -> None:
    servicer = CancellingServicer(cancel_first=2)

    async def main() -> None:
        async for ep in serve(servicer):
            async with client(ep) as c:
                ack = await c.heartbeat("pump-1", {"t": "1"})
                assert ack.attempts == 3
                assert c.retries == 2

    asyncio.run(main())
    seqs = {seq for _, seq in servicer.heartbeats}
    assert len(servicer.heartbeats) == 3 and len(seqs) == 1


def test_a_read_cancelled_by_the_server_is_retried() -> None:
    servicer = CancellingServicer(cancel_first=1)

    async def main() -> None:
        async for ep in serve(servicer):
            async with client(ep) as c:
                device = await c.get("pump-1")
                assert device.seq == 3

    asyncio.run(main())
    assert servicer.reads == 2


def test_a_cancellation_the_caller_requested_is_not_retried() -> None:
    servicer = CancellingServicer(cancel_first=0, hang=True)

    async def main() -> None:
        async for ep in serve(servicer):
            async with client(ep) as c:
                task = asyncio.ensure_future(c.heartbeat("pump-1", {"t": "1"}))
                while not servicer.heartbeats:
                    await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert c.retries == 0

    asyncio.run(asyncio.wait_for(main(), 10))
    assert len(servicer.heartbeats) == 1
