"""SDK ``list_all`` / ``list_then_watch``: every page, the first included, is
the store as of the listing's revision, even while the node applies.

A node reads its revision and its table at two instants (the tick thread
applies in between); the test server here applies one change exactly
there, the worst case, on a real DeviceTable behind the real handler."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from test_watch_stream import run

from raftstate.config import NodeConfig
from raftstate.model import DevicePage, Heartbeat
from raftstate.rpcguard import RpcGuard
from raftstate.sdk import AsyncDeviceClient
from raftstate.server import DeviceStateService
from raftstate.statemachine import DeviceTable, encode_batch, encode_delete
from raftstate.v1 import device_pb2, device_pb2_grpc


class _ApplyingTable(DeviceTable):
    """Runs the queued apply steps when a current (not pinned) listing
    starts: after the handler read the revision, before the records."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Callable[[], object]] = []

    def list(self, **kw: Any) -> DevicePage:
        if not kw.get("at_revision"):
            while self.steps:
                self.steps.pop(0)()
        return super().list(**kw)


@asynccontextmanager
async def serving(table: DeviceTable) -> AsyncIterator[str]:
    async def read_fence(*a: object) -> None:
        return None

    services = types.SimpleNamespace(
        cfg=NodeConfig.default(),
        table=table,
        hub=None,
        read_fence=read_fence,
        budget=lambda context: 5.0,
        on_denied=lambda *a: None,
    )
    guard = RpcGuard(max_concurrent_rpcs=100, max_streams=100)
    server = grpc.aio.server()
    add = device_pb2_grpc.add_DeviceStateServiceServicer_to_server
    guard.add_guarded(server, add, DeviceStateService(services))  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def test_list_all_first_page_is_at_the_listing_revision_too() -> None:
    async def main() -> None:
        t = _ApplyingTable()
        t.apply(encode_batch([Heartbeat(f"x-{i}", 1, {"v": "old"}) for i in range(4)], 1))
        t.steps += [
            lambda: t.apply_control(encode_delete("x-1", 2)),
            lambda: t.apply(encode_batch([Heartbeat("x-2", 2, {"v": "new"})], 3)),
            lambda: t.apply(encode_batch([Heartbeat("x-9", 1, {})], 3)),
        ]
        async with serving(t) as endpoint:
            client = AsyncDeviceClient([endpoint], prefer_leader=False)
            async with client:
                listing = await client.list_all("x-", page_size=2)
        want = t.list(prefix="x-", limit=100, at_revision=listing.revision).devices
        got = [(d.device_id, d.revision, dict(d.reported)) for d in listing.devices]
        assert got == [(d.device_id, d.revision, d.reported) for d in want]
        assert all(d.revision <= listing.revision for d in listing.devices)

    run(main)


def test_list_all_of_an_empty_store_is_empty_at_revision_zero() -> None:
    async def main() -> None:
        t = _ApplyingTable()
        t.steps.append(lambda: t.apply(encode_batch([Heartbeat("x-1", 1, {})], 1)))
        async with serving(t) as endpoint:
            client = AsyncDeviceClient([endpoint], prefer_leader=False)
            async with client:
                listing = await client.list_all("x-")
        assert all(d.revision <= listing.revision for d in listing.devices)

    run(main)


class _ApplyingOnGet(DeviceTable):
    """Runs the queued apply steps when a current read of one device
    starts: after the handler read the revision, before the record."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Callable[[], object]] = []

    def get(self, device_id: str) -> Any:
        while self.steps:
            self.steps.pop(0)()
        return super().get(device_id)


def test_get_reports_a_revision_at_which_the_device_had_the_returned_state() -> None:
    async def main() -> None:
        t = _ApplyingOnGet()
        t.apply(encode_batch([Heartbeat("x", 1, {"v": "old"})], 1))
        t.steps.append(lambda: t.apply(encode_batch([Heartbeat("x", 2, {"v": "new"})], 2)))
        async with serving(t) as endpoint:
            async with grpc.aio.insecure_channel(endpoint) as ch:
                api = device_pb2_grpc.DeviceStateServiceStub(ch)
                res = await api.GetDevice(device_pb2.GetDeviceRequest(device_id="x"))
        device, revision = res.device, res.revision
        assert device.revision <= revision
        at = t.get_at("x", revision)
        assert at is not None and at.reported == device.reported

    run(main)
