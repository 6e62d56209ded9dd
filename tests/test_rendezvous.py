"""The ICE rendezvous service: sans-IO codec first, then real sockets on 127.0.0.1.

Nothing here sleeps and hopes: every wait is for a condition or a future under a
deadline. The few fixed waits are for time-defined properties (a hold expiring,
a pinging client outliving the idle timeout).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import uvloop

from raftstate.cli.rendezvous import rendezvous_secret
from raftstate.errors import ConfigError
from raftstate.secretcheck import generate_secret
from raftstate.transport import rendezvous
from raftstate.transport.rendezvous import RendezvousClient, RendezvousServer
from raftstate.transport.rendezvous_codec import (
    MAX_FRAME,
    MAX_PLAINTEXT,
    AuthenticationFailed,
    ClientHandshake,
    Control,
    FrameDecoder,
    HeldMessages,
    InvalidMessage,
    ProtocolError,
    Relay,
    RendezvousKeys,
    SealedChannel,
    ServerHandshake,
    decode_message,
    encode_frame,
    encode_message,
)

SECRET = generate_secret()
OTHER = generate_secret()
REPO = Path(__file__).resolve().parents[1]
LOGGER = "raftstate.transport.rendezvous"


def nonce(byte: int) -> bytes:
    return bytes([byte]) * 32


# ---- sans-IO codec ------------------------------------------------------------------


def handshake(
    client_secret: str = SECRET, server_secret: str = SECRET, node_id: str = "n1"
) -> tuple[SealedChannel, SealedChannel, str]:
    client = ClientHandshake(RendezvousKeys.from_secret(client_secret), node_id, nonce(1))
    server = ServerHandshake(RendezvousKeys.from_secret(server_secret), nonce(2))
    auth, client_channel = client.on_challenge(server.on_hello(client.hello()))
    claimed, server_channel = server.on_auth(auth)
    return client_channel, server_channel, claimed


def test_handshake_yields_matching_channels_and_the_claimed_node_id() -> None:
    client, server, claimed = handshake(node_id="edge-7")
    assert claimed == "edge-7"
    assert server.open(client.seal(b"up")) == b"up"
    assert client.open(server.seal(b"down")) == b"down"


def test_each_side_refuses_a_peer_without_the_secret() -> None:
    with pytest.raises(AuthenticationFailed):
        handshake(client_secret=OTHER)  # the client checks the server's proof first
    keys = RendezvousKeys.from_secret(SECRET)
    server = ServerHandshake(keys, nonce(2))
    challenge = server.on_hello(ClientHandshake(keys, "n1", nonce(1)).hello())
    n_s = challenge[5:37]
    auth = (
        b"RZV1\x03"
        + RendezvousKeys.from_secret(OTHER).proof(b"client", nonce(1), n_s, b"n1")
        + b"n1"
    )
    with pytest.raises(AuthenticationFailed):
        server.on_auth(auth)


def test_a_recorded_auth_does_not_replay_against_a_fresh_challenge() -> None:
    keys = RendezvousKeys.from_secret(SECRET)
    client = ClientHandshake(keys, "n1", nonce(1))
    auth, _ = client.on_challenge(ServerHandshake(keys, nonce(2)).on_hello(client.hello()))
    fresh = ServerHandshake(keys, nonce(3))
    fresh.on_hello(client.hello())
    with pytest.raises(AuthenticationFailed):
        fresh.on_auth(auth)
    # ... nor does a node id swapped into a recorded AUTH.
    again = ServerHandshake(keys, nonce(2))
    again.on_hello(client.hello())
    with pytest.raises(AuthenticationFailed):
        again.on_auth(auth[:-2] + b"n2")


def test_sealed_frames_need_exactly_the_next_counter_and_an_intact_tag() -> None:
    client, server, _ = handshake()
    first, second = client.seal(b"a"), client.seal(b"b")
    with pytest.raises(ProtocolError, match="expected 0"):
        server.open(second)  # skipped
    assert server.open(first) == b"a"
    with pytest.raises(ProtocolError, match="expected 1"):
        server.open(first)  # replayed
    tampered = bytearray(second)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match="authentication"):
        server.open(bytes(tampered))
    assert server.open(second) == b"b"  # a failed tag does not advance the counter
    reflected = server.seal(b"x")
    with pytest.raises(ProtocolError):
        server.open(reflected)  # the two directions have different keys


def test_frame_decoder_reassembles_split_frames_and_refuses_bad_lengths() -> None:
    stream = encode_frame(b"one") + encode_frame(b"two")
    decoder = FrameDecoder()
    got = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert got == [b"one", b"two"]
    for bad in (struct.pack(">I", MAX_FRAME + 1), struct.pack(">I", 0), b"GET / HTTP/1.1"):
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(bad)
    with pytest.raises(ProtocolError):
        encode_frame(b"x" * (MAX_FRAME + 1))


def test_held_messages_keep_the_latest_per_pair_until_they_expire() -> None:
    held = HeldMessages(hold_s=10.0)
    held.hold("a", "c", b"a1", now=0.0)
    held.hold("b", "c", b"b1", now=1.0)
    held.hold("a", "c", b"a2", now=2.0)
    held.hold("a", "d", b"d1", now=3.0)
    assert held.take("c", now=5.0) == [("b", b"b1"), ("a", b"a2")]
    assert held.take("c", now=5.0) == []
    assert held.take("d", now=13.0) == []  # held at 3.0 for 10 s
    assert len(held) == 0


def test_held_messages_evict_the_oldest_beyond_the_cap() -> None:
    held = HeldMessages(hold_s=60.0, max_entries=2)
    for i, sender in enumerate(("a", "b", "c")):
        held.hold(sender, "z", sender.encode(), now=float(i))
    assert held.take("z", now=3.0) == [("b", b"b"), ("c", b"c")]


def test_message_codec_round_trips_and_refuses_bad_input() -> None:
    relay = Relay(to="b", sender="a", body={"t": "offer", "candidates": ["x"]})
    assert decode_message(encode_message(relay)) == relay
    for fixed in Control:
        assert decode_message(encode_message(fixed)) == fixed
    for bad in (Relay("b c", "a", {}), Relay("b", "a", {"x": object()})):
        with pytest.raises(InvalidMessage):
            encode_message(bad)
    with pytest.raises(InvalidMessage):
        encode_message(Relay("b", "a", {"pad": "x" * MAX_PLAINTEXT}))
    for raw in (b"[]", b"\xff", b'{"t":"nope"}', b'{"t":"msg","to":"b","body":{}}', b"[" * 5000):
        with pytest.raises(ProtocolError):
            decode_message(raw)


def test_cli_secret_comes_from_env_first_then_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "cluster.toml"
    toml.write_text(f'size = 3\nrendezvous_secret = "{SECRET}"\n')
    assert rendezvous_secret(str(toml), {}) == SECRET
    assert rendezvous_secret(str(toml), {"RAFTSTATE_RENDEZVOUS_SECRET": OTHER}) == OTHER
    short = tmp_path / "short.toml"
    short.write_text('rendezvous_secret = "tooshort"\n')
    weak = tmp_path / "weak.toml"
    weak.write_text('rendezvous_secret = "rendezvous-password-123456789"\n')
    only_cluster = tmp_path / "only-cluster.toml"  # the cluster secret is never used here
    only_cluster.write_text(f'cluster_secret = "{SECRET}"\n')
    for path in (str(short), str(weak), str(only_cluster), str(tmp_path / "missing.toml"), None):
        with pytest.raises(ConfigError, match="rendezvous_secret|does not exist"):
            rendezvous_secret(path, {})


# ---- real sockets ---------------------------------------------------------------------


def run(
    main: Callable[[], Coroutine[Any, Any, None]], use_uvloop: bool = False, limit_s: float = 15
) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit_s):
            await main()

    factory = uvloop.new_event_loop if use_uvloop else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(bounded())


async def eventually(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Inbox:
    """An ``on_message`` callback that records and lets tests wait."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    def __call__(self, sender: str, body: dict[str, Any]) -> None:
        self.items.append((sender, body))
        self._changed.set()

    async def until(self, count: int, timeout: float = 5.0) -> list[tuple[str, dict[str, Any]]]:
        try:
            async with asyncio.timeout(timeout):
                while len(self.items) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"got {self.items}, waited for {count}") from None
        return self.items


