"""Authentication at the gRPC edge: TLS credentials and caller identities.

Theory of operation
-------------------
The I/O half of :mod:`raftstate.authz` (which holds the rules):

1. :func:`server_credentials` builds the TLS credentials of a listening
   port with ``grpc.dynamic_ssl_server_credentials``: grpc calls
   :meth:`CertReloader.fetch` before each new handshake; it ``stat``s the
   certificate, key (and client CA) files and re-reads them only when one
   changed, so rotating certificates is "write the new files" (write the key
   first, then the certificate; each with a rename). Connections already
   open keep their session; new ones get the new certificate. A file that
   fails to load keeps the previous configuration (and is logged).
2. :meth:`Authenticator.authenticate` runs in :mod:`raftstate.rpcguard`
   before the request bytes are decoded: a bearer token in the
   ``authorization`` metadata (``Bearer rst1....``) is verified against the
   token keys and the replicated revocation set
   (``DeviceTable.revoked``); otherwise the client certificate's URI SAN
   (present only on the ``grpc_mtls_listen`` port, where TLS required and
   verified it against ``client_ca_file``) names the identity. Neither:
   ``Unauthenticated``.
3. The identity is kept in :data:`CURRENT_IDENTITY` (a context variable, so
   handler tasks and the stream reader task see it) for the per-message
   authorization of streams.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from raftstate.authz import Identity, TokenCache, identity_from_sans, parse_token_keys
from raftstate.config import NodeConfig
from raftstate.errors import ConfigError, Unauthenticated

log = logging.getLogger("raftstate.authn")

AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "

#: The identity the current RPC authenticated as (None: auth is off).
CURRENT_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "raftstate_identity", default=None
)


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class CertReloader:
    """Serves grpc's certificate-configuration fetcher from files that may
    change. Thread-safe enough for grpc's calls (one assignment per change)."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p)
        self._cert_file = cert_file
        self._key_file = key_file
        self._ca_file = client_ca_file
        self._seen: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0
        self.initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            sig = _signature(self._paths)
            key = Path(self._key_file).read_bytes()
            cert = Path(self._cert_file).read_bytes()
            ca = Path(self._ca_file).read_bytes() if self._ca_file else None
        except OSError as exc:
            raise ConfigError(f"tls_cert_file: cannot read TLS files: {exc}") from None
        if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
            raise ConfigError(
                f"tls_key_file: {self._key_file} / tls_cert_file: {self._cert_file} "
                "must be PEM (a private key and a certificate chain)"
            )
        self._seen = sig
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher: a new configuration when a file changed, else ``None``."""
        try:
            if _signature(self._paths) == self._seen:
                return None
            config = self._load()
        except (OSError, ConfigError) as exc:
            log.warning("TLS files changed but cannot be loaded (keeping the old ones): %s", exc)
            return None
        self.reloads += 1
        log.info("TLS certificate files changed; new connections use the new ones")
        return config


def server_credentials(
    cfg: NodeConfig, *, mtls: bool
) -> tuple[grpc.ServerCredentials, CertReloader]:
    """TLS credentials for one port: server authentication only (tokens), or
    with a required, verified client certificate (``mtls``)."""
    reloader = CertReloader(cfg.tls_cert_file, cfg.tls_key_file, cfg.client_ca_file if mtls else "")
    creds = grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader.fetch, require_client_authentication=mtls
    )
    return creds, reloader


def load_token_keys(path: str) -> dict[str, bytes]:
    """The token keys in ``path``; ``{}`` when no file is configured. Raises
    ``ConfigError``."""
    if not path:
        return {}
    try:
        return parse_token_keys(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"token_key_file: cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"token_key_file: {path}: {exc}") from None


def bearer_token(metadata: object) -> str | None:
    """The token of an ``authorization: Bearer ...`` entry, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == AUTHORIZATION_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text[len(BEARER) :].strip() if text.startswith(BEARER) else text.strip()
    return None


class Authenticator:
    """Who is calling. ``revoked`` returns the current revocation set (the
    state machine's, replaced atomically on apply). Event-loop only."""

    def __init__(
        self,
        token_keys: Mapping[str, bytes],
        revoked: Callable[[], Mapping[bytes, int]],
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self._keys = dict(token_keys)
        self._tokens = TokenCache(self._keys)
        self._revoked = revoked
        self._clock_s = clock_s

    def authenticate(self, context: grpc.aio.ServicerContext) -> Identity:
        """The caller's identity. Raises ``Unauthenticated`` (module docstring)."""
        token = bearer_token(context.invocation_metadata())
        sans = () if token else context.auth_context().get("x509_subject_alternative_name")
        return self.identify(token, [s.decode(errors="replace") for s in sans or ()])

    def identify(self, token: str | None, uri_sans: list[str]) -> Identity:
        """The identity of a bearer ``token`` or, without one, of a verified
        client certificate's URI SANs (also for ``/metrics``). Raises
        ``Unauthenticated``."""
        if token is not None:
            if not self._keys:
                raise Unauthenticated("bearer tokens are not enabled on this node")
            return self._tokens.verify(token, int(self._clock_s()), self._revoked())
        if uri_sans:
            return identity_from_sans(uri_sans)
        raise Unauthenticated(
            "no credential: send `authorization: Bearer <token>` or connect with a client "
            "certificate to the mTLS port (see `raftstate auth issue`)"
        )


__all__ = [
    "AUTHORIZATION_KEY",
    "CURRENT_IDENTITY",
    "Authenticator",
    "CertReloader",
    "bearer_token",
    "load_token_keys",
    "server_credentials",
]
