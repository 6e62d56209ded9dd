"""The chaos proxy's API refuses oversized bodies and absurd toxic attributes,
and a listen address without a host binds loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

from chaos.proxy.api import MAX_BODY, ApiServer
from chaos.proxy.registry import ProxyRegistry
from chaos.proxy.toxics import attribute_problem


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        body = await reader.readexactly(length) if length else b""
        return status, (json.loads(body) if body else {})
    finally:
        writer.close()


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def _with_api(fn: object) -> None:
    api = ApiServer(ProxyRegistry(seed=1))
    _host, port = await api.start("127.0.0.1", 0)
    try:
        await fn(port)  # type: ignore[operator]
    finally:
        await api.close()


def test_a_body_over_the_cap_gets_413_with_the_toxiproxy_error_body() -> None:
    async def run(port: int) -> None:
        big = b'{"name": "' + b"x" * MAX_BODY + b'"}'
        status, body = await _request(port, _post("/proxies", big))
        assert status == 413 and body["status"] == 413 and "too large" in str(body["error"])
        chunked = (
            b"POST /proxies HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"8000\r\n" + b"y" * 0x8000 + b"\r\n" for _ in range(3))
            + b"0\r\n\r\n"
        )
        status, _ = await _request(port, chunked)
        assert status == 413
        # A body under the cap is still served.
        ok = json.dumps({"name": "p", "upstream": "127.0.0.1:9"}).encode()
        status, body = await _request(port, _post("/proxies", ok))
        assert status == 201 and body["name"] == "p"

    asyncio.run(_with_api(run))


@pytest.mark.parametrize(
    ("attributes", "toxicity", "field"),
    [
        ('{"latency": NaN}', "1.0", "latency"),
        ('{"latency": Infinity}', "1.0", "latency"),
        ('{"latency": -5}', "1.0", "latency"),
        ('{"jitter": 1e300}', "1.0", "jitter"),
        ('{"latency": 10}', "NaN", "toxicity"),
        ('{"latency": 10}', "1.5", "toxicity"),
        ('{"latency": 10}', "-0.1", "toxicity"),
    ],
)
def test_absurd_toxic_attributes_are_refused_with_400_naming_them(
    attributes: str, toxicity: str, field: str
) -> None:
    async def run(port: int) -> None:
        ok = json.dumps({"name": "p", "upstream": "127.0.0.1:9"}).encode()
        assert (await _request(port, _post("/proxies", ok)))[0] == 201
        raw = (
            f'{{"type": "latency", "stream": "downstream", "toxicity": {toxicity}, '
            f'"attributes": {attributes}}}'
        ).encode()
        status, body = await _request(port, _post("/proxies/p/toxics", raw))
        assert status == 400, body
        assert str(body["error"]).startswith(f"invalid toxic attribute {field}"), body
        status, body = await _request(
            port, b"GET /proxies/p/toxics HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        assert status == 200 and body == []  # type: ignore[comparison-overlap]

    asyncio.run(_with_api(run))


def test_a_toxic_update_is_validated_like_a_new_one() -> None:
    async def run(port: int) -> None:
        ok = json.dumps({"name": "p", "upstream": "127.0.0.1:9"}).encode()
        assert (await _request(port, _post("/proxies", ok)))[0] == 201
        toxic = json.dumps({"type": "latency", "attributes": {"latency": 5}}).encode()
        assert (await _request(port, _post("/proxies/p/toxics", toxic)))[0] == 200
        bad = json.dumps({"attributes": {"latency": -1}}).encode()
        status, body = await _request(port, _post("/proxies/p/toxics/latency_downstream", bad))
        assert status == 400 and "latency" in str(body["error"])

    asyncio.run(_with_api(run))


def test_attribute_bounds_at_the_edges() -> None:
    assert attribute_problem("latency", "latency", 0) is None
    assert attribute_problem("latency", "latency", 3_600_000) is None
    assert attribute_problem("latency", "latency", 3_600_001) is not None
    assert attribute_problem("slicer", "delay", 3_600_000_000) is None  # µs for slicer
    assert attribute_problem("packet_loss", "loss_rate", 1.0) is None
    assert attribute_problem("packet_loss", "loss_rate", 1.01) is not None
    assert attribute_problem("bandwidth", "rate", -1) is not None


def test_a_listen_address_without_a_host_binds_loopback() -> None:
    async def run(port: int) -> None:
        body = json.dumps({"name": "q", "listen": ":0", "upstream": "127.0.0.1:9"}).encode()
        status, proxy = await _request(port, _post("/proxies", body))
        assert status == 201 and str(proxy["listen"]).startswith("127.0.0.1:"), proxy

    asyncio.run(_with_api(run))
