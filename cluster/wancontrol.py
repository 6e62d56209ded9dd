"""Talking to a running WAN emulator (:mod:`chaos.wan`) inside a namespace.

The emulator serves JSON over UDP on ``127.0.0.1`` of its own namespace
(:class:`~chaos.wan.tun.UdpControl`). :func:`netns_socket` creates a socket
inside that namespace with ``setns(2)`` on a short-lived helper thread (the
calling thread never changes namespace), so a request costs one datagram
each way and no subprocess; :class:`WanControl` sends the requests and
:class:`WanStats` types the answer to ``{"cmd": "get"}``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.wan import DirectionStats, Impairment, ImpairmentError
from chaos.wan.tun import DriverStats

__all__ = ["WanControl", "WanDirection", "WanStats", "netns_socket"]

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_REQUEST_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class WanDirection:
    """One direction as the emulator reports it."""

    src: str
    dst: str
    impairment: Impairment
    stats: DirectionStats


@dataclass(frozen=True, slots=True)
class WanStats:
    """The emulator's counters: the TUN driver's and each direction's."""

    driver: DriverStats
    directions: tuple[WanDirection, ...]

    def direction(self, src: str, dst: str) -> WanDirection | None:
        return next((d for d in self.directions if (d.src, d.dst) == (src, dst)), None)

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> WanStats:
        """From the reply to ``{"cmd": "get"}``. Raises ``KeyError``/``TypeError``
        for a malformed one."""
        directions = tuple(
            WanDirection(
                str(d["src"]),
                str(d["dst"]),
                Impairment.from_mapping(d["impairment"]),
                DirectionStats(**d["stats"]),
            )
            for d in reply["directions"]
        )
        return cls(DriverStats(**reply["driver"]), directions)


def netns_socket(netns: str, kind: socket.SocketKind = socket.SOCK_DGRAM) -> socket.socket:
    """An IPv4 socket that lives in the named namespace (``ip netns`` names).
    A helper thread enters the namespace with ``setns(2)``, creates the
    socket and ends; the calling thread never changes namespace. Raises
    ``OSError``. Safe to call from any thread."""
    result: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            fd = os.open(_NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_INET, kind))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=enter_and_create, name=f"setns-{netns}")
    thread.start()
    thread.join()
    made = result[0]
    if isinstance(made, BaseException):
        raise made
    return made


class WanControl:
    """Requests to a running emulator's control port in ``netns``.

    Methods raise ``OSError`` if the emulator does not answer within 2 s and
    :class:`~chaos.wan.ImpairmentError` if it refuses a request. Not
    thread-safe; ``close()`` when done."""

    def __init__(self, netns: str, port: int) -> None:
        self._sock = netns_socket(netns)
        self._sock.settimeout(_REQUEST_TIMEOUT_S)
        self._address = ("127.0.0.1", port)

    def close(self) -> None:
        self._sock.close()

    def request(self, request: Mapping[str, object]) -> dict[str, Any]:
        """Send one request; return the emulator's ``"ok"`` reply."""
        self._sock.sendto(json.dumps(request).encode(), self._address)
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError:
            raise OSError(f"the WAN emulator at {self._address} did not answer") from None
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ImpairmentError(f"the WAN emulator answered {reply!r}")
        if not reply.get("ok"):
            raise ImpairmentError(f"the WAN emulator refused {request}: {reply.get('error')}")
        return reply

    def set(self, src: str, dst: str, impairment: Impairment) -> None:
        """Replace the impairment of ``src`` -> ``dst``."""
        self.request({"cmd": "set", "src": src, "dst": dst, "impairment": impairment.to_json()})

    def apply(self, plan: Mapping[tuple[str, str], Impairment]) -> None:
        """Set every direction of ``plan`` (one datagram each, in order)."""
        for (src, dst), impairment in plan.items():
            self.set(src, dst, impairment)

    def stats(self) -> WanStats:
        return WanStats.from_reply(self.request({"cmd": "get"}))
