"""Proxies and their toxics, independent of HTTP.

A :class:`Proxy` owns its toxic list and, while enabled, one running data path
(:class:`~chaos.proxy.tcp.TcpProxy` or :class:`~chaos.proxy.udp.UdpProxy`).
Every change to the toxic list is pushed to the data path, so toxics apply to
connections that are already open. Errors are :class:`ApiError` carrying the
HTTP status and Toxiproxy's exact message. All methods run on the event loop
thread.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

from chaos.proxy.toxics import TCP_TOXIC_ATTRIBUTES, UDP_TOXIC_ATTRIBUTES, Stream, ToxicSpec

__all__ = ["ApiError", "DataPath", "Proxy", "ProxyRegistry", "format_hostport", "split_hostport"]


class ApiError(Exception):
    """An error the API reports as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


BAD_BODY = ApiError(400, "bad request body")
PROXY_NOT_FOUND = ApiError(404, "proxy not found")
TOXIC_NOT_FOUND = ApiError(404, "toxic not found")
PROXY_EXISTS = ApiError(409, "proxy already exists")
TOXIC_EXISTS = ApiError(409, "toxic already exists")
INVALID_STREAM = ApiError(400, "stream was invalid, can be either upstream or downstream")
INVALID_TOXIC_TYPE = ApiError(400, "invalid toxic type")


def missing_field(name: str) -> ApiError:
    return ApiError(400, f"missing required field: {name}")


def split_hostport(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → ``(host, port)``; raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DataPath(Protocol):
    """What a proxy needs from its TCP or UDP data path."""

    async def start(self) -> tuple[str, int]: ...
    async def stop(self) -> None: ...
    def toxics_changed(self) -> None: ...


class Proxy:
    """One named proxy. ``listen`` shows the bound address once started."""

    def __init__(
        self, name: str, listen: str, upstream: str, protocol: str, rng: random.Random
    ) -> None:
        self.name = name
        self.listen = listen
        self.requested_listen = listen
        self.upstream = upstream
        self.protocol = protocol
        self.enabled = False
        self._rng = rng
        self._toxics: list[ToxicSpec] = []
        self._path: DataPath | None = None

    @property
    def toxics(self) -> list[ToxicSpec]:
        """Upstream toxics first, each stream in insertion order."""
        up = [t for t in self._toxics if t.stream is Stream.UPSTREAM]
        return up + [t for t in self._toxics if t.stream is Stream.DOWNSTREAM]

    def toxics_for(self, stream: Stream) -> list[ToxicSpec]:
        return [t for t in self._toxics if t.stream is stream]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "protocol": self.protocol,
            "toxics": [t.to_json() for t in self.toxics],
        }

    async def start(self) -> None:
        """Bind ``listen`` and start forwarding; raises ApiError(500) on bind failure."""
        if self._path is not None:
            if not self.enabled:  # a blackholed UDP proxy: resume forwarding
                await self._path.start()
                self.enabled = True
            return
        from chaos.proxy.tcp import TcpProxy
        from chaos.proxy.udp import UdpProxy

        try:
            host, port = split_hostport(self.listen)
            up_host, up_port = split_hostport(self.upstream)
        except ValueError as exc:
            raise ApiError(500, str(exc)) from None
        if host in ("", "localhost"):
            host = "127.0.0.1"  # ":port" binds loopback; ask for 0.0.0.0 explicitly
        path: DataPath
        if self.protocol == "udp":
            path = UdpProxy(self, host, port, up_host, up_port, random.Random(self._rng.random()))
        else:
            path = TcpProxy(self, host, port, up_host, up_port, random.Random(self._rng.random()))
        try:
            bound_host, bound_port = await path.start()
        except OSError as exc:
            raise ApiError(
                500, f"listen {self.protocol} {self.listen}: {exc.strerror or exc}"
            ) from None
        self._path = path
        self.listen = format_hostport(bound_host, bound_port)
        self.enabled = True

    async def stop(self, release: bool = False) -> None:
        """Close the listener and every live connection. A UDP proxy is
        blackholed instead (its socket stays bound) unless ``release``."""
        from chaos.proxy.udp import UdpProxy

        self.enabled = False
        if isinstance(self._path, UdpProxy) and not release:
            self._path.blackhole()
            return
        path, self._path = self._path, None
        if path is not None:
            await path.stop()

    def add_toxic(self, toxic: ToxicSpec) -> None:
        if any(t.name == toxic.name for t in self._toxics):
            raise TOXIC_EXISTS
        self._toxics.append(toxic)
        self._changed()

    def get_toxic(self, name: str) -> ToxicSpec:
        for toxic in self._toxics:
            if toxic.name == name:
                return toxic
        raise TOXIC_NOT_FOUND

    def replace_toxic(self, toxic: ToxicSpec) -> None:
        self._toxics = [toxic if t.name == toxic.name else t for t in self._toxics]
        self._changed()

    def remove_toxic(self, name: str) -> None:
        self.get_toxic(name)
        self._toxics = [t for t in self._toxics if t.name != name]
        self._changed()

    def clear_toxics(self) -> None:
        self._toxics = []
        self._changed()

    def _changed(self) -> None:
        if self._path is not None:
            self._path.toxics_changed()

    def allowed_toxics(self) -> Mapping[str, tuple[str, ...]]:
        return UDP_TOXIC_ATTRIBUTES if self.protocol == "udp" else TCP_TOXIC_ATTRIBUTES


class ProxyRegistry:
    """All proxies by name. ``seed`` makes every toxic roll reproducible."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self.proxies: dict[str, Proxy] = {}

    def get(self, name: str) -> Proxy:
        try:
            return self.proxies[name]
        except KeyError:
            raise PROXY_NOT_FOUND from None

    async def add(
        self, name: str, listen: str, upstream: str, protocol: str, enabled: bool
    ) -> Proxy:
        """Create and (if ``enabled``) start a proxy; raises ApiError 409/500."""
        if name in self.proxies:
            raise PROXY_EXISTS
        proxy = Proxy(name, listen, upstream, protocol, random.Random(self._rng.random()))
        if enabled:
            await proxy.start()
        self.proxies[name] = proxy
        return proxy

    async def remove(self, name: str) -> None:
        proxy = self.get(name)
        del self.proxies[name]
        await proxy.stop(release=True)

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        for proxy in list(self.proxies.values()):
            proxy.clear_toxics()
            await proxy.start()

    async def close(self) -> None:
        for proxy in list(self.proxies.values()):
            await proxy.stop(release=True)
