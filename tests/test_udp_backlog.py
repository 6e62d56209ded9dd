"""The UDP transport under more data than its links can hold: every message
``send`` accepted reaches the peer whole, once and in order; a message it
cannot take is refused (``False``) and the peer is reported disconnected at
the same moment, then connected again once the backlog has drained.

Two real ``UdpTransport`` objects on loopback in this process, each driven by
a tick thread of its own that plays pysyncobj's part (poller, tick callbacks).
Before this contract the transport dropped a message silently whenever a
link's send buffer was full, after ``send`` had said yes.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pysyncobj.node import TCPNode
from pysyncobj.poller import createPoller

from cluster.local import free_ports
from raftstate.transport.linkconfig import LinkConfig
from raftstate.transport.udp import UdpTransport
from raftstate.transport.udpconfig import UdpSettings

SECRET = "backlog-test-secret-0123456789abcdef"


class _Tick:
    """pysyncobj's side of the transport contract: a poller and tick callbacks
    run on one thread, plus what the transport reports."""

    def __init__(self) -> None:
        self._poller = createPoller("auto")
        self._callbacks: list[Any] = []
        self.received: list[bytes] = []
        self.events: list[tuple[str, str]] = []
        self.up: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lock = threading.Lock()
        #: Work to run on the tick thread (the sender's sends).
        self.jobs: list[Any] = []

    def addOnTickCallback(self, cb: Any) -> None:  # noqa: N802
        self._callbacks.append(cb)

    def removeOnTickCallback(self, cb: Any) -> None:  # noqa: N802
        self._callbacks.remove(cb)

    def attach(self, transport: UdpTransport) -> None:
        transport.setOnMessageReceivedCallback(
            lambda node, msg: self.received.append(msg["command"])
        )
        transport.setOnNodeConnectedCallback(self._on_up)
        transport.setOnNodeDisconnectedCallback(self._on_down)

    def _on_up(self, node: Any) -> None:
        self.events.append(("up", node.id))
        self.up.add(node.id)

    def _on_down(self, node: Any) -> None:
        self.events.append(("down", node.id))
        self.up.discard(node.id)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                jobs, self.jobs = self.jobs, []
            for job in jobs:
                job()
            for cb in list(self._callbacks):
                cb()
            self._poller.poll(0.002)


def _settings(me: str, port: int, peer: str, peer_port: int, **kw: Any) -> UdpSettings:
    link = LinkConfig(send_buffer_bytes=512 * 1024, max_message_bytes=256 * 1024)
    return UdpSettings(
        node_id=me, bind=f"127.0.0.1:{port}", peers=((peer, f"127.0.0.1:{peer_port}"),),
        cluster_secret=SECRET, link=link, **kw,
    )  # fmt: skip


@pytest.fixture
def pair() -> Iterator[Any]:
    made: list[tuple[_Tick, UdpTransport]] = []

    def make(**kw: Any) -> tuple[_Tick, UdpTransport, _Tick, UdpTransport]:
        pa, pb = free_ports(2)
        ta, tb = _Tick(), _Tick()
        a = UdpTransport(ta, TCPNode(f"127.0.0.1:{pa}"), [TCPNode(f"127.0.0.1:{pb}")],
                         settings=_settings("a", pa, "b", pb, **kw))
        b = UdpTransport(tb, TCPNode(f"127.0.0.1:{pb}"), [TCPNode(f"127.0.0.1:{pa}")],
                         settings=_settings("b", pb, "a", pa))
        for tick, t in ((ta, a), (tb, b)):
            tick.attach(t)
            t.waitReady()
            tick.start()
            made.append((tick, t))
        _wait(lambda: ta.up and tb.up, "sessions up")
        return ta, a, tb, b

    yield make
    for tick, t in made:
        tick.stop()
        t.destroy()


def _wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _message(i: int, size: int) -> dict[str, Any]:
    # A message type every wire codec knows (a forwarded command).
    body = struct.pack(">I", i) + bytes([i % 251]) * (size - 4)
    return {"type": "apply_command", "command": body}


@pytest.mark.parametrize("size", [1, 1_100, 60_000, 250_000])
def test_every_accepted_message_arrives_once_in_order_even_past_the_link_buffer(
    pair: Any, size: int
) -> None:
    size = max(size, 5)
    # Pausing is the leader's business (RaftNode); here only the hard cap acts.
    ta, a, tb, b = pair(pause_bytes=1 << 40, resume_bytes=1 << 39, max_peer_bytes=4 * 1024 * 1024)
    node_b = a._peers["b"].node
    # Up to 24 MB: far past the 512 KiB link buffer and the 4 MiB cap.
    total = min(30_000, max(40, (24 * 1024 * 1024) // size))
    accepted: list[int] = []
    refused: list[int] = []
    down_when_refused: list[bool] = []

    def burst() -> None:
        for i in range(total):
            if a.send(node_b, _message(i, size)):
                accepted.append(i)
            else:
                refused.append(i)
                down_when_refused.append(node_b.id not in ta.up)

    with ta.lock:
        ta.jobs.append(burst)
    _wait(lambda: len(accepted) + len(refused) == total, "the burst")
    _wait(lambda: len(tb.received) >= len(accepted), "delivery", timeout=60)
    got = [struct.unpack(">I", m[:4])[0] for m in tb.received]
    assert got == accepted, "lost, duplicated or reordered an accepted message"
    for i, m in zip(got, tb.received, strict=True):
        assert m == _message(i, size)["command"], f"message {i} arrived cut or spliced"
    if size >= 60_000:
        assert refused, "the burst never reached the per-peer cap: the test proves nothing"
    assert all(down_when_refused), "a refused message left the peer reported connected"
    if refused:
        _wait(lambda: node_b.id in ta.up, f"the peer up again after draining: {ta.events[-6:]}")
        assert ("down", node_b.id) in ta.events


def test_paused_nodes_follows_the_backlog_with_hysteresis(pair: Any) -> None:
    ta, a, tb, b = pair(pause_bytes=2 * 1024 * 1024, resume_bytes=256 * 1024,
                        max_peer_bytes=64 * 1024 * 1024)
    node_b = a._peers["b"].node
    paused_seen: list[bool] = []

    def burst() -> None:
        for i in range(60):
            assert a.send(node_b, _message(i, 200_000))
        paused_seen.append(node_b in a.paused_nodes())

    with ta.lock:
        ta.jobs.append(burst)
    _wait(lambda: paused_seen, "the burst")
    assert paused_seen == [True], "12 MB queued for one peer and it is not paused"
    _wait(lambda: len(tb.received) == 60, "delivery", timeout=60)
    resumed: list[bool] = []
    _wait(lambda: (resumed.append(node_b not in a.paused_nodes()) or resumed[-1]), "resume")
