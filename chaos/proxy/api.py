"""Toxiproxy 2.x's HTTP API on asyncio streams, with no web framework.

Theory of operation
-------------------
:class:`ApiServer` reads HTTP/1.1 requests (``Content-Length`` or chunked
bodies, keep-alive unless the client says ``Connection: close``), routes them
to :class:`~chaos.proxy.registry.ProxyRegistry` and answers JSON. Errors are
``{"error": msg, "status": code}`` with Content-Type ``text/plain;
charset=utf-8`` and Toxiproxy's messages; a browser ``User-Agent``
(``Mozilla/...``) gets 403, as upstream does to stop cross-site requests.

Our extension: a proxy may carry ``"protocol": "udp"`` (default ``"tcp"``);
see :mod:`chaos.proxy.udp` and :mod:`chaos.proxy.toxics` for its toxics.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from chaos.proxy import registry as reg
from chaos.proxy.registry import ApiError, ProxyRegistry
from chaos.proxy.toxics import Stream, ToxicSpec, attribute_problem

__all__ = ["VERSION", "ApiServer"]

VERSION = "2.12.0"

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    500: "Internal Server Error",
}
_FRACTION_ATTRIBUTES = frozenset({"loss_rate", "correlation", "probability"})
#: Largest request body (and header block) read; more gets 413 and the
#: connection is closed. Real Toxiproxy bodies are a few hundred bytes.
MAX_BODY = 64 * 1024
_MAX_HEADER_LINES = 100


class _TooLarge(Exception):
    """The request's body or headers exceed the caps."""


class _Response:
    def __init__(self, status: int, body: object = None, content_type: str = "application/json"):
        self.status = status
        if isinstance(body, bytes):
            self.body = body
        else:
            self.body = b"" if body is None else json.dumps(body).encode() + b"\n"
        self.content_type = content_type


def _error(err: ApiError) -> _Response:
    body = {"error": err.message, "status": err.status}
    return _Response(err.status, body, "text/plain; charset=utf-8")


class ApiServer:
    """Serves the API for one registry. Start with :meth:`start`; not thread-safe."""

    def __init__(self, proxies: ProxyRegistry) -> None:
        self.proxies = proxies
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port). Raises OSError."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.proxies.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _TooLarge as exc:
                    response = _error(ApiError(413, f"request too large: {exc}"))
                    head = [
                        f"HTTP/1.1 413 {_REASONS[413]}",
                        f"Content-Type: {response.content_type}",
                        f"Content-Length: {len(response.body)}",
                        "Connection: close",
                    ]
                    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + response.body)
                    await writer.drain()
                    break
                if request is None:
                    break
                method, path, headers, body = request
                if headers.get("user-agent", "").startswith("Mozilla/"):
                    response = _error(ApiError(403, "User agent not allowed"))
                else:
                    async with self._lock:  # one mutation at a time, like upstream's mutex
                        response = await self.handle(method, path, body)
                keep = headers.get("connection", "").lower() != "close"
                head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}"]
                if response.status != 204:
                    head.append(f"Content-Type: {response.content_type}")
                    head.append(f"Content-Length: {len(response.body)}")
                if not keep:
                    head.append("Connection: close")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + response.body)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, method: str, path: str, body: bytes) -> _Response:
        """Route one request; never raises ApiError (it becomes the response)."""
        parts = [unquote(p) for p in path.split("?", 1)[0].strip("/").split("/")]
        try:
            return await self._route(method, parts, body)
        except ApiError as err:
            return _error(err)

    async def _route(self, method: str, parts: list[str], body: bytes) -> _Response:
        n = len(parts)
        if parts == ["version"] and method == "GET":
            return _Response(200, {"version": VERSION})
        if parts == ["reset"] and method == "POST":
            await self.proxies.reset()
            return _Response(204)
        if parts == ["populate"] and method == "POST":
            return await self._populate(body)
        if n == 1 and parts[0] == "proxies":
            if method == "GET":
                return _Response(200, {k: p.to_json() for k, p in self.proxies.proxies.items()})
            if method == "POST":
                return await self._create_proxy(body)
        elif n == 2 and parts[0] == "proxies":
            proxy = self.proxies.get(parts[1]) if method != "DELETE" else None
            if method == "GET" and proxy is not None:
                return _Response(200, proxy.to_json())
            if method in ("POST", "PATCH") and proxy is not None:
                return await self._update_proxy(proxy, body)
            if method == "DELETE":
                await self.proxies.remove(parts[1])
                return _Response(204)
        elif n == 3 and parts[0] == "proxies" and parts[2] == "toxics":
            proxy = self.proxies.get(parts[1])
            if method == "GET":
                return _Response(200, [t.to_json() for t in proxy.toxics])
            if method == "POST":
                toxic = _parse_toxic(_json_body(body), proxy.allowed_toxics())
                proxy.add_toxic(toxic)
                return _Response(200, toxic.to_json())
        elif n == 4 and parts[0] == "proxies" and parts[2] == "toxics":
            proxy = self.proxies.get(parts[1])
            toxic = proxy.get_toxic(parts[3])
            if method == "GET":
                return _Response(200, toxic.to_json())
            if method in ("POST", "PATCH"):
                toxic = _update_toxic(toxic, _json_body(body))
                proxy.replace_toxic(toxic)
                return _Response(200, toxic.to_json())
            if method == "DELETE":
                proxy.remove_toxic(toxic.name)
                return _Response(204)
        else:
            return _Response(404, b"404 page not found\n", "text/plain; charset=utf-8")
        return _Response(405)

    async def _create_proxy(self, body: bytes) -> _Response:
        fields = _proxy_fields(_json_body(body))
        proxy = await self.proxies.add(*fields)
        return _Response(201, proxy.to_json())

    async def _populate(self, body: bytes) -> _Response:
        items = _json_body(body)
        if not isinstance(items, list):
            raise reg.BAD_BODY
        wanted = [_proxy_fields(item) for item in items]
        result = []
        for name, listen, upstream, protocol, enabled in wanted:
            existing = self.proxies.proxies.get(name)
            if existing is not None:
                same = existing.upstream == upstream and existing.protocol == protocol
                if same and listen in (existing.listen, existing.requested_listen):
                    result.append(existing.to_json())
                    continue
                await self.proxies.remove(name)
            proxy = await self.proxies.add(name, listen, upstream, protocol, enabled)
            result.append(proxy.to_json())
        return _Response(201, {"proxies": result})

    async def _update_proxy(self, proxy: reg.Proxy, body: bytes) -> _Response:
        data = _json_body(body)
        if not isinstance(data, dict):
            raise reg.BAD_BODY
        listen = _opt(data, "listen", str, proxy.listen)
        upstream = _opt(data, "upstream", str, proxy.upstream)
        enabled = _opt(data, "enabled", bool, proxy.enabled)
        if listen != proxy.listen or upstream != proxy.upstream:
            await proxy.stop(release=True)
            proxy.listen, proxy.upstream = listen, upstream
            proxy.requested_listen = listen
        if enabled:
            await proxy.start()
        else:
            await proxy.stop()
        return _Response(200, proxy.to_json())


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    try:
        method, path, _version = line.decode("latin-1").split()
    except ValueError:
        raise ValueError("malformed request line") from None
    headers: dict[str, str] = {}
    lines = 0
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        lines += 1
        if lines > _MAX_HEADER_LINES:
            raise _TooLarge(f"more than {_MAX_HEADER_LINES} header lines")
        key, _, value = raw.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        total = 0
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            total += size
            if size < 0 or total > MAX_BODY:
                raise _TooLarge(f"body over {MAX_BODY} bytes")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            raise _TooLarge(f"body of {length} bytes, at most {MAX_BODY}")
        if length < 0:
            raise ValueError("negative content-length")
        body = await reader.readexactly(length) if length else b""
    return method.upper(), path, headers, body


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise reg.BAD_BODY from None