async def serve(stack: AsyncExitStack, **kwargs: Any) -> tuple[RendezvousServer, str]:
    server = RendezvousServer(SECRET, **kwargs)
    host, port = await server.start("127.0.0.1", 0)
    stack.push_async_callback(server.close)
    return server, f"{host}:{port}"


def client(
    stack: AsyncExitStack, address: str, node_id: str, secret: str = SECRET
) -> tuple[RendezvousClient, Inbox]:
    inbox = Inbox()
    c = RendezvousClient(address, node_id, secret, inbox, reconnect_min_s=0.02, reconnect_max_s=0.1)
    c.start()
    stack.push_async_callback(c.close)
    return c, inbox


class RawPeer:
    """A hand-driven connection, for speaking the protocol wrongly on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[bytes] = []

    @classmethod
    async def connect(cls, stack: AsyncExitStack, address: str) -> RawPeer:
        host, port = address.rsplit(":", 1)
        peer = cls(*await asyncio.open_connection(host, int(port)))
        stack.callback(peer.writer.close)
        return peer

    async def frame(self) -> bytes:
        while not self.frames:
            data = await self.reader.read(65536)
            assert data, "connection closed"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def handshake(self, node_id: str) -> SealedChannel:
        hs = ClientHandshake(RendezvousKeys.from_secret(SECRET), node_id, os.urandom(32))
        self.writer.write(encode_frame(hs.hello()))
        auth, channel = hs.on_challenge(await self.frame())
        self.writer.write(encode_frame(auth))
        assert decode_message(channel.open(await self.frame())) is Control.WELCOME
        return channel

    async def closed_by_server(self) -> None:
        async with asyncio.timeout(5):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass  # closed with our bytes unread: the kernel resets


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_relay_between_two_clients(use_uvloop: bool) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a, a_in = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "both connected")
            assert server.connected() == {"a", "b"}
            a.send("b", {"t": "offer", "candidates": ["1 1 udp 1 10.0.0.1 5000 typ host"]})
            b.send("a", {"t": "answer"})
            assert await b_in.until(1) == [
                ("a", {"t": "offer", "candidates": ["1 1 udp 1 10.0.0.1 5000 typ host"]})
            ]
            assert await a_in.until(1) == [("b", {"t": "answer"})]

    run(main, use_uvloop)


def test_sending_to_yourself_or_an_invalid_id_is_a_value_error() -> None:
    async def main() -> None:
        c = RendezvousClient("127.0.0.1:9", "a", SECRET, Inbox())
        with pytest.raises(ValueError):
            c.send("a", {})
        with pytest.raises(ValueError):
            c.send("not an id", {})

    run(main)


def test_held_message_is_delivered_when_the_recipient_connects() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a, _ = client(stack, address, "a")
            await eventually(lambda: a.connected, "a connected")
            a.send("late", {"t": "offer", "n": 1})
            a.send("late", {"t": "offer", "n": 2})  # latest per (from, to) wins
            b, b_in = client(stack, address, "b")
            a.send("b", {"sync": True})
            await b_in.until(1)  # the server has processed a's earlier sends
            late, late_in = client(stack, address, "late")
            await eventually(lambda: late.connected, "late connected")
            a.send("late", {"marker": True})
            assert await late_in.until(2) == [
                ("a", {"t": "offer", "n": 2}),
                ("a", {"marker": True}),
            ]

    run(main)


def test_held_message_expires_after_hold_s() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack, hold_s=0.2)
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            a.send("c", {"stale": True})
            a.send("b", {"sync": True})
            await b_in.until(1)  # the server holds the message for c since before now
            await asyncio.sleep(0.25)  # past hold_s: the hold has expired by definition
            c, c_in = client(stack, address, "c")
            await eventually(lambda: c.connected, "c connected")
            a.send("c", {"fresh": True})
            assert await c_in.until(1) == [("a", {"fresh": True})]

    run(main)


def test_client_outbox_keeps_the_latest_body_per_destination_and_flushes_on_connect() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a = RendezvousClient(address, "a", SECRET, Inbox())
            a.send("b", {"v": 1})  # not started: disconnected
            a.send("b", {"v": 2})
            a.send("c", {"v": 3})
            a.start()
            stack.push_async_callback(a.close)
            b, b_in = client(stack, address, "b")
            c, c_in = client(stack, address, "c")
            await eventually(lambda: a.connected and b.connected and c.connected, "all up")
            a.send("b", {"marker": True})
            assert await b_in.until(2) == [("a", {"v": 2}), ("a", {"marker": True})]
            assert await c_in.until(1) == [("a", {"v": 3})]

    run(main)


def test_wrong_secret_client_is_rejected_on_both_sides_and_never_receives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            a.send("c", {"secret": "candidates"})
            a.send("b", {"sync": True})
            await b_in.until(1)  # the message for c is held before c ever dials
            c, c_in = client(stack, address, "c", secret=OTHER)

            def logged(text: str) -> bool:
                return any(text in r.getMessage() for r in caplog.records)

            await eventually(lambda: logged("rendezvous rejected: wrong rendezvous secret?"), "c")
            await eventually(lambda: logged("refused our proof (wrong rendezvous secret?)"), "srv")
            assert not c.connected and c_in.items == []
            assert server.connected() == {"a", "b"}

    run(main)


def test_client_keeps_retrying_a_server_with_another_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        attempts = 0
        keys = RendezvousKeys.from_secret(OTHER)

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal attempts
            attempts += 1
            peer = RawPeer(reader, writer)
            writer.write(
                encode_frame(ServerHandshake(keys, os.urandom(32)).on_hello(await peer.frame()))
            )
            await reader.read()  # until the client hangs up
            writer.close()

        listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, AsyncExitStack() as stack:
            c, c_in = client(stack, f"127.0.0.1:{port}", "c")
            await eventually(lambda: attempts >= 3, "three attempts")
            assert not c.connected and c_in.items == []
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1  # repeats are rate-limited
            assert "wrong rendezvous secret?" in errors[0].getMessage()

    run(main)


def test_replayed_tampered_or_skipped_frames_close_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    def replay(ch: SealedChannel) -> list[bytes]:
        ping = ch.seal(encode_message(Control.PING))
        return [ping, ping]

    def tamper(ch: SealedChannel) -> list[bytes]:
        sealed = bytearray(ch.seal(encode_message(Control.PING)))
        sealed[12] ^= 0x40
        return [bytes(sealed)]

    def skip(ch: SealedChannel) -> list[bytes]:
        ch.seal(encode_message(Control.PING))
        return [ch.seal(encode_message(Control.PING))]

    def not_json(ch: SealedChannel) -> list[bytes]:
        return [ch.seal(b"\x80not json")]

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            for attack in (replay, tamper, skip, not_json):
                raw = await RawPeer.connect(stack, address)
                channel = await raw.handshake("mallory")
                assert "mallory" in server.connected()
                for payload in attack(channel):
                    raw.writer.write(encode_frame(payload))
                await raw.closed_by_server()
                await eventually(lambda: "mallory" not in server.connected(), attack.__name__)
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            a.send("b", {"still": "serving"})
            await b_in.until(1)

    run(main)
    text = caplog.text
    assert "expected 1" in text and "authentication" in text and "expected 0" in text


def test_garbage_and_oversized_lengths_close_only_that_connection() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            for junk in (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                struct.pack(">I", MAX_FRAME + 1) + b"x" * 100,
                struct.pack(">I", 0xFFFFFFFF),
                struct.pack(">I", 1000),  # strangers get small frames until authenticated
                struct.pack(">I", 0),
                encode_frame(os.urandom(37)),
                encode_frame(b"RZV1\x03" + b"\0" * 32 + b"bad id!"),
            ):
                raw = await RawPeer.connect(stack, address)
                raw.writer.write(junk)
                await raw.closed_by_server()
            assert server.connected() == {"a", "b"}
            a.send("b", {"still": "serving"})
            await b_in.until(1)

    run(main)


def test_newer_connection_for_a_node_id_replaces_the_older() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            old = await RawPeer.connect(stack, address)
            await old.handshake("a")
            new = await RawPeer.connect(stack, address)
            channel = await new.handshake("a")
            await old.closed_by_server()
            b, _ = client(stack, address, "b")
            await eventually(lambda: b.connected, "b connected")
            assert server.connected() == {"a", "b"}
            b.send("a", {"to": "the newest"})
            msg = decode_message(channel.open(await new.frame()))
            assert msg == Relay(to="a", sender="b", body={"to": "the newest"})

    run(main)


def test_silent_connections_are_dropped_and_pinging_clients_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rendezvous, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(rendezvous, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(rendezvous, "PING_INTERVAL_S", 0.05)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            keeper, _ = client(stack, address, "keeper")
            await eventually(lambda: keeper.connected, "keeper connected")
            session, since = server._sessions["keeper"], time.monotonic()
            mute = await RawPeer.connect(stack, address)  # never says HELLO
            quiet = await RawPeer.connect(stack, address)
            await quiet.handshake("quiet")  # authenticated, then never pings
            await mute.closed_by_server()
            await quiet.closed_by_server()
            await asyncio.sleep(max(0.0, since + 1.1 - time.monotonic()))  # > 2 idle timeouts
            assert keeper.connected and server._sessions["keeper"] is session

    run(main)


def test_client_reconnects_after_a_server_restart_and_delivers_what_it_queued() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            first = RendezvousServer(SECRET)
            host, port = await first.start("127.0.0.1", 0)
            address = f"{host}:{port}"
            a, _ = client(stack, address, "a")
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            await first.close()
            await eventually(lambda: not a.connected and not b.connected, "both disconnected")
            a.send("b", {"offer": 1})
            a.send("b", {"offer": 2})
            second = RendezvousServer(SECRET)
            await second.start(host, port)
            stack.push_async_callback(second.close)
            assert await b_in.until(1) == [("a", {"offer": 2})]
            a.send("b", {"marker": True})
            assert await b_in.until(2) == [("a", {"offer": 2}), ("a", {"marker": True})]

    run(main)


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAFTSTATE_RENDEZVOUS_SECRET"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def test_cli_prints_its_address_relays_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(f'size = 3\nrendezvous_secret = "{SECRET}"\n')

    async def main() -> None:
        with open(tmp_path / "stderr", "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "raftstate", "rendezvous",
                "--listen", "127.0.0.1:0", "--config", str(config),
                stdout=asyncio.subprocess.PIPE, stderr=err, env=_cli_env(), cwd=REPO,
            )  # fmt: skip
        assert proc.stdout is not None
        try:
            # Generous: a loaded two-core box can take seconds to start Python.
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line.startswith("rendezvous listening on 127.0.0.1:"), line
            address = line.split()[-1]
            async with AsyncExitStack() as stack:
                a, _ = client(stack, address, "a")
                b, b_in = client(stack, address, "b")
                await eventually(lambda: a.connected and b.connected, "a and b connected")
                a.send("b", {"via": "cli"})
                assert await b_in.until(1) == [("a", {"via": "cli"})]
            proc.send_signal(signal.SIGTERM)
            rest = (await asyncio.wait_for(proc.stdout.read(), 10)).decode()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert "stopped after" in rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(main, limit_s=45)


def test_cli_without_a_secret_exits_2_naming_rendezvous_secret() -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "raftstate", "rendezvous", "--listen", "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=_cli_env(), cwd=REPO,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "rendezvous_secret" in lines[0], err
        assert out == b""

    run(main, limit_s=30)


# ---- connection caps and the handshake deadline --------------------------------------


def test_an_idle_connection_flood_is_capped_then_cut_while_nodes_still_connect() -> None:
    """40 idle connections from one source: only ``max_per_source`` are held
    (the rest are closed at once), those are cut after the handshake timeout,
    and a node from another source address connects throughout."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(
                stack, max_connections=12, max_per_source=8, handshake_timeout_s=0.5
            )
            host, port = address.rsplit(":", 1)
            flood = []
            for _ in range(40):
                reader, writer = await asyncio.open_connection(
                    host, int(port), local_addr=("127.0.0.2", 0)
                )
                stack.callback(writer.close)
                flood.append(reader)
            await eventually(lambda: server.refused >= 32, "the excess to be refused")
            assert server.open_connections <= 8
            node, _ = client(stack, address, "legit")  # from 127.0.0.1: its own budget
            await eventually(lambda: node.connected, "a node to connect during the flood")
            started = time.monotonic()
            for reader in flood:  # every flood connection ends: refused or timed out
                async with asyncio.timeout(3):
                    with contextlib.suppress(ConnectionResetError):
                        while await reader.read(65536):
                            pass
            assert time.monotonic() - started < 2.0
            await eventually(lambda: server.open_connections == 1, "only the node to remain")
            assert node.connected and server.connected() == {"legit"}

    run(main)


