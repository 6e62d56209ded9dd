"""Reliable link over the lossy in-memory network: ordered exactly-once
delivery, packing, fragmentation, prompt repair, robustness, liveness.

All sans-IO and deterministic: time is the SimNetwork's virtual clock and all
chance comes from seeded ``random.Random`` objects.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest

from raftstate.errors import ConfigError
from raftstate.transport import (
    MAX_PAYLOAD,
    LinkConfig,
    LinkProfile,
    MessageTooLarge,
    ReliableLink,
    SimLinkHost,
    SimNetwork,
)
from raftstate.transport.frames import (
    SINGLE_CHUNK_OVERHEAD,
    Ack,
    Frame,
    FrameError,
    StreamChunk,
    decode_frame,
    decode_varint,
    encode_frame,
    encode_varint,
)
from raftstate.transport.reassembly import Reassembler

MAX_CHUNK = MAX_PAYLOAD - SINGLE_CHUNK_OVERHEAD
NO_REDUNDANCY = dataclasses.replace(LinkConfig(), redundancy=0, redundancy_max=0)


class Pair:
    """Hosts ``a`` and ``b`` on one SimNetwork; records what each delivers."""

    def __init__(
        self,
        seed: int,
        profile: LinkProfile,
        config: LinkConfig | None = None,
        back: LinkProfile | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.net = SimNetwork(random.Random(seed))
        self.got: dict[str, list[bytes]] = {"a": [], "b": []}
        self.at: dict[str, list[float]] = {"a": [], "b": []}
        kw = {"config": config, "max_payload": max_payload}
        self.a = SimLinkHost(self.net, "a", self._sink("a"), **kw)  # type: ignore[arg-type]
        self.b = SimLinkHost(self.net, "b", self._sink("b"), **kw)  # type: ignore[arg-type]
        self.net.set_profile("a", "b", profile, both=back is None)
        if back is not None:
            self.net.set_profile("b", "a", back, both=False)

    def _sink(self, name: str) -> Callable[[str, bytes], None]:
        def on_message(peer: str, message: bytes) -> None:
            self.got[name].append(message)
            self.at[name].append(self.net.now)

        return on_message

    def run(self, seconds: float) -> None:
        self.net.run_until(self.net.now + seconds)

    def stream(self, messages: list[bytes], interval: float) -> list[float]:
        """Send ``messages`` a -> b, one every ``interval``; their send times."""
        times = []
        for message in messages:
            times.append(self.net.now)
            assert self.a.send("b", message)
            self.run(interval)
        return times


def payloads(rng: random.Random, n: int, max_size: int = 400) -> list[bytes]:
    # The index up front makes every message distinct.
    return [i.to_bytes(4, "big") + rng.randbytes(rng.randint(0, max_size)) for i in range(n)]


def _recording(sizes: list[int]) -> Callable[[str, str, bytes], bool]:
    """A drop filter that drops nothing and records every link payload's
    size (the datagram minus SimLinkHost's 4-byte session prefix)."""

    def record(src: str, dst: str, datagram: bytes) -> bool:
        sizes.append(len(datagram) - 4)
        return False

    return record


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---------------------------------------------------------------- codec


def test_varint_round_trips_at_every_length_boundary() -> None:
    for value in (0, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1):
        encoded = encode_varint(value)
        assert decode_varint(encoded, 0) == (value, len(encoded))
    with pytest.raises(ValueError):
        encode_varint(2**62)


def test_frame_round_trips_and_every_strict_prefix_is_rejected() -> None:
    frame = Frame(
        number=70_000,
        floor=69_990,
        ack=Ack(cum=500, delay_us=1234, ranges=((502, 510), (600, 601))),
        chunks=(StreamChunk(2**33, b"x" * 300), StreamChunk(7, b"y")),
        ack_now=True,
    )
    wire = encode_frame(frame)
    assert decode_frame(wire) == frame
    for cut in range(len(wire)):
        with pytest.raises(FrameError):
            decode_frame(wire[:cut])
    with pytest.raises(FrameError):
        decode_frame(wire + b"\x00")


def test_reassembler_keeps_only_new_bytes_of_overlapping_chunks() -> None:
    stream = b"".join(encode_varint(len(m)) + m for m in (b"hello", b"", b"world!" * 50))
    r = Reassembler(max_message=1000)
    rng = random.Random(3)
    pieces = []
    for _ in range(200):
        start = rng.randrange(len(stream))
        pieces.append((start, stream[start : start + rng.randint(1, 40)]))
    pieces.append((0, stream))  # guarantees completeness
    rng.shuffle(pieces)
    out: list[bytes] = []
    for offset, data in pieces:
        r.add(offset, data)
        out += r.messages()
        assert r.buffered <= len(stream)
    assert out == [b"hello", b"", b"world!" * 50]
    assert r.buffered == 0


# ---------------------------------------------------------------- delivery


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param(LinkProfile(delay=0.03, reorder=0.3, reorder_delay=0.03), id="reorder"),
        pytest.param(LinkProfile(delay=0.03, duplicate=0.3), id="duplicate"),
        pytest.param(LinkProfile(delay=0.03, loss=0.10), id="loss10"),
        pytest.param(LinkProfile(delay=0.03, loss=0.30), id="loss30"),
        pytest.param(
            LinkProfile(
                delay=0.03,
                jitter=0.01,
                loss=0.10,
                loss_correlation=0.3,
                duplicate=0.05,
                reorder=0.05,
                fifo=False,
            ),
            id="combined",
        ),  # fmt: skip
    ],
)
@pytest.mark.parametrize("config", [LinkConfig(), NO_REDUNDANCY], ids=["default", "no-redund"])
def test_delivers_in_order_exactly_once(profile: LinkProfile, config: LinkConfig) -> None:
    pair = Pair(seed=11, profile=profile, config=config)
    sent = payloads(random.Random(1), 300)
    pair.stream(sent, interval=0.002)
    pair.run(20)
    assert pair.got["b"] == sent
    assert not pair.a.link("b").dead(pair.net.now)
    stats = pair.a.link("b").stats()
    assert stats.buffered_bytes == 0 and stats.bytes_in_flight == 0


