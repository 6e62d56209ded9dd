"""Rendezvous relay datagrams (raftstate.transport.rendezvous_dgram): the
sans-IO seal/open with its replay and time checks, then a real server on
127.0.0.1 forwarding a datagram over the target's TCP session."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import AsyncExitStack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rendezvous import SECRET, client, eventually, run, serve

from raftstate.secretcheck import generate_secret
from raftstate.transport.rendezvous_codec import Relay, RendezvousKeys, encode_message
from raftstate.transport.rendezvous_dgram import (
    MAX_DATAGRAM,
    NONCE_SIZE,
    WINDOW_S,
    NonceCache,
    open_datagram,
    seal_datagram,
)

KEYS = RendezvousKeys.from_secret(SECRET)
MESSAGE = encode_message(Relay(to="b", sender="a", body={"s": "sealed"}))
NOW = 1_800_000_000.0


def nonce(i: int) -> bytes:
    return i.to_bytes(NONCE_SIZE, "big")


def test_a_sealed_datagram_opens_once_and_a_replay_is_refused() -> None:
    cache = NonceCache()
    data = seal_datagram(KEYS, MESSAGE, NOW, nonce(1))
    assert open_datagram(KEYS, data, NOW + 0.2, cache) == MESSAGE
    assert open_datagram(KEYS, data, NOW + 0.3, cache) is None  # replayed
    assert open_datagram(KEYS, seal_datagram(KEYS, MESSAGE, NOW, nonce(2)), NOW, cache) == MESSAGE


@settings(max_examples=200, deadline=None)
@given(
    skew=st.floats(min_value=-WINDOW_S, max_value=WINDOW_S),
    later=st.floats(min_value=0.0, max_value=2 * WINDOW_S),
)
def test_a_replay_is_refused_as_long_as_the_datagram_time_is_in_the_window(
    skew: float, later: float
) -> None:
    """A datagram stamped ``skew`` from the server's clock (a sender's clock
    may be up to WINDOW_S ahead) passes the time check until its stamp plus
    WINDOW_S: its nonce must be remembered that long, not WINDOW_S from when
    it arrived, or a recorded copy replays in the gap."""
    cache = NonceCache()
    data = seal_datagram(KEYS, MESSAGE, NOW + skew, nonce(9))
    if open_datagram(KEYS, data, NOW, cache) is None:
        return  # rounding at the window's edge: refused the first time too
    assert open_datagram(KEYS, data, NOW + later, cache) is None


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_altered_byte_is_refused(position: int, flip: int) -> None:
    data = bytearray(seal_datagram(KEYS, MESSAGE, NOW, nonce(3)))
    data[position % len(data)] ^= flip
    assert open_datagram(KEYS, bytes(data), NOW, NonceCache()) is None


def test_another_secret_or_a_stale_or_future_time_is_refused() -> None:
    other = RendezvousKeys.from_secret(generate_secret())
    sealed = seal_datagram(KEYS, MESSAGE, NOW, nonce(4))
    assert open_datagram(other, sealed, NOW, NonceCache()) is None
    for skew in (-WINDOW_S - 1, WINDOW_S + 1):
        data = seal_datagram(KEYS, MESSAGE, NOW + skew, nonce(5))
        assert open_datagram(KEYS, data, NOW, NonceCache()) is None
    edge = seal_datagram(KEYS, MESSAGE, NOW - WINDOW_S + 0.5, nonce(6))
    assert open_datagram(KEYS, edge, NOW, NonceCache()) == MESSAGE


@given(size=st.integers(min_value=0, max_value=2 * MAX_DATAGRAM))
def test_truncated_or_oversized_input_is_refused_without_raising(size: int) -> None:
    sealed = seal_datagram(KEYS, MESSAGE, NOW, nonce(7))
    if size == len(sealed):
        size -= 1  # exactly one whole datagram is valid input
    data = (sealed * 20)[:size]
    assert open_datagram(KEYS, data, NOW, NonceCache()) is None


def test_sealing_refuses_a_bad_nonce_or_a_message_too_large() -> None:
    with pytest.raises(ValueError, match="nonce"):
        seal_datagram(KEYS, MESSAGE, NOW, b"short")
    with pytest.raises(ValueError, match="message"):
        seal_datagram(KEYS, b"x" * MAX_DATAGRAM, NOW, nonce(8))


def test_the_nonce_cache_is_bounded_and_forgets_after_the_window() -> None:
    cache = NonceCache(limit=3)
    for i in range(5):
        assert cache.add(nonce(i), NOW)
    assert len(cache) == 3
    assert not cache.add(nonce(4), NOW + 1)  # still remembered
    assert cache.add(nonce(4), NOW + WINDOW_S + 1)  # forgotten after the window


def test_a_client_datagram_reaches_the_target_over_its_session() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            a.send_datagram("b", {"t": "moved", "s": "x"})
            assert await b_in.until(1) == [("a", {"t": "moved", "s": "x"})]
            assert server.datagrams_relayed == 1
            # A recorded datagram, replayed, or one under another secret: refused.
            host, port = address.rsplit(":", 1)
            raw = seal_datagram(KEYS, MESSAGE, time.time(), os.urandom(NONCE_SIZE))
            forged = seal_datagram(
                RendezvousKeys.from_secret(generate_secret()), MESSAGE, NOW, nonce(9)
            )
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for data in (raw, raw, forged, b"junk"):
                    s.sendto(data, (host, int(port)))
            await eventually(lambda: server.datagrams_refused == 3, "three refused")
            assert server.datagrams_relayed == 2
            await asyncio.sleep(0)
            assert [m for m in b_in.items if m[0] == "a"][-1][1] == {"s": "sealed"}

    run(main)