def _opt(data: Mapping[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise reg.BAD_BODY
    return value


def _proxy_fields(data: Any) -> tuple[str, str, str, str, bool]:
    """(name, listen, upstream, protocol, enabled) from a proxy body."""
    if not isinstance(data, dict):
        raise reg.BAD_BODY
    name = _opt(data, "name", str, "")
    listen = _opt(data, "listen", str, "")
    upstream = _opt(data, "upstream", str, "")
    protocol = _opt(data, "protocol", str, "tcp")
    enabled = _opt(data, "enabled", bool, True)
    if not name:
        raise reg.missing_field("name")
    if not upstream:
        raise reg.missing_field("upstream")
    if protocol not in ("tcp", "udp"):
        raise ApiError(400, "protocol was invalid, can be either tcp or udp")
    return name, listen or "127.0.0.1:0", upstream, protocol, enabled


def _attributes(
    kind: str, raw: Any, names: tuple[str, ...], base: Mapping[str, float]
) -> dict[str, float]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise reg.BAD_BODY
    attrs = {key: base.get(key, 0) for key in names}
    for key in names:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise reg.BAD_BODY
        problem = attribute_problem(kind, key, value)
        if problem is not None:
            raise ApiError(400, f"invalid toxic attribute {key}: {problem}")
        if key not in _FRACTION_ATTRIBUTES:
            if value != int(value):
                raise reg.BAD_BODY
            value = int(value)
        attrs[key] = value
    return attrs


def _toxicity(data: Mapping[str, Any], default: float) -> float:
    value = _opt(data, "toxicity", int | float, default)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ApiError(400, f"invalid toxic attribute toxicity: {value!r} is not within [0, 1]")
    return float(value)


def _parse_toxic(data: Any, allowed: Mapping[str, tuple[str, ...]]) -> ToxicSpec:
    if not isinstance(data, dict):
        raise reg.BAD_BODY
    kind = _opt(data, "type", str, "")
    stream_name = _opt(data, "stream", str, "") or "downstream"
    toxicity = _toxicity(data, 1.0)
    try:
        stream = Stream(stream_name.lower())
    except ValueError:
        raise reg.INVALID_STREAM from None
    if kind not in allowed:
        raise reg.INVALID_TOXIC_TYPE
    name = _opt(data, "name", str, "") or f"{kind}_{stream.value}"
    attrs = _attributes(kind, data.get("attributes"), allowed[kind], {})
    return ToxicSpec(name, kind, stream, toxicity, attrs)


def _update_toxic(toxic: ToxicSpec, data: Any) -> ToxicSpec:
    if not isinstance(data, dict):
        raise reg.BAD_BODY
    toxicity = _toxicity(data, toxic.toxicity)
    names = tuple(toxic.attributes)
    attrs = _attributes(toxic.type, data.get("attributes"), names, toxic.attributes)
    return ToxicSpec(toxic.name, toxic.type, toxic.stream, toxicity, attrs)
