"""The Watch RPC over real gRPC in one process: the handler, the admission
layer (its own gate, bytes passed through), the SDK's Watch, against a watch
hub fed by a small fake event window (no Raft)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from watchfakes import FakeWindow

from raftstate import richstatus
from raftstate.config import NodeConfig
from raftstate.errors import (
    InvalidArgument,
    ResourceExhausted,
    ResyncRequired,
    RevisionCompacted,
    WatcherTooSlow,
)
from raftstate.model import REPORTED_MAX_BYTES
from raftstate.rpcguard import RpcGuard
from raftstate.sdk import AsyncDeviceClient, EventKind
from raftstate.server import DeviceStateService
from raftstate.v1 import device_pb2, device_pb2_grpc
from raftstate.watchhub import KIND_DELETED, KIND_HEARTBEAT, KIND_OFFLINE, WatchHub
from raftstate.watchwire import encode_event


class Served:
    def __init__(self, server: grpc.aio.Server, port: int, hub: WatchHub, guard: RpcGuard):
        self.server, self.port, self.hub, self.guard = server, port, hub, guard

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(window: FakeWindow, **cfg: Any) -> AsyncIterator[Served]:
    """A gRPC server whose Watch follows ``window``."""
    config = NodeConfig.default(**cfg)
    hub = WatchHub(window, encode_event, max_pending=config.watch_max_pending)
    hub.attach(asyncio.get_running_loop())
    window.set_listener(hub.notify)
    services = types.SimpleNamespace(cfg=config, hub=hub, on_denied=lambda *a: None)
    guard = RpcGuard(
        max_concurrent_rpcs=100, max_streams=100, max_watchers=config.watch_max_watchers
    )
    server = grpc.aio.server()
    add = device_pb2_grpc.add_DeviceStateServiceServicer_to_server
    guard.add_guarded(server, add, DeviceStateService(services))  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(server, port, hub, guard)
    finally:
        await server.stop(0)


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def stub(port: int) -> tuple[grpc.aio.Channel, Any]:
    ch = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 4 << 20)]
    )
    return ch, device_pb2_grpc.DeviceStateServiceStub(ch)


def error_of(e: grpc.aio.AioRpcError) -> Any:
    return richstatus.decode_trailer(e.code(), e.details() or "", e.trailing_metadata())


def test_watch_sends_created_then_every_matching_revision_once_in_order() -> None:
    async def main() -> None:
        window = FakeWindow()
        for i in range(5):
            window.append(f"pump-{i}", reported={"v": str(i)})
        async with serving(window) as s:
            ch, api = stub(s.port)
            call = api.Watch(device_pb2.WatchRequest(prefix="pump-", start_revision=2))
            first = await call.read()
            assert first.created and not first.events and first.revision == 1
            for i in range(5, 40):
                window.append(f"pump-{i % 7}" if i % 3 else f"valve-{i}", reported={"v": str(i)})
            want = [
                r for r, ev in window.events.items() if r >= 2 and ev.device_id.startswith("pump-")
            ]
            got: list[device_pb2.Event] = []
            while len(got) < len(want):
                r = await call.read()
                got += list(r.events)
                assert r.revision >= (got[-1].revision if got else 0)
            assert [e.revision for e in got] == want
            ev = got[-1]
            assert ev.device.device_id == ev.device_id and ev.device.revision == ev.revision
            assert list(ev.kinds) == [device_pb2.EVENT_KIND_HEARTBEAT]
            call.cancel()
            await ch.close()
            await until(lambda: s.hub.watchers == 0)

    run(main)


def test_kinds_filter_and_prev_device() -> None:
    async def main() -> None:
        window = FakeWindow()
        async with serving(window) as s:
            ch, api = stub(s.port)
            call = api.Watch(
                device_pb2.WatchRequest(
                    kinds=[device_pb2.EVENT_KIND_OFFLINE, device_pb2.EVENT_KIND_DELETED],
                    prev_device=True,
                )
            )
            assert (await call.read()).created
            window.append("a", reported={"x": "1"})
            window.append("a", KIND_OFFLINE, reported={"x": "1"})
            window.append("b", KIND_HEARTBEAT, reported={})
            window.append("b", KIND_DELETED)
            r1 = await call.read()
            events = list(r1.events)
            if len(events) < 2:
                events += list((await call.read()).events)
            assert [(e.revision, e.device_id) for e in events] == [(2, "a"), (4, "b")]
            assert events[0].prev_device.seq == 1 and events[0].device.seq == 2
            assert not events[1].HasField("device")  # deleted
            call.cancel()
            await ch.close()

    run(main)


def test_a_quiet_watcher_gets_progress_with_the_current_revision() -> None:
    async def main() -> None:
        window = FakeWindow()
        async with serving(window) as s:
            ch, api = stub(s.port)
            call = api.Watch(device_pb2.WatchRequest(prefix="x", progress_interval_ms=100))
            assert (await call.read()).created
            loop = asyncio.get_running_loop()
            for _ in range(30):
                window.append("a")
            t0 = loop.time()
            r = await call.read()
            while r.revision < 30:
                r = await call.read()
            assert not r.events and not r.created
            assert loop.time() - t0 < 2.0
            call.cancel()
            await ch.close()

    run(main)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        (dict(prefix="a", device_ids=["b"]), "device_ids"),
        (dict(device_ids=[f"d{i}" for i in range(1001)]), "device_ids"),
        (dict(device_ids=["ok", "bad id"]), "device_ids[1]"),
        (dict(prefix="no spaces"), "prefix"),
        (dict(kinds=[device_pb2.EVENT_KIND_HEARTBEAT, 9]), "kinds[1]"),
        (dict(kinds=[0]), "kinds[0]"),
        (dict(progress_interval_ms=99), "progress_interval_ms"),
    ],
)
def test_invalid_requests_are_refused_naming_the_field(
    request_fields: dict[str, Any], field: str
) -> None:
    async def main() -> None:
        async with serving(FakeWindow()) as s:
            ch, api = stub(s.port)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await api.Watch(device_pb2.WatchRequest(**request_fields)).read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            err = error_of(e.value)
            assert isinstance(err, InvalidArgument) and err.field == field
            assert s.hub.watchers == 0
            await ch.close()

    run(main)


def test_a_start_older_than_the_window_is_out_of_range_with_both_revisions() -> None:
    async def main() -> None:
        window = FakeWindow(limit=10)
        for _ in range(25):
            window.append("a")
        async with serving(window) as s:
            ch, api = stub(s.port)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await api.Watch(device_pb2.WatchRequest(start_revision=3)).read()
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
            err = error_of(e.value)
            assert isinstance(err, RevisionCompacted)
            assert (err.oldest_revision, err.current_revision) == (16, 25)
            await ch.close()

    run(main)


def test_watchers_per_node_are_bounded_by_their_own_gate() -> None:
    async def main() -> None:
        async with serving(FakeWindow(), watch_max_watchers=2) as s:
            ch, api = stub(s.port)
            calls = [api.Watch(device_pb2.WatchRequest()) for _ in range(2)]
            for c in calls:
                assert (await c.read()).created
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await api.Watch(device_pb2.WatchRequest()).read()
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "watch_max_watchers" in (e.value.details() or "")
            for c in calls:
                c.cancel()
            await ch.close()

    run(main)


@settings(max_examples=4, deadline=None)
@given(size=st.sampled_from([0, 1, REPORTED_MAX_BYTES // 2, REPORTED_MAX_BYTES - 8]))
def test_a_watcher_that_does_not_read_is_ended_with_its_resume_revision(size: int) -> None:
    """Payloads from empty to the largest allowed reported state: the slow
    watcher's queue stays bounded by watch_max_pending whatever the size."""

    async def main() -> None:
        window = FakeWindow()
        async with serving(window, watch_max_pending=20) as s:
            ch, api = stub(s.port)
            call = api.Watch(device_pb2.WatchRequest(prefix="big"))
            assert (await call.read()).created
            value = "x" * max(0, size - 1)
            reported = {"k": value} if size else {}
            n = 0
            while s.hub.stats.slow_dropped == 0:
                for _ in range(200):
                    window.append("big", reported=reported)
                    n += 1
                await asyncio.sleep(0.001)
                assert n < 200_000, "the watcher was never ended"
            assert s.hub.watchers == 0
            resume = None
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while True:
                    r = await call.read()
                    resume = r.revision
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            err = error_of(e.value)
            assert isinstance(err, WatcherTooSlow) and err.reason == "WATCHER_TOO_SLOW"
            assert resume is not None and err.resume_revision == resume + 1
            await ch.close()

    run(main)


