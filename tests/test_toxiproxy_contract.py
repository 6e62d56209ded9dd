"""Contract tests: our chaos proxy speaks Toxiproxy 2.x's HTTP API.

Each test drives a real server process with raw ``requests`` (status codes,
bodies, headers, messages), with toxiproxy-python 0.1.1 unchanged, and with
real traffic through the proxies. With ``TOXIPROXY_URL`` set, the TCP cases
also run against that server (e.g. a real toxiproxy-server); UDP cases are our
extension and run only against ours.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest
import requests
import toxiproxy
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

TEXT = "text/plain; charset=utf-8"


@dataclass
class Api:
    url: str
    ours: bool
    made: list[str] = field(default_factory=list)

    def name(self, stem: str) -> str:
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        self.made.append(name)
        return name

    def get(self, path: str, **kw: object) -> requests.Response:
        return requests.get(self.url + path, timeout=5, **kw)  # type: ignore[arg-type]

    def post(self, path: str, json: object = None, **kw: object) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=5, **kw)  # type: ignore[arg-type]

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, timeout=5)

    def create(self, upstream: str, stem: str = "p", **extra: object) -> dict[str, object]:
        body = {"name": self.name(stem), "upstream": upstream, "listen": "127.0.0.1:0", **extra}
        response = self.post("/proxies", body)
        assert response.status_code == 201, response.text
        data: dict[str, object] = response.json()
        return data


def _start_server() -> tuple[subprocess.Popen[str], str, list[str]]:
    """Start ``python -m chaos.proxy`` on port 0 and wait (15 s deadline) for
    its readiness line; a thread keeps draining its output so it never blocks."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos.proxy", "--host", "127.0.0.1", "--port", "0", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if "listening on" in line:
                output: list[str] = []
                threading.Thread(target=output.extend, args=(proc.stdout,), daemon=True).start()
                return proc, "http://" + line.rsplit(" ", 1)[1].strip(), output
            if not line and proc.poll() is not None:
                break
    proc.kill()
    proc.wait()
    raise RuntimeError("chaos proxy did not report readiness within 15 s")


@pytest.fixture(scope="module")
def our_server() -> Iterator[str]:
    proc, url, output = _start_server()
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.05)
        print("----- chaos proxy output -----\n" + "".join(output)[-5000:])


SERVERS = ["ours"] + (["external"] if os.environ.get("TOXIPROXY_URL") else [])


@pytest.fixture(params=SERVERS)
def api(request: pytest.FixtureRequest, our_server: str) -> Iterator[Api]:
    url = our_server if request.param == "ours" else os.environ["TOXIPROXY_URL"].rstrip("/")
    a = Api(url, ours=request.param == "ours")
    yield a
    for name in a.made:
        requests.delete(f"{url}/proxies/{name}", timeout=5)


@pytest.fixture
def ours(our_server: str) -> Iterator[Api]:
    a = Api(our_server, ours=True)
    yield a
    for name in a.made:
        requests.delete(f"{our_server}/proxies/{name}", timeout=5)


@pytest.fixture
def client(api: Api) -> Iterator[toxiproxy.Toxiproxy]:
    """toxiproxy-python talks to APIConsumer.host/port (class attributes,
    default 127.0.0.1:8474); point them at the server under test."""
    saved = (APIConsumer.host, APIConsumer.port)
    parsed = urlparse(api.url)
    server = toxiproxy.Toxiproxy()
    server.update_api_consumer(parsed.hostname, parsed.port)
    yield server
    APIConsumer.host, APIConsumer.port = saved


