"""Serving one Watch stream: request validation and the per-stream loop.

Theory of operation. ``DeviceStateService.Watch`` (raftstate/server.py)
validates the request (:func:`validate_watch`, INVALID_ARGUMENT naming the
field), then iterates :func:`serve_watch`, which

1. registers a watcher with the node's :class:`~raftstate.watchhub.WatchHub`
   (``RevisionCompacted`` if ``start_revision`` is older than the window);
2. sends the ``created`` response: every matching event up to its
   ``revision`` is accounted for, so a client may resume from revision + 1;
3. loops: takes the next events (catch-up from the window first, then live)
   and sends them as one response carrying the revision it is served
   through; when there is nothing to send it waits for the hub's wake-up or
   its progress timer, and sends a progress response (no events, the
   current position) when it has sent nothing for ``progress_interval``.
   The timer is one ``call_at`` handle re-armed when it fires, so an idle
   watcher costs one callback per interval;
4. ends with the watcher's error when the hub failed it (``WatcherTooSlow``
   after ``watch_max_pending`` events queued while the stream's writes were
   held back by flow control; the queue is freed at once) and unregisters
   the watcher however the stream ends.

Responses are ``bytes`` assembled by raftstate/watchwire.py. Event-loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from raftstate import watchwire
from raftstate.errors import InvalidArgument
from raftstate.model import DEVICE_ID_MAX, DEVICE_ID_RE, validate_device_id
from raftstate.v1 import device_pb2
from raftstate.watchhub import ALL_KINDS, WatchFilter, WatchHub

#: At most this many device ids in one WatchRequest.
MAX_WATCH_IDS = 1000
#: The smallest progress interval a request may ask for.
MIN_PROGRESS_MS = 100
#: Events and bytes per response (a response is one gRPC message; the
#: SDK accepts up to 4 MiB).
RESPONSE_MAX_EVENTS = 1000
RESPONSE_MAX_BYTES = 1024 * 1024


def validate_watch(
    request: device_pb2.WatchRequest, default_progress_ms: int
) -> tuple[WatchFilter, float]:
    """The request as a filter and its progress interval in seconds. Raises
    ``InvalidArgument`` naming the field (nothing is registered)."""
    prefix = request.prefix
    if prefix and (len(prefix) > DEVICE_ID_MAX or DEVICE_ID_RE.fullmatch(prefix) is None):
        raise InvalidArgument("prefix", "may only contain A-Z a-z 0-9 . _ : - (at most 128)")
    ids = request.device_ids
    if ids and prefix:
        raise InvalidArgument("device_ids", "set either prefix or device_ids, not both")
    if len(ids) > MAX_WATCH_IDS:
        raise InvalidArgument("device_ids", f"{len(ids)} ids, at most {MAX_WATCH_IDS}")
    for i, dev in enumerate(ids):
        validate_device_id(dev, f"device_ids[{i}]")
    kinds = 0
    for i, kind in enumerate(request.kinds):
        if not 1 <= kind <= 5:
            raise InvalidArgument(
                f"kinds[{i}]", f"{kind} is not an event kind (1-5; leave kinds empty for all)"
            )
        kinds |= 1 << kind
    interval = request.progress_interval_ms
    if interval and interval < MIN_PROGRESS_MS:
        raise InvalidArgument(
            "progress_interval_ms",
            f"{interval}: must be 0 (the node's default) or at least {MIN_PROGRESS_MS}",
        )
    flt = WatchFilter(
        start_revision=request.start_revision,
        prefix=prefix,
        device_ids=frozenset(ids),
        kinds=kinds or ALL_KINDS,
        prev_device=request.prev_device,
    )
    return flt, (interval or default_progress_ms) / 1000


async def serve_watch(hub: WatchHub, flt: WatchFilter, progress_s: float) -> AsyncIterator[bytes]:
    """The serialized responses of one watch (module docstring). Raises
    ``RevisionCompacted`` at registration or during catch-up, and
    ``WatcherTooSlow`` when the hub dropped the watcher."""
    loop = asyncio.get_running_loop()
    w = hub.register(flt)
    ready = asyncio.Event()
    w.on_ready = ready.set
    due = False

    def fire() -> None:
        nonlocal due
        due = True
        ready.set()

    last = loop.time()
    timer = loop.call_at(last + progress_s, fire)
    try:
        yield watchwire.response((), w.served_through, created=True)
        while True:
            frames, through = hub.take(w, RESPONSE_MAX_EVENTS, RESPONSE_MAX_BYTES)
            if frames:
                yield watchwire.response(frames, through)
                last = loop.time()
                continue
            if hub.catching_up(w):
                await asyncio.sleep(0)  # a long catch-up with nothing matching
                continue
            if due:
                due = False
                now = loop.time()
                if now - last >= progress_s * 0.999:
                    yield watchwire.response((), through)
                    last = now
                timer = loop.call_at(last + progress_s, fire)
                continue
            ready.clear()
            await ready.wait()
    finally:
        timer.cancel()
        hub.unregister(w)


__all__ = ["MAX_WATCH_IDS", "MIN_PROGRESS_MS", "serve_watch", "validate_watch"]
