"""Watch slots (``watch_max_watchers``) come back however a watch ends:
a client that vanishes, and a client that stops reading for good."""

from __future__ import annotations

import asyncio

from test_watch_stream import run, serving, stub, until
from watchfakes import FakeWindow

from raftstate.v1 import device_pb2


def test_watches_cancelled_abruptly_give_their_slots_back() -> None:
    async def main() -> None:
        window = FakeWindow()
        async with serving(window, watch_max_watchers=40) as s:
            for _ in range(2):
                ch, api = stub(s.port)
                calls = [api.Watch(device_pb2.WatchRequest(prefix=f"p{i}")) for i in range(40)]
                for c in calls:
                    assert (await c.read()).created
                assert s.hub.watchers == 40 and s.guard.watches.open == 40
                for i in range(40):
                    window.append(f"p{i}")
                await ch.close()  # every call dropped at once, mid-stream
                await until(lambda: s.hub.watchers == 0 and s.guard.watches.open == 0)
            assert s.hub._all == set() and s.hub._by_prefix == {}

    run(main)


def test_a_dropped_watcher_that_never_reads_again_gives_its_slot_back() -> None:
    """The hub drops a watcher that does not read (WatcherTooSlow) at once,
    but its stream stays blocked in a write that flow control holds back;
    that write must not keep a watch_max_watchers slot forever."""

    async def main() -> None:
        window = FakeWindow()
        async with serving(window, watch_max_pending=20, watch_max_watchers=1) as s:
            ch, api = stub(s.port)
            call = api.Watch(device_pb2.WatchRequest(prefix="big"))
            assert (await call.read()).created
            reported = {"k": "x" * 4000}
            n = 0
            while s.hub.stats.slow_dropped == 0:
                for _ in range(200):
                    window.append("big", reported=reported)
                    n += 1
                await asyncio.sleep(0.001)
                assert n < 200_000, "the watcher was never ended"
            assert s.hub.watchers == 0
            await until(lambda: s.guard.watches.open == 0)
            # The slot is usable again.
            ch2, api2 = stub(s.port)
            again = api2.Watch(device_pb2.WatchRequest())
            assert (await again.read()).created
            again.cancel()
            call.cancel()
            await ch.close()
            await ch2.close()

    run(main)


def test_the_largest_valid_watch_request_is_served_not_refused() -> None:
    """1000 ids of 128 characters, every kind, the largest progress interval
    and start revision: created at once (a start in the future waits)."""

    async def main() -> None:
        window = FakeWindow()
        window.append("a")
        async with serving(window) as s:
            ch, api = stub(s.port)
            ids = [f"{i:04d}" + "x" * 124 for i in range(1000)]
            request = device_pb2.WatchRequest(
                device_ids=ids,
                kinds=[1, 2, 3, 4, 5] * 20,
                progress_interval_ms=2**32 - 1,
                start_revision=2**64 - 1,
                prev_device=True,
            )
            call = api.Watch(request)
            first = await call.read()
            assert first.created and first.revision == 1 and s.hub.watchers == 1
            call.cancel()
            await until(lambda: s.hub.watchers == 0 and s.guard.watches.open == 0)
            await ch.close()

    run(main)
