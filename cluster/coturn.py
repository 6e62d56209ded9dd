"""coturn for the NAT lab: one ``turnserver`` (STUN RFC 8489, TURN RFC 8656) in a namespace.

It runs with generated long-term credentials, no TLS/DTLS/CLI, relay ports
:data:`RELAY_PORTS` and one range of addresses allowed as peers.
:meth:`Coturn.start` returns once it answers a STUN Binding request. Not
thread-safe.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import struct
import subprocess
import time
from pathlib import Path

__all__ = ["RELAY_PORTS", "STUN_PORT", "Coturn", "stun_answers"]

STUN_PORT = 3478
RELAY_PORTS = (49160, 49359)
"""coturn's relay port range, inclusive."""
_READY_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 3.0
_STUN_COOKIE = 0x2112A442


class Coturn:
    """A turnserver listening on ``listen_ip`` inside ``netns``; its files
    (log, user database, pid file) live in ``workdir``."""

    def __init__(
        self,
        netns: str,
        listen_ip: str,
        allowed_peers: ipaddress.IPv4Network,
        workdir: Path,
        *,
        username: str,
        password: str,
        realm: str,
    ) -> None:
        self.netns = netns
        self.listen_ip = listen_ip
        self.allowed_peers = allowed_peers
        self.workdir = workdir
        self.username = username
        self.password = password
        self.realm = realm
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "turnserver.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def argv(self) -> list[str]:
        lo, hi = RELAY_PORTS
        # -n: no /etc/turnserver.conf, whose denied-peer-ip lines (if a host has
        # them) would refuse the lab's private peers; allowed-peer-ip wins anyway.
        return [
            "ip", "netns", "exec", self.netns,
            "turnserver", "-n", "--no-tls", "--no-dtls", "--no-cli",
            "--listening-ip", self.listen_ip, "--listening-port", str(STUN_PORT),
            "--relay-ip", self.listen_ip, "--min-port", str(lo), "--max-port", str(hi),
            "--lt-cred-mech", "--realm", self.realm,
            "--user", f"{self.username}:{self.password}",
            "--allowed-peer-ip", f"{self.allowed_peers[0]}-{self.allowed_peers[-1]}",
            "--userdb", str(self.workdir / "turndb"),
            "--pidfile", str(self.workdir / "turnserver.pid"),
            "--log-file", "stdout",
        ]  # fmt: skip

    def start(self, *, probe_from: str, detach: bool = False) -> None:
        """Start it and wait until it answers STUN sent from ``probe_from`` (an
        address of this namespace). ``detach``: its own session. Raises
        ``RuntimeError`` with the log's error lines if it exits or does not
        answer within 10 s (it is stopped then)."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=detach,
            )  # fmt: skip
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not stun_answers(probe_from, (self.listen_ip, STUN_PORT), timeout_s=0.1):
            code = self._proc.poll()
            if code is not None or time.monotonic() >= deadline:
                lines = self.log_path.read_text(errors="replace").splitlines()
                notes = [ln for ln in lines if re.search("error|unrecognized", ln, re.I)]
                tail = "\n".join(notes[:10] or lines[-20:])
                self.stop()
                state = f"exited with status {code}" if code is not None else "did not answer"
                raise RuntimeError(f"turnserver {state}; its log says:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 3 s. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stun_answers(local_ip: str, server: tuple[str, int], timeout_s: float) -> bool:
    """Whether ``server`` answers one STUN Binding request (RFC 8489 section 5)
    sent from ``local_ip`` within ``timeout_s``."""
    txid = secrets.token_bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((local_ip, 0))
        sock.settimeout(timeout_s)
        sock.sendto(struct.pack("!HHI12s", 0x0001, 0, _STUN_COOKIE, txid), server)
        try:
            data = sock.recv(2048)
        except OSError:
            return False
    return data[:2] == b"\x01\x01" and data[8:20] == txid
