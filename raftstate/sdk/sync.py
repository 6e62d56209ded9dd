"""DeviceClient: the blocking device SDK.

It runs an :class:`~raftstate.sdk.client.AsyncDeviceClient` on a private
event loop in a daemon thread and waits for each call, so the sync and async
SDKs share one implementation of leader finding, retries and seq handling.
A ``DeviceClient`` may be used from several threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from raftstate.model import Consistency, OnlineFilter
from raftstate.sdk.client import AsyncDeviceClient
from raftstate.sdk.stream import HeartbeatStream
from raftstate.sdk.types import (
    BatchItem,
    BatchResult,
    ClusterStatus,
    DeleteResult,
    Device,
    DevicePage,
    EventKind,
    HeartbeatAck,
    Listing,
    WatchEvent,
)
from raftstate.sdk.watch import Watch

T = TypeVar("T")


class DeviceClient:
    """Blocking device SDK; see :class:`AsyncDeviceClient` for semantics.
    Every method raises what its async twin raises."""

    def __init__(self, endpoints: str | Sequence[str], **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raftstate-sdk", daemon=True
        )
        self._thread.start()
        self._client: AsyncDeviceClient = self._run(_make(endpoints, options))
        self._closed = False

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close channels and stop the private loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def heartbeat(
        self,
        device_id: str,
        reported: Mapping[str, str],
        *,
        seq: int | None = None,
        ttl_s: int | None = None,
        deadline_s: float | None = None,
    ) -> HeartbeatAck:
        return self._run(
            self._client.heartbeat(device_id, reported, seq=seq, ttl_s=ttl_s, deadline_s=deadline_s)
        )

    def heartbeat_batch(
        self,
        items: Sequence[BatchItem | tuple[str, Mapping[str, str]]],
        *,
        deadline_s: float | None = None,
    ) -> list[BatchResult]:
        return self._run(self._client.heartbeat_batch(items, deadline_s=deadline_s))

    def get(
        self,
        device_id: str,
        consistency: Consistency = Consistency.LINEARIZABLE,
        *,
        at_revision: int = 0,
        deadline_s: float | None = None,
    ) -> Device:
        return self._run(
            self._client.get(
                device_id, consistency, at_revision=at_revision, deadline_s=deadline_s
            )
        )

    def list(
        self,
        prefix: str = "",
        *,
        online: OnlineFilter = OnlineFilter.ALL,
        page_size: int = 100,
        page_token: str = "",
        consistency: Consistency = Consistency.LINEARIZABLE,
        at_revision: int = 0,
        deadline_s: float | None = None,
    ) -> DevicePage:
        return self._run(
            self._client.list(
                prefix,
                online=online,
                page_size=page_size,
                page_token=page_token,
                consistency=consistency,
                at_revision=at_revision,
                deadline_s=deadline_s,
            )
        )

    def iter_devices(self, prefix: str = "", **kwargs: Any) -> Iterator[Device]:
        token = ""
        while True:
            page = self.list(prefix, page_token=token, **kwargs)
            yield from page.devices
            if not page.next_page_token:
                return
            token = page.next_page_token

    def status(self, endpoint: str | None = None, *, timeout_s: float = 2.0) -> ClusterStatus:
        return self._run(self._client.status(endpoint, timeout_s=timeout_s))

    def delete(self, device_id: str, *, deadline_s: float | None = None) -> DeleteResult:
        return self._run(self._client.delete(device_id, deadline_s=deadline_s))

    def find_leader(self, *, timeout_s: float = 2.0) -> str | None:
        return self._run(self._client.find_leader(timeout_s=timeout_s))

    def watch(
        self,
        *,
        prefix: str = "",
        device_ids: Sequence[str] = (),
        kinds: Sequence[EventKind] = (),
        start_revision: int = 0,
        prev_device: bool = False,
        progress_interval_ms: int = 0,
        retry_s: float = 60.0,
    ) -> SyncWatch:
        """Blocking twin of :meth:`AsyncDeviceClient.watch`: an iterator of
        ``WatchEvent``; use as ``with client.watch(...) as w: for ev in w``."""
        watch = self._run(
            _make_watch(
                self._client,
                dict(
                    prefix=prefix,
                    device_ids=device_ids,
                    kinds=kinds,
                    start_revision=start_revision,
                    prev_device=prev_device,
                    progress_interval_ms=progress_interval_ms,
                    retry_s=retry_s,
                ),
            )
        )
        return SyncWatch(self._loop, watch)

    def list_all(self, prefix: str = "", *, page_size: int = 1000) -> Listing:
        return self._run(self._client.list_all(prefix, page_size=page_size))

    def list_then_watch(
        self, prefix: str = "", **kwargs: Any
    ) -> tuple[Listing, SyncWatch]:
        """Blocking twin of :meth:`AsyncDeviceClient.list_then_watch`."""
        listing, watch = self._run(self._client.list_then_watch(prefix, **kwargs))
        self._run(watch.start())
        return listing, SyncWatch(self._loop, watch)

    def stream(
        self, *, max_in_flight: int = 256, endpoint: str | None = None
    ) -> SyncHeartbeatStream:
        """Blocking twin of :meth:`AsyncDeviceClient.stream`; use as ``with``."""
        return SyncHeartbeatStream(
            self._loop,
            self._run(_make_stream(self._client, max_in_flight, endpoint)),
        )


class SyncWatch:
    """A :class:`~raftstate.sdk.watch.Watch` iterated from a thread. Same
    events, resumes and errors; ``revision`` is the resume point."""

    def __init__(self, loop: asyncio.AbstractEventLoop, watch: Watch) -> None:
        self._loop = loop
        self._watch = watch

    @property
    def revision(self) -> int:
        return self._watch.revision

    @property
    def resumes(self) -> int:
        return self._watch.resumes

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return asyncio.run_coroutine_threadsafe(_next_event(self._watch), self._loop).result()
        except StopAsyncIteration:
            raise StopIteration from None

    def next(self, timeout_s: float | None = None) -> WatchEvent:
        """The next event; ``TimeoutError`` if none comes within ``timeout_s``
        (the watch stays usable)."""
        fut = asyncio.run_coroutine_threadsafe(_next_event(self._watch), self._loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no event within {timeout_s} s") from None

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the watch. Idempotent."""
        self._loop.call_soon_threadsafe(self._watch.close)