def test_sdk_watch_resumes_on_another_endpoint_without_loss_or_duplicate() -> None:
    async def main() -> None:
        a, b = FakeWindow(), FakeWindow()

        def both(dev: str) -> None:
            a.append(dev, reported={"n": dev})
            b.append(dev, reported={"n": dev})

        async with serving(a) as sa, serving(b) as sb:
            client = AsyncDeviceClient([sa.endpoint, sb.endpoint], prefer_leader=False)
            got: list[int] = []
            async with client, client.watch(prefix="p", start_revision=1) as w:
                for i in range(10):
                    both(f"p{i}")
                while len(got) < 10:
                    got.append((await anext(w)).revision)
                await sa.server.stop(0)  # the node it watches goes away
                for i in range(10, 20):
                    both(f"p{i}" if i % 2 else f"q{i}")
                while len(got) < 15:
                    got.append((await anext(w)).revision)
                assert w.resumes >= 1 and w.endpoint == sb.endpoint
            assert got == list(range(1, 11)) + [r for r in range(11, 21) if r % 2 == 0]

    run(main)


def test_sdk_raises_resync_required_when_no_endpoint_retains_the_revision() -> None:
    async def main() -> None:
        a, b = FakeWindow(limit=5), FakeWindow(limit=8)
        for _ in range(20):
            a.append("a")
            b.append("a")
        async with serving(a) as sa, serving(b) as sb:
            client = AsyncDeviceClient([sa.endpoint, sb.endpoint], prefer_leader=False)
            async with client:
                with pytest.raises(ResyncRequired) as e:
                    async with client.watch(start_revision=4):
                        pass
                w = client.watch(start_revision=4)  # lazily opened: raised by the iteration
                with pytest.raises(ResyncRequired):
                    await anext(w)
            assert (e.value.oldest_revision, e.value.current_revision) == (16, 20)
            assert e.value.wanted_revision == 4

    run(main)