def test_two_megabyte_snapshot_arrives_whole_under_ten_percent_loss() -> None:
    pair = Pair(seed=5, profile=LinkProfile.from_rtt(0.06, 0.02, loss=0.10))
    snapshot = random.Random(2).randbytes(2 * 1024 * 1024)
    assert pair.a.send("b", b"before")
    assert pair.a.send("b", snapshot)
    assert pair.a.send("b", b"after")
    pair.run(30)
    assert pair.got["b"] == [b"before", snapshot, b"after"]
    stats = pair.a.link("b").stats()
    assert stats.retransmissions > 100  # it really was repaired, not lucky
    assert pair.at["b"][1] < 10.0, "2 MB should take a few seconds at most"


def test_small_messages_queued_together_share_datagrams() -> None:
    pair = Pair(seed=1, profile=LinkProfile(delay=0.01))
    link = pair.a.link("b")
    sent = [bytes([i % 256]) * 20 for i in range(1000)]  # 21 stream bytes each
    for message in sent:
        assert link.send(message, pair.net.now)
    pair.a.flush("b")
    pair.run(2)
    assert pair.got["b"] == sent
    frames = pair.net.stats("a", "b").sent
    assert frames <= 21_000 // (MAX_PAYLOAD - 60) + 3, frames


@pytest.mark.parametrize(
    "size",
    [0, 1, MAX_CHUNK - 2, MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 1, MAX_PAYLOAD - 1, MAX_PAYLOAD,
     MAX_PAYLOAD + 1, 2 * MAX_CHUNK, 2 * MAX_CHUNK + 1, 16383, 16384, 70_000],
)  # fmt: skip
def test_messages_around_fragment_boundaries(size: int) -> None:
    pair = Pair(seed=size, profile=LinkProfile(delay=0.02, loss=0.2, duplicate=0.1))
    rng = random.Random(size)
    sent = [rng.randbytes(size) for _ in range(3)] + [b"tail"]
    for message in sent:
        assert pair.a.send("b", message)
    pair.run(20)
    assert pair.got["b"] == sent
    assert pair.net.stats("a", "b").sent >= 1