def test_the_total_cap_holds_across_sources() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack, max_connections=3, max_per_source=100)
            host, port = address.rsplit(":", 1)
            for i in range(6):
                _r, w = await asyncio.open_connection(
                    host, int(port), local_addr=(f"127.0.0.{i + 2}", 0)
                )
                stack.callback(w.close)
            await eventually(lambda: server.refused == 3, "3 connections refused")
            assert server.open_connections == 3

    run(main)


def test_caps_must_be_positive() -> None:
    for bad in ({"max_connections": 0}, {"max_per_source": 0}, {"handshake_timeout_s": 0}):
        with pytest.raises(ConfigError):
            RendezvousServer(SECRET, **bad)  # type: ignore[arg-type]


def test_cli_listen_without_a_host_binds_loopback() -> None:
    from raftstate.cli.rendezvous import _listen_address

    assert _listen_address(":0") == ("127.0.0.1", 0)
    assert _listen_address("0.0.0.0:7") == ("0.0.0.0", 7)


# ---- end-to-end sealing of relayed ICE signaling ---------------------------------------


def test_relayed_offers_open_only_for_their_pair_and_direction() -> None:
    from raftstate.transport.signalseal import SignalSealer

    cluster = generate_secret()
    a = SignalSealer(cluster, "a", ["b", "c"])
    b = SignalSealer(cluster, "b", ["a", "c"])
    c = SignalSealer(cluster, "c", ["a", "b"])
    offer = {"t": "offer", "candidates": ["1 1 udp 1 10.0.0.1 5000 typ host"], "pwd": "p"}
    wire = a.seal("b", offer)
    assert "10.0.0.1" not in json.dumps(wire) and "pwd" not in json.dumps(wire)
    assert b.open("a", wire) == offer
    assert c.open("a", wire) is None  # another pair
    assert a.open("b", wire) is None  # reflected back
    assert b.open("c", wire) is None  # claimed by another sender
    # The rendezvous (no cluster secret) can neither forge nor alter one.
    forged = SignalSealer(generate_secret(), "a", ["b"]).seal("b", {"t": "offer"})
    assert b.open("a", forged) is None
    raw = bytearray(base64.urlsafe_b64decode(wire["s"]))
    raw[-20] ^= 1
    assert b.open("a", {"s": base64.urlsafe_b64encode(bytes(raw)).decode()}) is None
    assert b.open("a", {"t": "offer"}) is None
    assert (a.rejected, b.rejected, c.rejected) == (1, 4, 1)


