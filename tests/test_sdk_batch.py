"""SDK heartbeat_batch against a scripted in-process server: only retriable
failures are re-sent, always with the same seq; acked items never again."""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import given
from hypothesis import strategies as st

from raftstate.errors import DeadlineExceeded, InvalidArgument, QuotaExceeded, Unavailable
from raftstate.sdk import AsyncDeviceClient, Backoff
from raftstate.sdk.batch import plan_chunks
from raftstate.v1 import device_pb2, device_pb2_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Scripted(device_pb2_grpc.DeviceStateServiceServicer):
    """Answers per item from ``script[device_id]``: a list of codes, one per
    time that device is seen (then OK); records every request."""

    def __init__(self, script: dict[str, list[tuple[int, str]]]) -> None:
        self.script = script
        self.seen: list[list[tuple[str, int]]] = []

    async def HeartbeatBatch(  # noqa: N802
        self, request: device_pb2.HeartbeatBatchRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HeartbeatBatchResponse:
        self.seen.append([(h.device_id, h.seq) for h in request.heartbeats])
        out = device_pb2.HeartbeatBatchResponse()
        for i, h in enumerate(request.heartbeats):
            ack = out.acks.add(device_id=h.device_id, seq=h.seq)
            todo = self.script.get(h.device_id)
            if todo:
                code, message = todo.pop(0)
                ack.code = code
                ack.message = message.replace("{i}", str(i))
            else:
                ack.result.revision = 1
                ack.result.stored_seq = h.seq
        return out


async def serve(servicer: Scripted) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    device_pb2_grpc.add_DeviceStateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_only_retriable_failures_are_resent_with_the_same_seq() -> None:
    async def main() -> None:
        servicer = Scripted(
            {
                "b": [(UNAVAILABLE, "not committed in time"), (UNAVAILABLE, "again")],
                "c": [(EXHAUSTED, "max_pending_heartbeats: full")],
                "d": [(EXHAUSTED, "max_devices: quota")],
                "e": [(INVALID, "heartbeats[{i}].seq: too far ahead")],
            }
        )
        server, addr = await serve(servicer)
        try:
            async with AsyncDeviceClient(
                addr, prefer_leader=False, backoff=Backoff(base_s=0.001, cap_s=0.002)
            ) as client:
                items = [(d, {}) for d in "abcdef"]
                res = await client.heartbeat_batch(items)
        finally:
            await server.stop(None)
        assert [r.ok for r in res] == [True, True, True, False, False, True]
        assert isinstance(res[3].error, QuotaExceeded)
        assert isinstance(res[4].error, InvalidArgument)
        assert res[4].error.field == "heartbeats[4].seq"  # the caller's index
        first = dict(servicer.seen[0])
        assert [d for d, _ in servicer.seen[0]] == list("abcdef")
        assert [d for d, _ in servicer.seen[1]] == ["b", "c"]
        assert [d for d, _ in servicer.seen[2]] == ["b"]
        assert len(servicer.seen) == 3
        for request in servicer.seen[1:]:
            assert all(seq == first[d] for d, seq in request)  # never a new seq
        assert res[1].ack is not None and res[1].ack.attempts == 3

    asyncio.run(main())


def test_items_still_failing_at_the_deadline_get_unavailable() -> None:
    async def main() -> None:
        servicer = Scripted({"x": [(UNAVAILABLE, "no leader elected")] * 1000})
        server, addr = await serve(servicer)
        try:
            async with AsyncDeviceClient(
                addr, prefer_leader=False, backoff=Backoff(base_s=0.01, cap_s=0.02)
            ) as client:
                res = await client.heartbeat_batch([("x", {}), ("y", {})], deadline_s=0.5)
        finally:
            await server.stop(None)
        assert res[1].ok
        assert isinstance(res[0].error, Unavailable)
        assert not isinstance(res[0].error, DeadlineExceeded)
        assert "no leader elected" in res[0].error.message

    asyncio.run(main())


@given(
    sizes=st.lists(st.integers(0, 10_000), max_size=3000),
    max_items=st.integers(1, 1000),
    max_bytes=st.integers(1, 4 * 1024 * 1024),
)
def test_chunks_cover_every_item_in_order_within_both_bounds(
    sizes: list[int], max_items: int, max_bytes: int
) -> None:
    chunks = plan_chunks(sizes, max_items, max_bytes)
    assert [i for c in chunks for i in c] == list(range(len(sizes)))
    for c in chunks:
        assert 1 <= len(c) <= max_items
        assert len(c) == 1 or sum(sizes[i] + 4 for i in c) <= max_bytes