def test_every_frame_fits_max_payload_even_with_many_ack_ranges() -> None:
    sizes: list[int] = []
    pair = Pair(seed=9, profile=LinkProfile(delay=0.03, loss=0.3, reorder=0.3, fifo=False))
    pair.net.set_drop_filter(_recording(sizes))
    rng = random.Random(4)
    for _ in range(200):
        pair.a.send("b", rng.randbytes(rng.randint(0, 3000)))
        pair.b.send("a", rng.randbytes(rng.randint(0, 3000)))
        pair.run(0.001)
    pair.run(20)
    assert len(pair.got["a"]) == len(pair.got["b"]) == 200
    assert max(sizes) <= MAX_PAYLOAD


def test_small_max_payload_still_works() -> None:
    pair = Pair(seed=2, profile=LinkProfile(delay=0.01, loss=0.1), max_payload=200)
    sizes: list[int] = []
    pair.net.set_drop_filter(_recording(sizes))
    sent = payloads(random.Random(3), 50, max_size=1000)
    pair.stream(sent, interval=0.001)
    pair.run(20)
    assert pair.got["b"] == sent
    assert max(sizes) <= 200


def test_property_delivered_sequence_equals_sent_sequence_for_50_seeds() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        profile = LinkProfile(
            delay=rng.uniform(0.0, 0.08),
            jitter=rng.uniform(0.0, 0.03),
            loss=rng.choice([0.0, 0.02, 0.1, 0.3]),
            loss_correlation=rng.choice([0.0, 0.5]),
            duplicate=rng.choice([0.0, 0.1]),
            reorder=rng.choice([0.0, 0.1]),
            fifo=rng.random() < 0.5,
        )
        config = rng.choice([LinkConfig(), NO_REDUNDANCY])
        pair = Pair(seed=seed + 1000, profile=profile, config=config)
        sent: dict[str, list[bytes]] = {"a": [], "b": []}
        for i in range(rng.randint(10, 60)):
            src = rng.choice("ab")
            size = rng.choice([0, 10, 100, 1000, 3000, 20_000]) + rng.randint(0, 9)
            message = i.to_bytes(4, "big") + rng.randbytes(size)
            host, dst = (pair.a, "b") if src == "a" else (pair.b, "a")
            assert host.send(dst, message)
            sent[dst].append(message)
            pair.run(rng.expovariate(1 / 0.003))
        pair.run(30)
        assert pair.got["a"] == sent["a"], f"seed {seed}: {profile}"
        assert pair.got["b"] == sent["b"], f"seed {seed}: {profile}"


def test_simnet_is_deterministic_for_a_seed() -> None:
    def run() -> tuple[object, ...]:
        pair = Pair(seed=7, profile=LinkProfile.from_rtt(0.06, 0.02, 0.1, duplicate=0.05))
        pair.stream(payloads(random.Random(7), 100), interval=0.001)
        pair.run(5)
        return (pair.a.link("b").stats(), pair.net.stats("a", "b"), tuple(pair.at["b"]))

    assert run() == run()


# ---------------------------------------------------------------- latency


def _drop_first_from(src: str) -> Callable[[str, str, bytes], bool]:
    """A drop filter that loses the next datagram ``src`` sends, only that one."""
    done = False

    def drop(s: str, d: str, p: bytes) -> bool:
        nonlocal done
        hit = s == src and not done
        done = done or hit
        return hit

    return drop


