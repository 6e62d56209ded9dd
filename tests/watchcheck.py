"""Helpers for the watch tests: a watcher thread, node tables with presence,
and the checks that a watcher's events are complete, ordered and exact."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from raftstate.errors import RaftStateError
from raftstate.sdk import DeviceClient, EventKind, SyncWatch, WatchEvent
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import device_pb2, device_pb2_grpc

#: (seq, reported, revision, online) of a device as a node holds it.
State = tuple[int, tuple[tuple[str, str], ...], int, bool]


def state_of(device: object) -> State:
    d = device  # raftstate.sdk.Device or a device_pb2.Device
    return (
        int(d.seq),  # type: ignore[attr-defined]
        tuple(sorted(dict(d.reported).items())),  # type: ignore[attr-defined]
        int(d.revision),  # type: ignore[attr-defined]
        bool(d.online),  # type: ignore[attr-defined]
    )


def node_states(endpoint: str, prefix: str, timeout_s: float = 5.0) -> tuple[dict[str, State], int]:
    """device_id -> State as exactly this node holds them (SERIALIZABLE, every
    page), and the store revision of the first page."""
    out: dict[str, State] = {}
    token = ""
    revision = 0
    creds = Credentials.from_env()
    with creds.channel(endpoint) as ch:
        stub = device_pb2_grpc.DeviceStateServiceStub(ch)
        while True:
            res = stub.ListDevices(
                device_pb2.ListDevicesRequest(
                    prefix=prefix, page_size=500, page_token=token,
                    consistency=device_pb2.CONSISTENCY_SERIALIZABLE,
                ),
                timeout=timeout_s, metadata=creds.metadata(),
            )
            revision = revision or res.revision
            for d in res.devices:
                out[d.device_id] = state_of(d)
            token = res.next_page_token
            if not token:
                return out, revision


@dataclass
class Watcher:
    """A ``client.watch`` iterated on a thread until :meth:`stop`."""

    endpoints: list[str]
    prefix: str
    start_revision: int = 0
    progress_interval_ms: int = 300
    events: list[WatchEvent] = field(default_factory=list)
    error: BaseException | None = None
    receive_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client = DeviceClient(self.endpoints, prefer_leader=False)
        self._watch: SyncWatch | None = None

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._watch = self._client.watch(
                prefix=self.prefix, start_revision=self.start_revision, prev_device=True,
                progress_interval_ms=self.progress_interval_ms, retry_s=60.0,
            )
            for ev in self._watch:
                self.events.append(ev)
                self.receive_times.append(time.monotonic())
        except RaftStateError as err:
            self.error = err
        except concurrent.futures.CancelledError:
            if not self._stop.is_set():
                raise

    @property
    def revision(self) -> int:
        """The revision the watch has been served through."""
        w = self._watch
        return 0 if w is None else w.revision

    @property
    def resumes(self) -> int:
        w = self._watch
        return 0 if w is None else w.resumes

    def wait_revision(self, revision: int, timeout_s: float = 30.0) -> None:
        """Wait until the watch has been served through ``revision`` (its
        events may still sit in the SDK's buffer: see :meth:`drain`)."""
        deadline = time.monotonic() + timeout_s
        while self.revision < revision:
            if self.error is not None:
                raise AssertionError(f"watcher failed: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"watcher at revision {self.revision}, not {revision} after {timeout_s}s"
                )
            time.sleep(0.05)

    def drain(self, endpoints: list[str], sentinel: str, timeout_s: float = 30.0) -> int:
        """Commit a heartbeat of ``sentinel`` (a device of the prefix), wait
        until its event has been consumed (every earlier event then has
        been), drop it from ``events`` and return its revision."""
        with DeviceClient(endpoints) as client:
            ack = client.heartbeat(sentinel, {"sentinel": "1"})
        deadline = time.monotonic() + timeout_s
        while not any(e.revision == ack.revision for e in self.events[-50:]):
            if self.error is not None:
                raise AssertionError(f"watcher failed: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the sentinel event {ack.revision} never arrived")
            time.sleep(0.05)
        # The sentinel is not part of the history checked.
        keep = [i for i, e in enumerate(self.events) if e.revision != ack.revision]
        self.events[:] = [self.events[i] for i in keep]
        self.receive_times[:] = [self.receive_times[i] for i in keep]
        return ack.revision

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        self._thread.join(timeout=10)
        self._client.close()


def check_ordered_once(events: Sequence[WatchEvent], prefix: str) -> list[str]:
    """Problems: revisions not strictly increasing, or devices outside the prefix."""
    problems = []
    for a, b in zip(events, events[1:], strict=False):
        if b.revision <= a.revision:
            problems.append(f"revision {b.revision} after {a.revision} (order/duplicate)")
    outside = [e.device_id for e in events if not e.device_id.startswith(prefix)]
    if outside:
        problems.append(f"{len(outside)} events outside prefix {prefix!r}, e.g. {outside[:3]}")
    return problems


def check_chains(events: Sequence[WatchEvent]) -> list[str]:
    """Per device, each event's previous state is the state the previous
    event left (prev_device), offline events keep seq and reported, online
    events follow an offline or absent state."""
    problems: list[str] = []
    last: dict[str, WatchEvent] = {}
    for ev in events:
        before = last.get(ev.device_id)
        if before is not None:
            left = before.device
            prev = ev.prev_device
            if (left is None) != (prev is None):
                problems.append(f"rev {ev.revision} {ev.device_id}: prev_device {prev} "
                                f"but the previous event left {left}")
            elif left is not None and prev is not None and state_of(left) != state_of(prev):
                problems.append(f"rev {ev.revision} {ev.device_id}: prev_device "
                                f"{state_of(prev)} != previous event's {state_of(left)}")
            if EventKind.ONLINE in ev.kinds and left is not None and left.online:
                problems.append(f"rev {ev.revision} {ev.device_id}: ONLINE while online")
        if EventKind.OFFLINE in ev.kinds:
            if ev.device is None or ev.device.online:
                problems.append(f"rev {ev.revision} {ev.device_id}: OFFLINE but {ev.device}")
            elif ev.prev_device is not None and (
                ev.prev_device.seq != ev.device.seq or ev.prev_device.reported != ev.device.reported
            ):
                problems.append(f"rev {ev.revision} {ev.device_id}: expiry changed the state")
        if EventKind.DELETED in ev.kinds and ev.device is not None:
            problems.append(f"rev {ev.revision} {ev.device_id}: DELETED with a device")
        if ev.device is not None and ev.device.revision != ev.revision:
            problems.append(f"rev {ev.revision} {ev.device_id}: device.revision "
                            f"{ev.device.revision}")
        last[ev.device_id] = ev
    return problems


def check_final_states(
    events: Sequence[WatchEvent], table: dict[str, State], where: str
) -> list[str]:
    """Every device's final state (on one node) equals its last event's state;
    a device absent there was last deleted."""
    problems = []
    last: dict[str, WatchEvent] = {}
    for ev in events:
        last[ev.device_id] = ev
    for device_id, state in sorted(table.items()):
        ev = last.get(device_id)
        if ev is None or ev.device is None or state_of(ev.device) != state:
            shown = None if ev is None else (ev.revision, ev.device and state_of(ev.device))
            problems.append(f"{where}: {device_id} is {state}, last event {shown}")
    for device_id, ev in sorted(last.items()):
        if device_id not in table and EventKind.DELETED not in ev.kinds:
            problems.append(f"{where}: {device_id} absent, last event rev {ev.revision} "
                            f"{sorted(k.name for k in ev.kinds)}")
    return problems


def check_acked_seen(events: Sequence[WatchEvent], acked: dict[str, list[int]]) -> list[str]:
    """Every acknowledged heartbeat that stored its own seq is an event."""
    seen = {(e.device_id, e.device.seq) for e in events
            if e.device is not None and EventKind.HEARTBEAT in e.kinds}
    missing = [(d, s) for d, seqs in acked.items() for s in seqs if (d, s) not in seen]
    if not missing:
        return []
    return [f"{len(missing)} acknowledged heartbeats have no event, e.g. {missing[:5]}"]


Summary = tuple[tuple[int, str, tuple[str, ...], State | None], ...]


def summary(events: Sequence[WatchEvent]) -> Summary:
    """The events as comparable tuples (revision, device, kinds, state)."""
    return tuple(
        (e.revision, e.device_id, tuple(sorted(k.name for k in e.kinds)),
         None if e.device is None else state_of(e.device))
        for e in events
    )
