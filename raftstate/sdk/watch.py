"""Watch: a resumable stream of committed device changes.

Theory of operation
-------------------
A :class:`Watch` is an async iterator of :class:`~raftstate.sdk.types.WatchEvent`
over one ``DeviceStateService.Watch`` call at a time, to any node (each node
serves watches from its own applied state, in revision order).

* **Resume point.** ``revision`` is the revision through which the watch has
  been served: the highest event revision received, or the ``revision`` of a
  created/progress response (every matching event up to it was sent). After
  a failure the watch reopens with ``start_revision = max(requested start,
  revision + 1)``, so nothing after it is lost.
* **No duplicate.** Events with a revision at or below the highest already
  received are dropped, whichever node sends them.
* **Failover.** ``UNAVAILABLE``, a server-side ``CANCELLED``, a
  ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED`` (``WatcherTooSlow`` included),
  a stream that ends, or one silent for ``idle_timeout_s`` (a stopped node;
  the server sends progress every ``progress_interval_ms``) move to the next
  endpoint after a jittered backoff (:class:`~raftstate.sdk.retry.Backoff`).
  After ``retry_s`` seconds without a successful open the last error is
  raised.
* **Compaction.** ``RevisionCompacted`` on one node tries the others (their
  windows differ); when every endpoint has answered it, the watch raises
  :class:`~raftstate.errors.ResyncRequired`: list again at a revision and
  watch from there (``AsyncDeviceClient.list_then_watch``). A gap is never
  silent.
* Other errors (``InvalidArgument`` naming the field, ``PermissionDenied``,
  ``Unauthenticated``) are raised at once.

Use from the client's event loop; ``close()`` (or ``async with``) ends the
call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from raftstate.errors import (
    RaftStateError,
    ResyncRequired,
    RevisionCompacted,
    Unavailable,
)
from raftstate.richstatus import decode_trailer
from raftstate.sdk.core import ClientCore
from raftstate.sdk.retry import retry_allowed
from raftstate.sdk.types import EventKind, WatchEvent
from raftstate.v1 import device_pb2, device_pb2_grpc

#: The server's default progress interval (``watch_progress_ms``).
DEFAULT_PROGRESS_S = 5.0
#: A stream silent for this many progress intervals is taken for dead.
IDLE_INTERVALS = 3


class Watch:
    """An async iterator of events (module docstring). Create with
    :meth:`AsyncDeviceClient.watch`."""

    def __init__(
        self,
        client: ClientCore,
        *,
        prefix: str = "",
        device_ids: Sequence[str] = (),
        kinds: Iterable[EventKind] = (),
        start_revision: int = 0,
        prev_device: bool = False,
        progress_interval_ms: int = 0,
        retry_s: float = 60.0,
        idle_timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._template = device_pb2.WatchRequest(
            prefix=prefix,
            device_ids=list(device_ids),
            kinds=[device_pb2.EventKind.ValueType(int(k)) for k in kinds],
            prev_device=prev_device,
            progress_interval_ms=progress_interval_ms,
        )
        #: The first revision asked for (0: from the moment the watch opens).
        self.start_revision = start_revision
        #: Served through this revision (module docstring); 0 until known.
        self.revision = start_revision - 1 if start_revision else 0
        self.retry_s = retry_s
        interval = progress_interval_ms / 1000 if progress_interval_ms else DEFAULT_PROGRESS_S
        self.idle_timeout_s = idle_timeout_s or IDLE_INTERVALS * interval
        #: Times the watch reopened on a node (for tests and logs).
        self.resumes = 0
        #: The endpoint of the open call.
        self.endpoint = ""
        self._index = client._next
        self._buffer: deque[WatchEvent] = deque()
        self._call: Any = None
        self._known = start_revision != 0
        self._closed = False

    def __aiter__(self) -> Watch:
        return self

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def start(self) -> None:
        """Open the watch on a node and wait until it is registered there
        (its ``created`` response): changes committed after this returns are
        delivered even with ``start_revision`` 0. ``async with`` calls it;
        iterating without it opens lazily. Raises as iterating does."""
        if self._call is None and not self._buffer:
            await self._fill()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the open call; the iterator then ends. Idempotent."""
        self._closed = True
        self._cancel()

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def __anext__(self) -> WatchEvent:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self._fill()
        return self._buffer.popleft()

    async def _fill(self) -> None:
        """Read one response into the buffer, (re)opening the call as needed."""
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        compacted: dict[str, RevisionCompacted] = {}
        attempt = 0
        while True:
            err: RaftStateError | None = None
            if self._call is None:
                self._open()
            try:
                response = await asyncio.wait_for(self._call.read(), self.idle_timeout_s)
            except grpc.aio.AioRpcError as e:
                err = decode_trailer(e.code(), e.details() or "", e.trailing_metadata())
            except asyncio.CancelledError:
                if self._closed and not _cancelling():
                    # close() cancelled the call under this read (another
                    # task or thread): the iteration ends.
                    raise StopAsyncIteration from None
                self._cancel()  # reopened from the resume point next time
                raise
            except TimeoutError:
                err = Unavailable(
                    f"watch: no response from {self.endpoint} for {self.idle_timeout_s:.1f} s",
                    "WATCH_IDLE",
                )
            else:
                if response is grpc.aio.EOF:
                    err = Unavailable(f"watch: {self.endpoint} ended the stream", "WATCH_ENDED")
                else:
                    self._take(response)
                    return
            if self._closed:
                raise StopAsyncIteration
            self._cancel()
            if isinstance(err, RevisionCompacted):
                compacted[self.endpoint] = err
                if len(compacted) >= len(self._client.endpoints):
                    newest = max(compacted.values(), key=lambda c: c.oldest_revision)
                    raise ResyncRequired(
                        newest.oldest_revision, newest.current_revision, self._resume_from()
                    ) from err
            elif not retry_allowed(err, caller_cancelling=_cancelling()):
                raise err
            now = loop.time()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= self.retry_s:
                raise err
            self._index += 1
            delay = (
                0.0
                if isinstance(err, RevisionCompacted)
                else (self._client.backoff.after(attempt, err))
            )
            attempt += 1
            await asyncio.sleep(delay)

    def _resume_from(self) -> int:
        if not self._known:
            return 0
        return max(self.start_revision, self.revision + 1)

    def _open(self) -> None:
        client = self._client
        self.endpoint = client.endpoints[self._index % len(client.endpoints)]
        request = device_pb2.WatchRequest()
        request.CopyFrom(self._template)
        request.start_revision = self._resume_from()
        stub = device_pb2_grpc.DeviceStateServiceStub(client._channel(self.endpoint))
        self._call = stub.Watch(request, metadata=client._metadata)
        if self._known:
            self.resumes += 1

    def _take(self, response: device_pb2.WatchResponse) -> None:
        for ev in response.events:
            if ev.revision <= self.revision and self._known:
                continue  # already delivered (a resume overlaps)
            self._buffer.append(WatchEvent.from_proto(ev))
            self.revision = ev.revision
            self._known = True
        if response.revision > self.revision or (response.created and not self._known):
            self.revision = max(self.revision, response.revision)
            self._known = True


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


__all__ = ["Watch"]