def _repair_trial(seed: int, config: LinkConfig, *, follow_up: bool) -> tuple[float, float]:
    """Warm up a 60 ms RTT (±20 ms) path, then lose the one datagram that
    carries message ``k``. Returns (latency of k, median latency of the rest)."""
    pair = Pair(seed=seed, profile=LinkProfile.from_rtt(0.06, 0.02), config=config)
    sent = payloads(random.Random(seed), 60, max_size=200)
    k = 40
    times: list[float] = []
    for i, message in enumerate(sent if follow_up else sent[: k + 1]):
        if i == k:
            pair.net.set_drop_filter(_drop_first_from("a"))
        times.append(pair.net.now)
        assert pair.a.send("b", message)
        pair.run(0.005)
    pair.net.set_drop_filter(None)
    pair.run(5)
    latencies = [pair.at["b"][i] - times[i] for i in range(len(times))]
    assert pair.got["b"] == sent[: len(times)]
    return latencies[k], statistics.median(latencies[:k])


@pytest.mark.parametrize(
    ("config", "follow_up", "bound_rtts"),
    [
        (NO_REDUNDANCY, True, 1.5),  # RACK: a later frame's ACK exposes the hole
        (NO_REDUNDANCY, False, 2.0),  # tail loss: only the probe timeout is left
        (LinkConfig(), True, 0.25),  # the next frame carries a copy
        (LinkConfig(), False, 0.5),  # the tail copy, srtt/4 later
    ],
    ids=["rack", "pto", "redundant-copy", "tail-copy"],
)
def test_a_lost_datagram_is_repaired_promptly(
    config: LinkConfig, follow_up: bool, bound_rtts: float
) -> None:
    """Repair delay = latency of the message whose datagram was lost minus
    the typical one-way latency, in RTTs (60 ms), median over 40 trials."""
    delays = []
    for seed in range(40):
        lost, typical = _repair_trial(seed, config, follow_up=follow_up)
        delays.append((lost - typical) / 0.06)
    assert statistics.median(delays) <= bound_rtts, sorted(delays)
    assert percentile(delays, 90) <= bound_rtts + 0.5, sorted(delays)


def test_one_way_latency_meets_the_commit_budget_on_the_60ms_profile() -> None:
    """1 message/ms over 60±20 ms RTT with 3 % loss: delivery p99 must stay
    well under the 120 ms heartbeat-commit budget's one-way half."""
    pair = Pair(seed=3, profile=LinkProfile.from_rtt(0.06, 0.02, loss=0.03))
    sent = payloads(random.Random(3), 6000, max_size=100)
    times = pair.stream(sent, interval=0.001)
    pair.run(5)
    assert pair.got["b"] == sent
    latencies = [(t - s) * 1000 for s, t in zip(times, pair.at["b"], strict=True)]
    assert percentile(latencies, 50) <= 45
    assert percentile(latencies, 99) <= 60, percentile(latencies, 99)


def test_ack_is_immediate_on_a_gap_and_delayed_otherwise() -> None:
    a, b = ReliableLink(), ReliableLink()
    frames = []
    for i in range(3):
        a.send(bytes([i]) * 10, i * 0.001)
        frames += a.poll_transmit(i * 0.001)
    assert len(frames) == 3
    assert b.receive(frames[0], 0.030) == [b"\x00" * 10]
    assert b.poll_transmit(0.030) == []  # in order: wait for more or the timer
    assert b.next_timeout() == pytest.approx(0.030 + LinkConfig().max_ack_delay)
    b.receive(frames[2], 0.031)  # frame 1 missing: tell the sender now
    (ack,) = b.poll_transmit(0.031)
    decoded = decode_frame(ack)
    assert decoded.ack == Ack(cum=1, delay_us=0, ranges=((2, 3),)) and not decoded.chunks
    assert b.next_timeout() is None