async def _next_event(watch: Watch) -> WatchEvent:
    return await anext(watch)


async def _make_watch(client: AsyncDeviceClient, options: dict[str, Any]) -> Watch:
    watch = client.watch(**options)
    await watch.start()
    return watch


class SyncHeartbeatStream:
    """A :class:`~raftstate.sdk.stream.HeartbeatStream` driven from threads.

    ``send`` blocks until its ack; ``submit`` returns a
    ``concurrent.futures.Future`` at once, so one thread can pipeline many
    heartbeats. Both are safe to call from any number of threads and raise
    (or resolve with) what :meth:`HeartbeatStream.send` raises.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: HeartbeatStream) -> None:
        self._loop = loop
        self._stream = stream

    def __enter__(self) -> SyncHeartbeatStream:
        asyncio.run_coroutine_threadsafe(self._stream.__aenter__(), self._loop).result()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        asyncio.run_coroutine_threadsafe(
            self._stream.__aexit__(exc_type, None, None), self._loop
        ).result()

    def submit(
        self,
        device_id: str,
        reported: Mapping[str, str],
        *,
        seq: int | None = None,
        ttl_s: int | None = None,
        deadline_s: float | None = None,
    ) -> concurrent.futures.Future[HeartbeatAck]:
        return asyncio.run_coroutine_threadsafe(
            self._stream.send(device_id, reported, seq=seq, ttl_s=ttl_s, deadline_s=deadline_s),
            self._loop,
        )

    def send(
        self,
        device_id: str,
        reported: Mapping[str, str],
        *,
        seq: int | None = None,
        ttl_s: int | None = None,
        deadline_s: float | None = None,
    ) -> HeartbeatAck:
        return self.submit(
            device_id, reported, seq=seq, ttl_s=ttl_s, deadline_s=deadline_s
        ).result()


async def _make_stream(
    client: AsyncDeviceClient, max_in_flight: int, endpoint: str | None
) -> HeartbeatStream:
    return client.stream(max_in_flight=max_in_flight, endpoint=endpoint)


async def _make(endpoints: str | Sequence[str], options: dict[str, Any]) -> AsyncDeviceClient:
    return AsyncDeviceClient(endpoints, **options)
