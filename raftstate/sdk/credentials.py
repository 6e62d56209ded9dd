"""Client credentials for the SDK and CLI: TLS trust, client certificate, token.

A client talks to a secure node with TLS, trusting the cluster CA
(``ca``), and proves who it is with either a bearer token (``token``, sent
as ``authorization: Bearer ...`` on every call, on the node's ``grpc``
port) or a client certificate (``cert``/``key``, on the node's
``grpc_mtls_listen`` port). :meth:`Credentials.from_env` reads

    RAFTSTATE_CA, RAFTSTATE_TOKEN, RAFTSTATE_CERT, RAFTSTATE_KEY,
    RAFTSTATE_INSECURE=1 (plaintext, for clusters started with --insecure)

which is what ``raftstate cluster up`` prints. With none of them set the
client speaks plaintext (a loopback test cluster, ``NodeConfig.for_tests``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV_CA = "RAFTSTATE_CA"
ENV_TOKEN = "RAFTSTATE_TOKEN"
ENV_CERT = "RAFTSTATE_CERT"
ENV_KEY = "RAFTSTATE_KEY"
ENV_INSECURE = "RAFTSTATE_INSECURE"


@dataclass(frozen=True, slots=True)
class Credentials:
    """How to reach and authenticate to nodes. Paths or PEM bytes."""

    ca: str | bytes | None = None
    cert: str | bytes | None = None
    key: str | bytes | None = None
    token: str | None = None
    insecure: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        """Credentials from ``RAFTSTATE_*`` variables (module docstring)."""
        env = os.environ if environ is None else environ
        insecure = env.get(ENV_INSECURE, "").lower() in ("1", "true", "yes")
        return cls(
            ca=env.get(ENV_CA) or None,
            cert=env.get(ENV_CERT) or None,
            key=env.get(ENV_KEY) or None,
            token=env.get(ENV_TOKEN) or None,
            insecure=insecure,
        )

    @property
    def tls(self) -> bool:
        """Whether channels use TLS."""
        return not self.insecure and any((self.ca, self.cert, self.token))

    @property
    def uses_client_cert(self) -> bool:
        return self.cert is not None and self.token is None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata (the bearer token), empty without one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (raises ``ValueError`` for a cert without a key)."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("credentials: a client certificate needs its key (cert and key)")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )

    def aio_channel(
        self, endpoint: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``endpoint``: TLS when configured, else plaintext."""
        if self.tls:
            return grpc.aio.secure_channel(endpoint, self.channel_credentials(), options=options)
        return grpc.aio.insecure_channel(endpoint, options=options)

    def channel(self, endpoint: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to ``endpoint``: TLS when configured, else plaintext."""
        if self.tls:
            return grpc.secure_channel(endpoint, self.channel_credentials(), options=options)
        return grpc.insecure_channel(endpoint, options=options)


def _pem(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def resolve(
    credentials: Credentials | None,
    *,
    ca: str | bytes | None = None,
    cert: str | bytes | None = None,
    key: str | bytes | None = None,
    token: str | None = None,
) -> Credentials:
    """The constructor arguments' credentials: explicit values win, then
    ``credentials``, then the environment."""
    if any(v is not None for v in (ca, cert, key, token)):
        return Credentials(ca=ca, cert=cert, key=key, token=token)
    return credentials if credentials is not None else Credentials.from_env()


__all__ = ["Credentials", "resolve"]