def test_reordering_turns_off_the_packet_threshold_and_widens_the_window() -> None:
    jittery = LinkProfile(delay=0.075, jitter=0.025, loss=0.02, fifo=False)
    pair = Pair(seed=8, profile=jittery)
    pair.stream(payloads(random.Random(8), 3000, max_size=60), interval=0.001)
    pair.run(5)
    assert len(pair.got["b"]) == 3000
    stats = pair.a.link("b").stats()
    real = pair.net.stats("a", "b").lost
    assert stats.spurious_losses > 0
    assert stats.frames_lost - stats.spurious_losses <= 1.5 * real, (stats, real)
    # Without adaptation (packet threshold 3, RTT/8 window) this path sees
    # about 20 spurious losses per real one.
    assert stats.frames_lost <= 5 * real, (stats.frames_lost, real)


# ---------------------------------------------------------------- robustness


def _exchange() -> tuple[list[bytes], ReliableLink, list[bytes]]:
    """Thirty messages a -> b (0-2.8 KB) with replies. Returns a's frames,
    the receiver b and what b delivered."""
    a, b = ReliableLink(), ReliableLink()
    frames: list[bytes] = []
    delivered: list[bytes] = []
    now = 0.0
    for i in range(30):
        a.send(bytes([i]) * (i * 97), now)
        b.send(b"reply", now)
        for payload in a.poll_transmit(now):
            frames.append(payload)
            delivered += b.receive(payload, now)
        for payload in b.poll_transmit(now):
            a.receive(payload, now)
        now += 0.003
    return frames, b, delivered


def test_garbage_and_truncated_payloads_never_raise_and_deliver_nothing() -> None:
    rng = random.Random(99)
    link = ReliableLink()
    garbage = [rng.randbytes(rng.randint(0, 1300)) for _ in range(3000)]
    garbage += [bytes([0x50 | rng.randint(0, 3)]) + rng.randbytes(rng.randint(0, 60))
                for _ in range(3000)]  # fmt: skip
    for frame in _exchange()[0]:
        garbage += [frame[:cut] for cut in range(len(frame))]
    for payload in garbage:
        assert link.receive(payload, 1.0) == []
    stats = link.stats()
    assert stats.messages_delivered == 0
    assert stats.malformed + stats.duplicates + stats.window_drops + stats.frames_received == len(
        garbage
    )
    assert stats.malformed > len(garbage) * 0.9


def test_duplicated_payloads_are_delivered_once() -> None:
    frames, receiver, delivered = _exchange()
    assert delivered == [bytes([i]) * (i * 97) for i in range(30)]
    before = receiver.stats().duplicates
    rng = random.Random(5)
    replay = frames * 3
    rng.shuffle(replay)
    assert [m for f in replay for m in receiver.receive(f, 1.0)] == []
    assert receiver.stats().duplicates - before >= len(frames)
    assert receiver.stats().messages_delivered == 30


def test_acks_for_frames_never_sent_are_rejected() -> None:
    link = ReliableLink()
    forged = encode_frame(Frame(number=0, floor=0, ack=Ack(cum=5, delay_us=0)))
    assert link.receive(forged, 0.0) == []
    assert link.stats().malformed == 1


def test_data_beyond_the_receive_window_is_not_acknowledged() -> None:
    link = ReliableLink()
    far = StreamChunk(LinkConfig().receive_window + 10, b"x")
    assert link.receive(encode_frame(Frame(number=0, floor=0, chunks=(far,))), 0.0) == []
    assert link.stats().window_drops == 1
    assert link.poll_transmit(0.0) == []  # nothing to ack: the frame was not taken


def test_a_message_over_the_limit_from_the_peer_kills_the_link() -> None:
    big = LinkConfig(max_message_bytes=200_000)
    small = LinkConfig(max_message_bytes=100_000, send_buffer_bytes=1_000_000)
    a, b = ReliableLink(config=big), ReliableLink(config=small)
    a.send(b"z" * 150_000, 0.0)
    for payload in a.poll_transmit(0.0):
        assert b.receive(payload, 0.0) == []
    assert b.dead(0.0) and b.failure is not None


