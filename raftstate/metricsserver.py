"""``GET /metrics`` over HTTP(S) on ``metrics_listen``, behind the operator role.

Theory of operation
-------------------
A deliberately small HTTP/1.1 server on the node's event loop (the scrape
reads loop-owned state, so it runs where that state lives):

1. A connection is accepted while fewer than :data:`MAX_CONNECTIONS` are
   open (else closed at once). When the node runs TLS the port is HTTPS
   with the node's own certificate, re-read when the files change
   (:class:`TlsContexts`: the TLS server-name callback, which OpenSSL runs
   on every handshake, swaps in a context built from the new files). With
   ``client_ca_file`` a client certificate is *optional* and verified
   (unlike grpcio, Python's TLS can make it optional on one port).
2. The request head must arrive within :data:`HEAD_TIMEOUT_S` and fit in
   :data:`MAX_HEAD_BYTES`; a body is never read. One request per
   connection (``Connection: close``), which is what Prometheus does anyway.
3. :func:`decide` (pure) answers everything but a permitted scrape:
   ``GET /metrics`` only (405 for another method, 404 for another path);
   with authentication on, the caller is identified from an
   ``Authorization: Bearer`` token or, without one, from the client
   certificate's ``raftstate://`` URI SAN (the gRPC rules,
   raftstate/authn.py): no or a bad credential is 401 (with
   ``WWW-Authenticate: Bearer``), a role other than operator or admin 403.
4. A permitted scrape renders the registry (raftstate/metrics.py) in the
   Prometheus text format 0.0.4.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from raftstate.authz import METRICS_SCRAPE, Identity, authorize
from raftstate.errors import ConfigError, PermissionDenied, Unauthenticated

log = logging.getLogger("raftstate.metrics")

MAX_CONNECTIONS = 16
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"

Identify = Callable[[str | None, list[str]], Identity]


class BadRequest(ValueError):
    """The bytes are not an HTTP/1.x request head."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    #: Header names lower-cased; a repeated header keeps its last value.
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        """The response as bytes on the wire."""
        lines = [
            f"HTTP/1.1 {self.status} {self.reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.extra_headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def parse_request_head(head: bytes) -> HttpRequest:
    """Parse a request line and headers (ending in a blank line). The query
    string is dropped from the path. Raises ``BadRequest``."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise BadRequest("undecodable") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("not an HTTP/1.x request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:40]!r}")
        headers[name.lower()] = value.strip()
    return HttpRequest(method, target.split("?", 1)[0], headers)


def _text(status: int, reason: str, message: str, *extra: tuple[str, str]) -> HttpResponse:
    return HttpResponse(status, reason, (message + "\n").encode(), extra_headers=extra)


def bearer(headers: dict[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else value.strip()


def decide(
    request: HttpRequest, identify: Identify | None, uri_sans: list[str]
) -> HttpResponse | None:
    """The answer to anything but a permitted scrape, or ``None`` to serve
    the metrics. ``identify`` is ``None`` when authentication is off."""
    if request.path != METRICS_PATH:
        return _text(404, "Not Found", f"not found; metrics are at {METRICS_PATH}")
    if request.method != "GET":
        return _text(405, "Method Not Allowed", "only GET", ("Allow", "GET"))
    if identify is None:
        return None
    token = bearer(request.headers)
    try:
        if token is None and not uri_sans:
            raise Unauthenticated(
                "no credential: send `Authorization: Bearer <token>` with an operator token "
                "(`raftstate auth issue --role operator`) or a client certificate"
            )
        identity = identify(token, uri_sans)
        authorize(identity, METRICS_SCRAPE)
    except Unauthenticated as err:
        challenge = ("WWW-Authenticate", 'Bearer realm="raftstate"')
        return _text(401, "Unauthorized", err.message, challenge)
    except PermissionDenied as err:
        return _text(403, "Forbidden", err.message)
    return None


def uri_sans(peercert: Any) -> list[str]:
    """The URI subject alternative names of a verified peer certificate
    (``SSLSocket.getpeercert()``'s dict; ``{}``/``None``: no certificate)."""
    if not peercert:
        return []
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


class TlsContexts:
    """Server TLS contexts from certificate files, rebuilt when they change."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p)
        self._cert, self._key, self._ca = cert_file, key_file, client_ca_file
        self._seen = self._signature()
        self.current = self._build()
        self.reloads = 0
        #: The context the listening socket uses; its callback swaps in ``current``.
        self.listener = self.current
        self.listener.sni_callback = self._on_hello

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self._paths:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self._cert, self._key)
            if self._ca:
                ctx.load_verify_locations(self._ca)
                ctx.verify_mode = ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_cert_file: cannot load TLS files for metrics: {exc}") from None
        return ctx

    def _on_hello(self, sslobj: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            sig = self._signature()
            if sig != self._seen:
                self.current = self._build()
                self.current.sni_callback = self._on_hello
                self._seen = sig
                self.reloads += 1
        except (OSError, ConfigError) as exc:
            log.warning("metrics: TLS files changed but cannot be loaded (keeping): %s", exc)
        if self.current is not self.listener:
            sslobj.context = self.current


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` (module docstring). Event-loop only."""

    def __init__(
        self,
        address: str,
        render: Callable[[], Awaitable[bytes]],
        identify: Identify | None,
        tls: TlsContexts | None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._render = render
        self._identify = identify
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._open = 0
        self.scrapes = 0

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and serve. Raises ``ConfigError`` if the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve,
                self._host,
                self._port,
                limit=MAX_HEAD_BYTES,
                ssl=self._tls.listener if self._tls else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if self._tls else None,
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics_listen: cannot bind {self._host}:{self._port}: {exc}"
            ) from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            response = await self._answer(reader, writer)
            if response is not None:
                writer.write(response.encode())
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (OSError, TimeoutError, ssl.SSLError):
            pass  # the client went away or stalled; nothing to tell it
        finally:
            self._open -= 1
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> HttpResponse | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            request = parse_request_head(head[:-4])
        except asyncio.LimitOverrunError:
            return _text(431, "Request Header Fields Too Large", "request head too large")
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        except BadRequest as err:
            return _text(400, "Bad Request", str(err))
        sans: list[str] = []
        if self._tls is not None:
            ssl_object = writer.get_extra_info("ssl_object")
            sans = uri_sans(ssl_object.getpeercert() if ssl_object is not None else None)
        refusal = decide(request, self._identify, sans)
        if refusal is not None:
            return refusal
        self.scrapes += 1
        return HttpResponse(200, "OK", await self._render(), content_type=CONTENT_TYPE)


__all__ = [
    "BadRequest",
    "HttpRequest",
    "HttpResponse",
    "MetricsServer",
    "TlsContexts",
    "bearer",
    "decide",
    "parse_request_head",
    "uri_sans",
]
