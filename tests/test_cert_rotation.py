"""Certificates are reloaded without a restart, under load, with no failed heartbeat."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from cryptography import x509

from cluster.local import LocalCluster, wait_until
from raftstate import pki as pkilib
from raftstate.config import NodeConfig
from raftstate.sdk import AsyncDeviceClient


def served_serial(endpoint: str, ca: Path) -> int:
    """The serial number of the certificate a node presents to a new connection."""
    host, port = endpoint.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def rotate(c: LocalCluster, node_id: str) -> int:
    """Issue a new certificate for the node from the same CA and replace its
    files (key first, each by rename); return the new serial."""
    assert c.pki is not None
    ca, ca_key = pkilib.load_ca(c.pki.ca_cert, c.pki.ca_key)
    cert, key = pkilib.issue_cert(
        ca, ca_key, f"rotated {node_id}", hosts=("127.0.0.1", "localhost")
    )
    staged = pkilib.write_pair(c.base_dir, f"staged-{node_id}", cert, key)
    pair = c.pki.nodes[node_id]
    staged.key.replace(pair.key)
    staged.cert.replace(pair.cert)
    return int(cert.serial_number)


def test_rotated_certificates_are_served_to_new_connections_with_no_failed_heartbeat(
    tmp_path: Path,
) -> None:
    c = LocalCluster(tmp_path, 3, base_config=NodeConfig.for_tests(), secure=True)
    c.start()
    try:
        assert c.pki is not None
        ca = c.pki.ca_cert
        old = {n: served_serial(node.endpoint, ca) for n, node in c.nodes.items()}
        stop = asyncio.Event()
        counts = {"ok": 0, "fresh_ok": 0}

        async def steady() -> None:  # one long-lived client
            async with AsyncDeviceClient(c.endpoints, **c.client_kwargs()) as client:
                while not stop.is_set():
                    await client.heartbeat("steady", {"n": str(counts["ok"])}, deadline_s=5)
                    counts["ok"] += 1

        async def fresh() -> None:  # a new connection (new handshake) per heartbeat
            while not stop.is_set():
                async with AsyncDeviceClient(c.endpoints, **c.client_kwargs()) as client:
                    await client.heartbeat("fresh", {}, deadline_s=5)
                counts["fresh_ok"] += 1

        async def main() -> dict[str, int]:
            tasks = [asyncio.create_task(steady()), asyncio.create_task(fresh())]
            await asyncio.sleep(0.5)
            new = {n: await asyncio.to_thread(rotate, c, n) for n in c.nodes}
            for n, node in c.nodes.items():
                await asyncio.to_thread(
                    wait_until,
                    lambda e=node.endpoint, s=new[n]: served_serial(e, ca) == s,
                    10,
                    f"{n} to serve its new certificate",
                )
            before = dict(counts)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)  # a failed heartbeat raises here
            assert counts["ok"] > before["ok"] and counts["fresh_ok"] > before["fresh_ok"]
            return new

        new = asyncio.run(main())
        assert all(new[n] != old[n] for n in c.nodes)
        for node in c.nodes.values():  # reloaded in place: the same processes, never restarted
            assert node.running()
            assert "TLS certificate files changed" in node.log_path.read_text()
        assert counts["ok"] > 10 and counts["fresh_ok"] > 3, counts
    finally:
        c.stop()