def test_send_buffer_is_bounded_by_bytes() -> None:
    config = LinkConfig(send_buffer_bytes=100_000, max_message_bytes=50_000)
    link = ReliableLink(config=config)
    accepted = 0
    while link.send(b"m" * 997, 0.0):
        accepted += 1
    assert accepted == 100_000 // 999
    assert link.stats().send_rejected == 1
    assert link.send(b"m" * 90, 0.0)  # smaller still fits
    with pytest.raises(MessageTooLarge):
        link.send(b"m" * 50_001, 0.0)
    # Once the peer acknowledges, room comes back.
    peer = ReliableLink(config=config)
    now = 0.0
    while link.stats().buffered_bytes:
        for payload in link.poll_transmit(now):
            peer.receive(payload, now)
        for payload in peer.poll_transmit(now):
            link.receive(payload, now)
        now += 0.001
    assert link.send(b"m" * 997, now)


def test_multi_megabyte_message_fits_the_default_send_buffer() -> None:
    link = ReliableLink()
    assert link.send(bytes(4 * 1024 * 1024), 0.0)
    assert link.send(bytes(3 * 1024 * 1024), 0.0)
    assert not link.send(bytes(2 * 1024 * 1024), 0.0)


# ---------------------------------------------------------------- liveness


def test_permanent_partition_is_declared_dead_after_dead_after() -> None:
    config = LinkConfig.for_tests()
    pair = Pair(seed=1, profile=LinkProfile.from_rtt(0.06), config=config)
    pair.stream([b"warm-up"] * 10, interval=0.01)
    pair.run(1)
    link = pair.a.link("b")
    assert not link.dead(pair.net.now)
    pair.net.partition(["a"], ["b"])
    cut_at = pair.net.now
    assert pair.a.send("b", b"into the void")
    while not link.dead(pair.net.now):
        pair.run(0.05)
        assert pair.net.now < cut_at + 10
    assert config.dead_after <= pair.net.now - cut_at <= config.dead_after + 0.1
    probes = link.stats().probes
    # Backoff is capped at pto_max, so probes keep coming but stay sparse.
    assert config.dead_after / config.pto_max - 1 <= probes <= 12, probes


def test_path_change_sends_the_next_probe_at_once() -> None:
    """After an outage the probe timer has backed off (up to pto_max); a new
    path (ICE rebuild) must not wait that out."""
    config = LinkConfig.for_tests()
    pair = Pair(seed=3, profile=LinkProfile.from_rtt(0.06), config=config)
    pair.stream([b"warm-up"] * 5, interval=0.01)
    pair.run(1)
    link = pair.a.link("b")
    pair.net.partition(["a"], ["b"])
    assert pair.a.send("b", b"stuck")
    pair.run(3)
    now = pair.net.now
    backed_off = link.next_timeout()
    assert backed_off is not None and backed_off > now
    assert link.stats().probes >= 3  # the probe timeout has doubled a few times
    assert link.stalled(now) >= 3 and link.dead(now)
    link.path_changed(now)
    due = link.next_timeout()
    assert due is not None and due <= now
    assert link.poll_transmit(now), "a probe goes out on the new path at once"
    # The new path is judged on its own: the wait on the old one does not count.
    assert link.stalled(now) == 0.0 and not link.dead(now)
    assert not link.dead(now + config.dead_after - 0.01)


def test_link_recovers_by_itself_after_a_short_partition_heals() -> None:
    pair = Pair(seed=2, profile=LinkProfile.from_rtt(0.06, 0.02, loss=0.03))
    before = payloads(random.Random(1), 50)
    pair.stream(before, interval=0.002)
    pair.net.partition(["a"])
    during = payloads(random.Random(2), 50)
    pair.stream(during, interval=0.02)  # 1 s cut off, both directions
    pair.net.heal()
    healed_at = pair.net.now
    after = payloads(random.Random(3), 50)
    pair.stream(after, interval=0.002)
    pair.run(5)
    assert pair.got["b"] == before + during + after
    link = pair.a.link("b")
    assert not link.dead(pair.net.now)
    first_after = pair.at["b"][len(before)]
    assert first_after - healed_at <= LinkConfig().pto_max + 0.1


