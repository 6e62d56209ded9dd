"""Measure the chaos proxy's own cost on loopback: ``python -m chaos.proxy.bench``.

Starts the proxy as a subprocess, echo servers (TCP and UDP) in this process,
and times small request/response round trips directly and through a proxy
with no toxics. Prints p50/p99 round-trip times, the added latency, and the
proxy process's CPU time per forwarded chunk/datagram (read from
``/proc/<pid>/stat``, so Linux only). Saves the numbers as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tcp_echo() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


def _udp_echo() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(65536)
                sock.sendto(data, addr)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return sock, int(sock.getsockname()[1])


def _tcp_rtts(port: int, count: int, size: int) -> list[float]:
    payload = b"x" * size
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < size:
                got += len(sock.recv(65536))
            out.append(time.perf_counter() - start)
        return out


def _udp_rtts(port: int, count: int, size: int) -> list[float]:
    payload = b"x" * size
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(1.0)
        out = []
        for _ in range(count):
            start = time.perf_counter()
            sock.send(payload)
            sock.recv(65536)
            out.append(time.perf_counter() - start)
        return out


def _post(url: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"User-Agent": "bench"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, object] = json.load(response)
        return result


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def _measure(
    label: str,
    rtt: Callable[[int, int, int], list[float]],
    direct_port: int,
    proxy_port: int,
    pid: int,
    count: int,
) -> dict[str, float]:
    rtt(direct_port, 200, 64)  # warm up
    rtt(proxy_port, 200, 64)
    direct = rtt(direct_port, count, 64)
    cpu0 = _cpu_s(pid)
    proxied = rtt(proxy_port, count, 64)
    cpu = _cpu_s(pid) - cpu0
    row = {
        "direct_p50_us": _pct(direct, 0.5),
        "direct_p99_us": _pct(direct, 0.99),
        "proxy_p50_us": _pct(proxied, 0.5),
        "proxy_p99_us": _pct(proxied, 0.99),
        "added_p50_us": _pct(proxied, 0.5) - _pct(direct, 0.5),
        "added_p99_us": _pct(proxied, 0.99) - _pct(direct, 0.99),
        "cpu_us_per_chunk": cpu * 1e6 / (2 * count),  # each round trip = 2 chunks
        "mean_proxy_us": statistics.fmean(proxied) * 1e6,
    }
    print(
        f"{label:<4} direct p50 {row['direct_p50_us']:7.1f} p99 {row['direct_p99_us']:7.1f} | "
        f"proxy p50 {row['proxy_p50_us']:7.1f} p99 {row['proxy_p99_us']:7.1f} | "
        f"added p50 {row['added_p50_us']:6.1f} p99 {row['added_p99_us']:6.1f} µs | "
        f"proxy CPU {row['cpu_us_per_chunk']:5.1f} µs/chunk"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=5000, help="round trips per case")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos.proxy", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            print("proxy did not start within 15 s", file=sys.stderr)
            return 1
        api = "http://" + line.rsplit(" ", 1)[1].strip()
        tcp_server, tcp_port = _tcp_echo()
        udp_server, udp_port = _udp_echo()
        tcp_proxy = _post(
            api + "/proxies",
            {"name": "bench_tcp", "upstream": f"127.0.0.1:{tcp_port}", "listen": "127.0.0.1:0"},
        )
        udp_proxy = _post(
            api + "/proxies",
            {
                "name": "bench_udp",
                "upstream": f"127.0.0.1:{udp_port}",
                "listen": "127.0.0.1:0",
                "protocol": "udp",
            },
        )
        results = {
            "tcp": _measure(
                "tcp",
                _tcp_rtts,
                tcp_port,
                int(str(tcp_proxy["listen"]).rsplit(":", 1)[1]),
                proc.pid,
                args.count,
            ),
            "udp": _measure(
                "udp",
                _udp_rtts,
                udp_port,
                int(str(udp_proxy["listen"]).rsplit(":", 1)[1]),
                proc.pid,
                args.count,
            ),
        }
        tcp_server.close()
        udp_server.close()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        print(f"{args.count} round trips of 64 B per case; proxy overhead measured")
        return 0
    finally:
        proc.terminate()
        proc.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