def test_sdk_watch_kinds_and_typed_events() -> None:
    async def main() -> None:
        window = FakeWindow()
        async with serving(window) as s:
            client = AsyncDeviceClient([s.endpoint], prefer_leader=False)
            async with client, client.watch(kinds=[EventKind.OFFLINE], prev_device=True) as w:
                assert s.hub.watchers == 1  # registered once entered
                window.append("a", reported={"t": "1"})
                window.append("a", KIND_OFFLINE, reported={"t": "1"})
                ev = await anext(w)
            assert (ev.revision, ev.device_id, ev.kinds) == (2, "a", frozenset({EventKind.OFFLINE}))
            assert ev.device is not None and ev.device.reported == {"t": "1"}
            assert ev.prev_device is not None and ev.prev_device.seq == 1

    run(main)


def test_sdk_watch_refuses_bad_arguments_at_once() -> None:
    async def main() -> None:
        async with serving(FakeWindow()) as s:
            client = AsyncDeviceClient([s.endpoint], prefer_leader=False)
            async with client:
                with pytest.raises(InvalidArgument) as e:
                    await client.watch(prefix="a", device_ids=["b"]).start()
            assert e.value.field == "device_ids"

    run(main)


def test_resource_exhausted_is_the_retriable_base_of_watcher_too_slow() -> None:
    assert issubclass(WatcherTooSlow, ResourceExhausted) and WatcherTooSlow(3).retriable