def test_after_a_reset_the_new_session_works_and_old_datagrams_are_ignored() -> None:
    config = LinkConfig.for_tests()
    pair = Pair(seed=6, profile=LinkProfile.from_rtt(0.06, 0.02, loss=0.05), config=config)
    pair.stream([b"old-1", b"old-2"], interval=0.01)
    pair.run(1)
    pair.net.partition(["a"])
    for i in range(20):  # stuck in the partition; retransmitted forever
        pair.a.send("b", b"lost-%d" % i)
    pair.run(config.dead_after + 0.5)
    assert pair.a.link("b").dead(pair.net.now)
    pair.net.heal()
    pair.a.reset("b")  # the driver's answer to dead(): a new session
    fresh = [b"new-%d" % i for i in range(20)]
    pair.stream(fresh, interval=0.005)
    pair.run(5)
    assert pair.got["b"][:2] == [b"old-1", b"old-2"]
    assert pair.got["b"][2:] == fresh  # nothing of the old session leaked in
    assert not pair.a.link("b").dead(pair.net.now)


def test_a_reset_mid_flight_loses_a_suffix_of_the_old_session_never_mixes() -> None:
    jittery = LinkProfile(delay=0.03, jitter=0.02, loss=0.05, fifo=False)
    for seed in range(5):
        pair = Pair(seed=seed, profile=jittery)
        old = [b"old-%d" % i for i in range(30)]
        new = [b"new-%d" % i for i in range(30)]
        pair.stream(old, interval=0.001)
        pair.a.reset("b")  # old datagrams still in flight, reordered with new ones
        pair.stream(new, interval=0.001)
        pair.run(5)
        got = pair.got["b"]
        kept = len(got) - len(new)
        assert got == old[:kept] + new, seed
        assert pair.b.stale > 0 or kept == len(old)


def test_an_idle_link_is_never_dead_and_has_no_timers() -> None:
    pair = Pair(seed=3, profile=LinkProfile.from_rtt(0.06))
    pair.stream([b"x"] * 5, interval=0.01)
    pair.run(1)
    link = pair.a.link("b")
    assert link.next_timeout() is None
    assert pair.b.link("a").next_timeout() is None
    pair.run(100)
    assert not link.dead(pair.net.now)


def test_rtt_estimate_tracks_the_path() -> None:
    pair = Pair(seed=4, profile=LinkProfile.from_rtt(0.08, 0.01, loss=0.05))
    pair.stream(payloads(random.Random(4), 500, max_size=50), interval=0.002)
    pair.run(2)
    stats = pair.a.link("b").stats()
    assert stats.srtt is not None and stats.rttvar is not None
    assert 0.075 <= stats.srtt <= 0.09, stats.srtt
    assert stats.rttvar < 0.02
    assert 0.01 <= stats.loss_rate <= 0.2
    assert stats.frames_lost > 0


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_inflight_bytes", 0),
        ("send_buffer_bytes", 1000),
        ("receive_window", 100),
        ("max_ack_delay", 0.05),
        ("max_ack_ranges", 64),
        ("time_threshold", 0.9),
        ("pto_max", 0.001),
        ("dead_after", 0.5),
        ("redundancy", 5),
        ("loss_ewma_weight", 0.0),
    ],
)
def test_config_validate_names_the_field(field: str, value: Any) -> None:
    config = dataclasses.replace(LinkConfig(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        config.validate()
    with pytest.raises(ConfigError):
        ReliableLink(config=config)


def test_profile_validate_and_too_small_payload() -> None:
    with pytest.raises(ConfigError, match="loss"):
        LinkProfile(loss=1.5).validate()
    with pytest.raises(ConfigError, match="max_payload"):
        ReliableLink(max_payload=SINGLE_CHUNK_OVERHEAD)