def test_reconnect_redials_at_once_and_delivers_what_was_sent_meanwhile() -> None:
    """After a NAT remap the client's TCP mapping is gone: ``reconnect()``
    drops the connection and dials again without the failure backoff (here
    5 s, far above the deadline), and a message sent right after it arrives
    over the new session."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            server, address = await serve(stack)
            a = RendezvousClient(address, "a", SECRET, Inbox(), reconnect_min_s=5.0,
                                 reconnect_max_s=5.0)  # fmt: skip
            a.start()
            stack.push_async_callback(a.close)
            b, b_in = client(stack, address, "b")
            await eventually(lambda: a.connected and b.connected, "a and b connected")
            first = a.connected_at
            assert first is not None
            a.reconnect()
            assert not a.connected and a.connected_at is None
            a.send("b", {"t": "moved", "host": "192.0.2.1", "port": 20001})
            a.reconnect()  # already redialling: a no-op
            async with asyncio.timeout(2.0):  # well under the 5 s backoff
                assert await b_in.until(1) == [("a", {"t": "moved", "host": "192.0.2.1",
                                                      "port": 20001})]  # fmt: skip
            assert a.connected and a.connected_at is not None and a.connected_at > first

    run(main)


def test_reconnect_between_dials_cuts_the_backoff_short() -> None:
    """A client backing off (5 s) after its server went away dials again at
    once when ``reconnect()`` is called (our NAT moved: the old failure says
    nothing about the new mapping)."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            first = RendezvousServer(SECRET)
            host, port = await first.start("127.0.0.1", 0)
            a = RendezvousClient(f"{host}:{port}", "a", SECRET, Inbox(), reconnect_min_s=5.0,
                                 reconnect_max_s=5.0)  # fmt: skip
            a.start()
            stack.push_async_callback(a.close)
            await eventually(lambda: a.connected, "a connected")
            await first.close()
            await eventually(lambda: not a.connected, "a disconnected")
            second = RendezvousServer(SECRET)
            await second.start(host, port)
            stack.push_async_callback(second.close)
            await eventually(lambda: a.connected_at is None, "a in its 5 s backoff")
            a.reconnect()
            await eventually(lambda: a.connected, "a reconnected well before 5 s", timeout=2.0)

    run(main)