def _serve(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    sock.settimeout(0.05)  # so closing the listener ends this loop promptly
    while sock.fileno() != -1:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(None)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


@pytest.fixture
def echo() -> Iterator[str]:
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_serve, args=(sock, _echo), daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    thread.join(timeout=2)


@pytest.fixture
def udp_echo() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except OSError:
                continue
            sock.sendto(data, addr)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    sock.close()


def _port(proxy: dict[str, object]) -> int:
    return int(str(proxy["listen"]).rsplit(":", 1)[1])


def _connect(proxy: dict[str, object]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(proxy)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _roundtrip(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed during roundtrip"
        got += chunk
    assert got == payload
    return time.monotonic() - start


def _read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == TEXT
    body = response.json()
    assert body["status"] == status
    assert body["error"].startswith(message)


# ---------------------------------------------------------------- raw HTTP API


def test_version_is_json_2x(api: Api) -> None:
    response = api.get("/version")
    assert response.status_code == 200
    assert response.json()["version"].startswith("2.")


def test_browser_user_agent_is_forbidden(api: Api) -> None:
    response = api.get("/proxies", headers={"User-Agent": "Mozilla/5.0 (X11)"})
    _error(response, 403, "User agent not allowed")


def test_create_proxy_reports_bound_listen_address(api: Api, echo: str) -> None:
    name = api.name("create")
    body = {"name": name, "upstream": echo, "listen": "localhost:0"}
    response = api.post("/proxies", body)
    assert response.status_code == 201
    proxy = response.json()
    assert proxy["name"] == name and proxy["upstream"] == echo
    assert proxy["enabled"] is True and proxy["toxics"] == []
    host, port = proxy["listen"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert api.get(f"/proxies/{name}").json()["listen"] == proxy["listen"]
    assert name in api.get("/proxies").json()
    _error(api.post("/proxies", body), 409, "proxy already exists")


def test_create_proxy_errors(api: Api) -> None:
    _error(api.post("/proxies", {"upstream": "127.0.0.1:1"}), 400, "missing required field: name")
    _error(api.post("/proxies", {"name": api.name("x")}), 400, "missing required field: upstream")
    response = requests.post(api.url + "/proxies", data=b"{not json", timeout=5)
    _error(response, 400, "bad request body")
    _error(api.get("/proxies/does_not_exist"), 404, "proxy not found")


def test_create_disabled_proxy_does_not_listen(api: Api, echo: str) -> None:
    proxy = api.create(echo, enabled=False)
    assert proxy["enabled"] is False


def test_toxic_defaults_and_errors(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    base = f"/proxies/{proxy['name']}/toxics"
    response = api.post(base, {"type": "latency"})
    assert response.status_code == 200
    toxic = response.json()
    assert toxic["name"] == "latency_downstream" and toxic["stream"] == "downstream"
    assert toxic["toxicity"] == 1.0
    assert toxic["attributes"] == {"latency": 0, "jitter": 0}
    _error(api.post(base, {"type": "latency"}), 409, "toxic already exists")
    _error(
        api.post(base, {"type": "latency", "stream": "sideways"}),
        400,
        "stream was invalid, can be either upstream or downstream",
    )
    _error(api.post(base, {"type": "no_such_toxic"}), 400, "invalid toxic type")
    _error(api.get(f"{base}/missing"), 404, "toxic not found")
    _error(api.post("/proxies/does_not_exist/toxics", {"type": "latency"}), 404, "proxy not found")


def test_toxic_listing_update_and_delete(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    base = f"/proxies/{proxy['name']}/toxics"
    api.post(base, {"type": "latency", "attributes": {"latency": 10}})
    api.post(base, {"type": "bandwidth", "stream": "upstream", "attributes": {"rate": 100}})
    listed = api.get(base).json()
    assert [t["name"] for t in listed] == ["bandwidth_upstream", "latency_downstream"]
    updated = api.post(f"{base}/latency_downstream", {"attributes": {"jitter": 5}, "toxicity": 0.5})
    assert updated.status_code == 200
    assert updated.json()["attributes"] == {"latency": 10, "jitter": 5}
    assert updated.json()["toxicity"] == 0.5
    assert api.get(f"{base}/latency_downstream").json() == updated.json()
    assert api.get(f"/proxies/{proxy['name']}").json()["toxics"] == api.get(base).json()
    response = api.delete(f"{base}/latency_downstream")
    assert response.status_code == 204 and response.content == b""
    _error(api.delete(f"{base}/latency_downstream"), 404, "toxic not found")


def test_populate_creates_keeps_and_replaces(api: Api, echo: str) -> None:
    keep, change = api.name("keep"), api.name("change")
    first = api.post(
        "/populate",
        [
            {"name": keep, "upstream": echo, "listen": "127.0.0.1:0"},
            {"name": change, "upstream": echo, "listen": "127.0.0.1:0"},
        ],
    )
    assert first.status_code == 201
    by_name = {p["name"]: p for p in first.json()["proxies"]}
    assert set(by_name) == {keep, change}
    api.post(f"/proxies/{keep}/toxics", {"type": "latency"})
    again = api.post(
        "/populate",
        [
            {"name": keep, "upstream": echo, "listen": by_name[keep]["listen"]},
            {"name": change, "upstream": "127.0.0.1:1", "listen": "127.0.0.1:0"},
        ],
    )
    assert again.status_code == 201
    assert api.get(f"/proxies/{keep}/toxics").json() != []  # left alone
    assert api.get(f"/proxies/{change}").json()["upstream"] == "127.0.0.1:1"  # replaced
    _error(api.post("/populate", {"not": "a list"}), 400, "bad request body")


def test_delete_proxy_and_reset(api: Api, echo: str) -> None:
    a, b = api.create(echo), api.create(echo)
    api.post(f"/proxies/{a['name']}/toxics", {"type": "latency"})
    assert api.post(f"/proxies/{b['name']}", {"enabled": False}).json()["enabled"] is False
    response = api.post("/reset")
    assert response.status_code == 204
    assert api.get(f"/proxies/{a['name']}/toxics").json() == []
    assert api.get(f"/proxies/{b['name']}").json()["enabled"] is True
    response = api.delete(f"/proxies/{a['name']}")
    assert response.status_code == 204
    _error(api.delete(f"/proxies/{a['name']}"), 404, "proxy not found")


# ---------------------------------------------------------- toxiproxy-python


def test_python_client_full_cycle(api: Api, client: toxiproxy.Toxiproxy, echo: str) -> None:
    assert client.running()
    assert b"2." in client.version()
    name = api.name("py")
    proxy = client.create(upstream=echo, name=name)
    assert proxy.listen.startswith("127.0.0.1:") and not proxy.listen.endswith(":0")
    with pytest.raises(ProxyExists):
        client.create(upstream=echo, name=name)
    assert client.get_proxy(name).upstream == echo
    assert name in client.proxies()

    proxy.add_toxic(type="latency", attributes={"latency": 20})
    proxy.add_toxic(type="timeout", stream="upstream", name="t", attributes={"timeout": 0})
    assert set(proxy.toxics()) == {"latency_downstream", "t"}
    assert proxy.get_toxic("latency_downstream").attributes["latency"] == 20
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="bogus")
    with pytest.raises(ProxyExists):
        proxy.add_toxic(type="latency")
    assert proxy.destroy_toxic("t") is True
    with pytest.raises(NotFound):
        proxy.destroy_toxic("t")

    proxy.disable()
    assert client.get_proxy(name).enabled is False
    proxy.enable()
    assert client.get_proxy(name).enabled is True
    with proxy.down():
        assert client.get_proxy(name).enabled is False

    other = api.name("pop")
    made = client.populate([{"name": other, "upstream": echo, "listen": "127.0.0.1:0"}])
    assert [p.name for p in made] == [other]
    assert client.reset() is True
    assert proxy.toxics() == {}
    assert proxy.destroy() is True
    assert client.get_proxy(name) is None


# -------------------------------------------------------------- real traffic


def test_traffic_passes_and_latency_adds_delay(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    with _connect(proxy) as sock:
        _roundtrip(sock)  # connection up, no toxics
        base = f"/proxies/{proxy['name']}/toxics"
        api.post(base, {"type": "latency", "attributes": {"latency": 150}})
        assert _roundtrip(sock) >= 0.14  # applies to an already-open connection
        api.post(base, {"type": "latency", "name": "more", "attributes": {"latency": 100}})
        assert _roundtrip(sock) >= 0.24  # latency toxics add up
        api.delete(f"{base}/more")
        api.delete(f"{base}/latency_downstream")
        _roundtrip(sock)


def test_timeout_toxic_closes_connection(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    api.post(
        f"/proxies/{proxy['name']}/toxics", {"type": "timeout", "attributes": {"timeout": 200}}
    )
    with _connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"dropped")
        assert _read_until_closed(sock) == b""
        assert time.monotonic() - start >= 0.15


def test_removing_timeout_toxic_closes_affected_connections(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    base = f"/proxies/{proxy['name']}/toxics"
    api.post(base, {"type": "timeout", "attributes": {"timeout": 0}})
    with _connect(proxy) as sock:
        sock.sendall(b"held")
        time.sleep(0.1)
        api.delete(f"{base}/timeout_downstream")
        assert _read_until_closed(sock) == b""


def test_limit_data_closes_after_n_bytes(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    api.post(
        f"/proxies/{proxy['name']}/toxics", {"type": "limit_data", "attributes": {"bytes": 10}}
    )
    with _connect(proxy) as sock:
        sock.sendall(b"0123456789abcdefghij")
        assert _read_until_closed(sock) == b"0123456789"


def test_reset_peer_resets_connection(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    api.post(
        f"/proxies/{proxy['name']}/toxics", {"type": "reset_peer", "attributes": {"timeout": 50}}
    )
    with _connect(proxy) as sock:
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while True:
                sock.sendall(b"x")
                if not sock.recv(100):
                    raise AssertionError("closed with FIN, expected RST")


def test_disable_refuses_and_closes_then_reenable_rebinds(api: Api, echo: str) -> None:
    proxy = api.create(echo)
    with _connect(proxy) as live:
        _roundtrip(live)
        response = api.post(f"/proxies/{proxy['name']}", {"enabled": False})
        assert response.status_code == 200 and response.json()["enabled"] is False
        assert _read_until_closed(live) == b""
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    again = api.post(f"/proxies/{proxy['name']}", {"enabled": True}).json()
    assert again["listen"] == proxy["listen"]
    with _connect(proxy) as sock:
        _roundtrip(sock)


# ------------------------------------------------------ UDP (our extension)


def _udp_exchange(port: int, count: int, wait: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for i in range(count):
            sock.sendto(b"d%03d" % i, ("127.0.0.1", port))
        sock.settimeout(wait)
        got = 0
        try:
            while got < count:
                sock.recvfrom(2048)
                got += 1
        except TimeoutError:
            pass
        return got


def test_udp_proxy_echo_and_packet_loss(ours: Api, udp_echo: str) -> None:
    proxy = ours.create(udp_echo, "udp", protocol="udp")
    assert proxy["protocol"] == "udp"
    port = _port(proxy)
    assert _udp_exchange(port, 20, 1.0) == 20
    base = f"/proxies/{proxy['name']}/toxics"
    response = ours.post(base, {"type": "packet_loss", "attributes": {"loss_rate": 1.0}})
    assert response.status_code == 200
    assert response.json()["attributes"] == {"loss_rate": 1.0, "correlation": 0}
    assert _udp_exchange(port, 20, 0.3) == 0
    ours.post(f"{base}/packet_loss_downstream", {"attributes": {"loss_rate": 0}})
    assert _udp_exchange(port, 20, 1.0) == 20
    _error(ours.post(base, {"type": "limit_data"}), 400, "invalid toxic type")


def test_udp_latency_and_blackhole(ours: Api, udp_echo: str) -> None:
    proxy = ours.create(udp_echo, "udp", protocol="udp")
    port = _port(proxy)
    base = f"/proxies/{proxy['name']}/toxics"
    ours.post(base, {"type": "latency", "attributes": {"latency": 100}})
    start = time.monotonic()
    assert _udp_exchange(port, 1, 2.0) == 1
    assert time.monotonic() - start >= 0.09
    ours.post(f"/proxies/{proxy['name']}", {"enabled": False})
    assert _udp_exchange(port, 5, 0.3) == 0
    ours.post("/proxies/" + str(proxy["name"]), {"enabled": True})
    ours.delete(f"{base}/latency_downstream")
    assert _udp_exchange(port, 5, 1.0) == 5
