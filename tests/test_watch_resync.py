"""History compacted past a watcher's revision: a typed error, then an exact resync.

Every node keeps a tiny event window (``watch_history_events``). A watcher
that was away while more changes committed than the window holds cannot
resume: the SDK raises ``ResyncRequired`` carrying the oldest retained and
the current revision (the server's ``OUT_OF_RANGE`` / ``REVISION_COMPACTED``
with the same metadata). ``list_then_watch`` then lists at one revision and
watches from the next; applying its events to the listing must give exactly
every node's final table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest
from watchcheck import node_states, state_of

from chaos.verify import wait_converged
from cluster.local import LocalCluster
from raftstate.errors import RevisionCompacted
from raftstate.richstatus import decode_trailer
from raftstate.sdk import DeviceClient, ResyncRequired
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc

pytestmark = [pytest.mark.cluster]

PREFIX = "rs-"
WINDOW = 16


def _raw_watch_error(endpoint: str, start_revision: int) -> grpc.RpcError:
    creds = Credentials.from_env()
    with creds.channel(endpoint) as ch:
        call = device_pb2_grpc.DeviceStateServiceStub(ch).Watch(
            device_pb2.WatchRequest(prefix=PREFIX, start_revision=start_revision),
            timeout=10, metadata=creds.metadata(),
        )
        with pytest.raises(grpc.RpcError) as exc:
            for _ in call:
                pass
        return exc.value


def test_compaction_past_a_watchers_revision_is_a_typed_error_then_list_then_watch_resyncs(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(watch_history_events=WINDOW)
    with DeviceClient(cluster.endpoints) as client:
        for i in range(5):
            client.heartbeat(f"{PREFIX}{i}", {"n": "0"})
        # A watcher follows from the start, then goes away.
        with client.watch(prefix=PREFIX, start_revision=1) as w:
            seen = [w.next(timeout_s=10) for _ in range(5)]
        assert [e.revision for e in seen] == sorted({e.revision for e in seen})
        resume = seen[-1].revision + 1
        # While it is away, more changes commit than any node retains.
        for n in range(3 * WINDOW):
            client.heartbeat(f"{PREFIX}{n % 5}", {"n": str(n + 1)})
        ack = client.heartbeat(f"{PREFIX}0", {"n": "last"})
        wait_converged(cluster.endpoints, 30)

        with (
            pytest.raises(ResyncRequired) as exc,
            client.watch(prefix=PREFIX, start_revision=resume) as w,
        ):
            w.next(timeout_s=30)  # (the watch may already raise when it registers)
        err = exc.value
        assert err.wanted_revision == resume
        assert resume < err.oldest_revision <= err.current_revision
        assert err.current_revision >= ack.revision
        assert err.current_revision - err.oldest_revision + 1 <= WINDOW

        # The server's own answer: OUT_OF_RANGE, REVISION_COMPACTED, the same revisions.
        raw = _raw_watch_error(cluster.endpoints[0], resume)
        assert raw.code() == grpc.StatusCode.OUT_OF_RANGE
        typed = decode_trailer(raw.code(), raw.details() or "", raw.trailing_metadata())
        assert isinstance(typed, RevisionCompacted), typed
        assert typed.oldest_revision > resume and typed.current_revision >= ack.revision

        # Resync: list at one revision, watch from the next, while changes go on.
        listing, watch = client.list_then_watch(PREFIX, progress_interval_ms=200)
        local = {d.device_id: state_of(d) for d in listing.devices}
        assert len(local) == 5
        done = threading.Event()

        def more_changes() -> None:
            with DeviceClient(cluster.endpoints) as writer:
                writer.delete(f"{PREFIX}3")
                writer.heartbeat(f"{PREFIX}new", {"n": "1"})
                for n in range(WINDOW // 2):
                    writer.heartbeat(f"{PREFIX}{n % 3}", {"n": f"r{n}"})
            done.set()

        changer = threading.Thread(target=more_changes, daemon=True)
        changer.start()
        with watch:
            changer.join(60)
            assert done.is_set()
            wait_converged(cluster.endpoints, 30)
            tables = {e: node_states(e, PREFIX) for e in cluster.endpoints}
            final = max(rev for _, rev in tables.values())
            last = listing.revision
            while last < final:  # the last change is a heartbeat of this prefix
                ev = watch.next(timeout_s=10)
                assert ev.revision > last
                last = ev.revision
                if ev.device is None:
                    local.pop(ev.device_id, None)
                else:
                    local[ev.device_id] = state_of(ev.device)
    for endpoint, (table, _) in tables.items():
        assert local == table, f"resynced copy differs from {endpoint}"
    assert f"{PREFIX}3" not in local and f"{PREFIX}new" in local


def test_a_watcher_too_slow_for_a_tiny_window_gets_resync_required_never_a_silent_gap(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """A registered watcher that does not read while megabytes of changes
    commit is ended by its node (WATCHER_TOO_SLOW, more than
    ``watch_max_pending`` queued); the SDK resumes, but no node retains the
    revision it needs any more: it must deliver a gapless prefix of the
    history and then raise ResyncRequired, never skip ahead."""
    cluster = make_cluster(watch_history_events=WINDOW, watch_max_pending=8)
    big = {f"k{i}": "x" * 1000 for i in range(7)}  # about 7 KB per event
    with DeviceClient(cluster.endpoints) as client:
        client.heartbeat("slow-0", {"n": "0"})
        with client.watch(prefix="slow-", start_revision=1) as w:
            for n in range(4):  # 200 changes, about 1.4 MB, while nobody reads
                client.heartbeat_batch(
                    [(f"slow-{i}", {**big, "n": str(n)}) for i in range(50)]
                )
            got = []
            with pytest.raises(ResyncRequired) as exc:
                while True:
                    got.append(w.next(timeout_s=30).revision)
    err = exc.value
    assert got == list(range(1, len(got) + 1)), "events must be gapless up to the error"
    assert err.wanted_revision == len(got) + 1 < err.oldest_revision <= err.current_revision
    print(f"delivered {len(got)} events, then {err}")


def test_closing_a_sync_watch_from_another_thread_ends_its_iteration(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """Was a w-api bug (the iterating thread got concurrent CancelledError),
    fixed in 2634666."""
    cluster = make_cluster(size=1)
    outcome: list[object] = []
    with DeviceClient(cluster.endpoints) as client:
        client.heartbeat("close-0", {})
        watch = client.watch(prefix="close-", start_revision=1)

        def consume() -> None:
            try:
                outcome.extend(ev.revision for ev in watch)
                outcome.append("ended")
            except BaseException as err:  # noqa: BLE001 - the outcome is what is checked
                outcome.append(err)

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.02)
        watch.close()
        reader.join(10)
    assert outcome == [1, "ended"], outcome
