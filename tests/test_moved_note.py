"""A sealed ``moved`` note (raftstate/transport/ice.py) is acted on once.

The rendezvous may replay what it relays (raftstate/transport/signalseal.py),
and a note opens again when replayed. Each note acted on makes the UDP
transport challenge the hinted address *and send its link data there too*
until the validation times out, so replaying an old note over and over
would keep a copy of the whole replication stream flowing to an address the
peer once had (someone else's, after a NAT remap) and halve a thin link.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from raftstate.transport.ice import IceReach
from raftstate.transport.signalseal import SignalSealer
from raftstate.transport.udpconfig import IceSettings

SECRET = "cluster secret for the moved-note test"


def _reach(loop: asyncio.AbstractEventLoop) -> tuple[IceReach, list[Any]]:
    reach = IceReach(loop, "a", ["b"], SECRET, IceSettings("127.0.0.1:9", "127.0.0.1:9"))
    hints: list[Any] = []
    reach._moved = lambda peer_id, address: hints.append((peer_id, address))
    reach._peers["b"].active = object()  # type: ignore[assignment]  # a built path
    return reach, hints


def _note(port: int, ms: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"t": "moved", "host": "192.0.2.7", "port": port}
    if ms is not None:
        body["ms"] = ms
    return SignalSealer(SECRET, "b", ["a"]).seal("a", body)


def test_a_replayed_moved_note_is_acted_on_once() -> None:
    loop = asyncio.new_event_loop()
    try:
        reach, hints = _reach(loop)
        wire = _note(40001, int(time.time() * 1000))
        for _ in range(5):
            reach._on_signal("b", dict(wire))
        assert hints == [("b", ("192.0.2.7", 40001))]
    finally:
        loop.close()


def test_an_older_or_stale_moved_note_is_ignored() -> None:
    loop = asyncio.new_event_loop()
    try:
        reach, hints = _reach(loop)
        now_ms = int(time.time() * 1000)
        old = _note(40001, now_ms - 1000)
        new = _note(40002, now_ms)
        reach._on_signal("b", new)
        reach._on_signal("b", old)  # sent before the one already acted on
        reach._on_signal("b", _note(40003, now_ms - 3_600_000))  # an hour old
        reach._on_signal("b", _note(40004, None))  # no time: cannot be judged
        assert hints == [("b", ("192.0.2.7", 40002))]
    finally:
        loop.close()


def test_a_moved_note_naming_a_host_name_is_ignored() -> None:
    """Sending to a name would resolve it with a blocking lookup on the
    event loop; a NAT mapping is always a literal address."""
    loop = asyncio.new_event_loop()
    try:
        reach, hints = _reach(loop)
        body = {"t": "moved", "host": "example.invalid", "port": 4000,
                "ms": int(time.time() * 1000)}  # fmt: skip
        reach._on_signal("b", SignalSealer(SECRET, "b", ["a"]).seal("a", body))
        assert hints == []
    finally:
        loop.close()
