"""HeartbeatStream: pipelined heartbeats on one gRPC stream.

The FIFO matcher is checked as a plain object; everything else runs against
real three-node clusters on loopback (``cluster.local.LocalCluster``), with
waits on conditions and deadlines only.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import node_devices, wait_caught_up

from cluster.local import LocalCluster, wait_until
from raftstate.config import NodeConfig
from raftstate.errors import InvalidArgument, RaftStateError, Unavailable
from raftstate.sdk import AsyncDeviceClient, DeviceClient, HeartbeatAck, HeartbeatStream
from raftstate.sdk.inflight import InFlight, Outgoing
from raftstate.v1 import device_pb2

STATE = {"temp_c": "21.5", "fw": "1.4.2"}


# ---- the FIFO matcher, without I/O ------------------------------------------


def _outgoing(loop: asyncio.AbstractEventLoop, device_id: str, seq: int) -> Outgoing:
    request = device_pb2.HeartbeatStreamRequest(device_id=device_id, seq=seq)
    return Outgoing(request, device_id, seq, 0.0, loop.create_future())


def test_acks_are_matched_to_messages_in_send_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        fifo = InFlight()
        a, b = _outgoing(loop, "a", 1), _outgoing(loop, "b", 7)
        fifo.sent(a)
        fifo.sent(b)
        assert fifo.match("a", 1) is a
        assert fifo.match("b", 7) is b
        assert len(fifo) == 0
    finally:
        loop.close()


def test_an_ack_for_another_message_is_a_protocol_error_and_keeps_the_head() -> None:
    loop = asyncio.new_event_loop()
    try:
        fifo = InFlight()
        a, b = _outgoing(loop, "a", 1), _outgoing(loop, "b", 7)
        fifo.sent(a)
        fifo.sent(b)
        with pytest.raises(Unavailable, match="protocol error"):
            fifo.match("b", 7)  # out of order
        with pytest.raises(Unavailable, match="protocol error"):
            fifo.match("a", 2)  # right device, wrong seq
        assert fifo.take_all() == [a, b]
        with pytest.raises(Unavailable, match="nothing in flight"):
            fifo.match("a", 1)
    finally:
        loop.close()


# ---- real clusters ------------------------------------------------------------


def _start_cluster(base: Path) -> LocalCluster:
    cluster = LocalCluster(base, 3, base_config=NodeConfig.for_tests(allow_insecure_transport=True))
    try:
        cluster.start()
        cluster.wait_for_leader()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = _start_cluster(tmp_path_factory.mktemp("stream-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


def _node_of(cluster: LocalCluster, endpoint: str | None) -> str:
    return next(n for n, p in cluster.nodes.items() if p.endpoint == endpoint)


@pytest.mark.cluster
@pytest.mark.slow
def test_500_pipelined_heartbeats_are_acked_and_on_every_node(
    shared_cluster: LocalCluster,
) -> None:
    cluster = shared_cluster

    async def run() -> tuple[list[HeartbeatAck], int]:
        async with AsyncDeviceClient(cluster.endpoints) as client, client.stream() as stream:

            async def device(i: int) -> list[HeartbeatAck]:
                return [await stream.send(f"gw-a-{i:02d}", STATE) for _ in range(10)]

            per_device = await asyncio.gather(*(device(i) for i in range(50)))
            return [a for acks in per_device for a in acks], stream.reconnects

    acks, reconnects = asyncio.run(run())
    assert len(acks) == 500 and reconnects == 0
    last = {a.device_id: a.seq for a in acks}  # each device's acks come in seq order
    assert len(last) == 50
    assert all(not a.duplicate and a.stored_seq == a.seq for a in acks)

    wait_caught_up(cluster, list(cluster.nodes))
    for node_id, node in cluster.nodes.items():
        assert node_devices(node.endpoint, "gw-a-") == last, f"{node_id} differs"


@pytest.mark.cluster
@pytest.mark.slow
def test_an_invalid_heartbeat_fails_alone_and_the_stream_goes_on(
    shared_cluster: LocalCluster,
) -> None:
    cluster = shared_cluster
    too_many = {f"k{i}": "v" for i in range(65)}

    async def run() -> tuple[list[HeartbeatAck | BaseException], HeartbeatAck, HeartbeatStream]:
        async with AsyncDeviceClient(cluster.endpoints) as client, client.stream() as stream:
            # An explicit seq skips the SDK's own device_id check, so the
            # server's per-message INVALID_ARGUMENT ack is what is tested.
            results = await asyncio.gather(
                stream.send("gw-b-1", STATE),
                stream.send("not a valid id!", STATE, seq=1),
                stream.send("gw-b-2", STATE),
                stream.send("gw-b-3", too_many),
                stream.send("gw-b-4", STATE),
                return_exceptions=True,
            )
            with pytest.raises(InvalidArgument):  # checked before sending
                await stream.send("also invalid!", STATE)
            after = await stream.send("gw-b-1", STATE)
            return results, after, stream

    results, after, stream = asyncio.run(run())
    ok1, bad_id, ok2, bad_state, ok4 = results
    assert isinstance(bad_id, InvalidArgument) and bad_id.field == "device_id"
    assert isinstance(bad_state, InvalidArgument) and bad_state.field == "reported"
    for r in (ok1, ok2, ok4):
        assert isinstance(r, HeartbeatAck) and not r.duplicate
    assert isinstance(ok1, HeartbeatAck) and after.seq > ok1.seq
    assert stream.reconnects == 0 and stream.retries == 0


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("attach", ["leader", "follower"])
def test_killing_the_streams_node_loses_no_acknowledged_heartbeat(
    tmp_path: Path, attach: str
) -> None:
    """kill -9 the node the stream is on while 40 devices stream heartbeats.

    ``leader``: the stream found the leader itself; ``follower``: a gateway
    pinned to a follower. Either way the stream must move on, and every
    heartbeat it reported acknowledged must be on both survivors.
    """
    cluster = _start_cluster(tmp_path)
    try:
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.nodes if n != leader)
        pinned = cluster.nodes[follower].endpoint if attach == "follower" else None
        acked: dict[str, list[int]] = defaultdict(list)
        sent: dict[str, set[int]] = defaultdict(set)
        failures: list[BaseException] = []
        after_kill = 0

        async def run() -> tuple[str, HeartbeatStream]:
            nonlocal after_kill
            killed_at: float | None = None
            stop = False
            enough_before = asyncio.Event()
            enough_after = asyncio.Event()
            client = AsyncDeviceClient(cluster.endpoints, deadline_s=15.0)
            async with client, client.stream(endpoint=pinned, max_in_flight=64) as stream:

                async def device(i: int) -> None:
                    nonlocal after_kill
                    device_id = f"gw-c-{i:02d}"
                    while not stop:
                        seq = client.next_seq(device_id)
                        sent[device_id].add(seq)
                        started = time.monotonic()
                        try:
                            ack = await stream.send(device_id, STATE, seq=seq)
                        except RaftStateError as e:
                            failures.append(e)
                            await asyncio.sleep(0.05)
                            continue
                        assert (ack.device_id, ack.seq) == (device_id, seq)
                        acked[device_id].append(seq)
                        if sum(map(len, acked.values())) >= 300:
                            enough_before.set()
                        if killed_at is not None and started > killed_at:
                            after_kill += 1
                            if after_kill >= 200:
                                enough_after.set()

                devices = [asyncio.create_task(device(i)) for i in range(40)]
                await asyncio.wait_for(enough_before.wait(), 30)
                victim = _node_of(cluster, stream.endpoint)
                await asyncio.to_thread(cluster.kill_node, victim)
                killed_at = time.monotonic()
                await asyncio.wait_for(enough_after.wait(), 45)
                stop = True
                await asyncio.gather(*devices)
                return victim, stream

        victim, stream = asyncio.run(run())
        assert attach == "follower" or victim == leader
        assert stream.reconnects >= 1
        assert after_kill >= 200
        assert all(isinstance(e, RaftStateError) for e in failures)

        survivors = [n for n in cluster.nodes if n != victim]
        wait_caught_up(cluster, survivors)
        for node_id in survivors:
            stored = node_devices(cluster.nodes[node_id].endpoint, "gw-c-")
            for device_id, seqs in acked.items():
                assert stored[device_id] >= max(seqs), f"{node_id} lost {device_id}"
                assert stored[device_id] in sent[device_id], f"{node_id}: phantom seq"
    finally:
        cluster.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_closing_drains_and_max_in_flight_bounds_the_window(shared_cluster: LocalCluster) -> None:
    cluster = shared_cluster
    widest = 0

    async def run() -> list[asyncio.Task[HeartbeatAck]]:
        nonlocal widest
        async with AsyncDeviceClient(cluster.endpoints) as client:
            async with client.stream(max_in_flight=3) as stream:
                tasks = [
                    asyncio.create_task(stream.send(f"gw-d-{i:02d}", STATE)) for i in range(60)
                ]
                while not all(t.done() for t in tasks[:3]):
                    widest = max(widest, stream._active)
                    await asyncio.sleep(0)
            # Leaving the block waited for every send.
            assert all(t.done() for t in tasks)
            return tasks

    tasks = asyncio.run(run())
    assert all(isinstance(t.result(), HeartbeatAck) for t in tasks)
    assert widest == 3


@pytest.mark.cluster
@pytest.mark.slow
def test_a_hung_node_is_abandoned_after_the_attempt_timeout(tmp_path: Path) -> None:
    """SIGSTOP keeps the TCP connection open but silent: only the stall
    watchdog can notice, and the heartbeats must then go through elsewhere."""
    cluster = _start_cluster(tmp_path)
    try:

        async def run() -> tuple[list[HeartbeatAck], str, HeartbeatStream]:
            client = AsyncDeviceClient(cluster.endpoints, attempt_timeout_s=1.0, deadline_s=15.0)
            async with client, client.stream() as stream:
                await stream.send("gw-e-00", STATE)
                victim = _node_of(cluster, stream.endpoint)
                cluster.signal_node(victim, signal.SIGSTOP)
                acks = await asyncio.gather(
                    *(stream.send(f"gw-e-{i:02d}", STATE) for i in range(20))
                )
                return acks, victim, stream

        acks, victim, stream = asyncio.run(run())
        assert len(acks) == 20 and stream.reconnects >= 1
        assert stream.endpoint != cluster.nodes[victim].endpoint
    finally:
        cluster.stop()  # sends SIGCONT first


@pytest.mark.cluster
@pytest.mark.slow
def test_heartbeats_sent_without_quorum_are_acked_once_it_returns(tmp_path: Path) -> None:
    """With both other nodes down, the stream's node cannot commit: messages
    fail retriably or the stream stalls, and the SDK keeps re-sending the
    same seqs until a node comes back and they commit."""
    cluster = _start_cluster(tmp_path)
    try:
        leader = cluster.wait_for_leader()
        followers = [n for n in cluster.nodes if n != leader]
        endpoint = cluster.nodes[leader].endpoint

        async def run() -> tuple[list[HeartbeatAck], HeartbeatStream]:
            client = AsyncDeviceClient(cluster.endpoints, deadline_s=40.0)
            async with client, client.stream(endpoint=endpoint) as stream:
                await stream.send("gw-f-00", STATE)
                for n in followers:
                    await asyncio.to_thread(cluster.kill_node, n)
                sends = [
                    asyncio.create_task(stream.send(f"gw-f-{i:02d}", STATE)) for i in range(10)
                ]
                # Nothing can commit until a second node is back.
                await asyncio.to_thread(
                    wait_until,
                    lambda: stream.retries + stream.reconnects > 0,
                    30.0,
                    "the stream to notice the lost quorum",
                )
                assert not any(t.done() and not t.exception() for t in sends)
                await asyncio.to_thread(cluster.start_node, followers[0])
                return list(await asyncio.gather(*sends)), stream

        acks, stream = asyncio.run(run())
        assert [a.device_id for a in acks] == [f"gw-f-{i:02d}" for i in range(10)]
        survivors = [leader, followers[0]]
        wait_caught_up(cluster, survivors)
        for node_id in survivors:
            stored = node_devices(cluster.nodes[node_id].endpoint, "gw-f-")
            assert all(stored[a.device_id] == a.seq for a in acks), node_id
    finally:
        cluster.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_the_blocking_stream_pipelines_from_one_thread(shared_cluster: LocalCluster) -> None:
    with DeviceClient(shared_cluster.endpoints) as client, client.stream() as stream:
        futures = [stream.submit(f"gw-g-{i:02d}", STATE) for i in range(40)]
        acks = [f.result(timeout=30) for f in futures]
        with pytest.raises(InvalidArgument):
            stream.send("not valid!", STATE, seq=3)
        last = stream.send("gw-g-00", STATE)
    assert [a.device_id for a in acks] == [f"gw-g-{i:02d}" for i in range(40)]
    assert last.seq > acks[0].seq
