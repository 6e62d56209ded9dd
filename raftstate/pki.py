"""A private certificate authority for a raftstate cluster (files, no network).

``raftstate cluster up`` and ``LocalCluster(secure=True)`` call
:func:`make_cluster_pki`: it creates, in one directory,

* ``ca.pem`` / ``ca.key``: a self-signed CA (EC P-256, 10 years, path length 0);
* ``<node>.pem`` / ``<node>.key`` per node: a server certificate with the
  SANs the node is reached by (``127.0.0.1`` and ``localhost`` by default);
* ``admin.pem`` / ``admin.key``: an mTLS client certificate whose URI SAN is
  ``raftstate://admin/root`` (:mod:`raftstate.authz` reads identities from it);
* ``token.key``: the cluster's token key (:func:`raftstate.authz.new_token_key`).

Private keys are written 0600 from the first byte (``os.open`` with the
mode, never chmod after writing). Bring your own CA: any CA works, as long as
node certificates carry the names clients dial and client certificates carry
one ``raftstate://`` URI SAN (docs/operating.md, "Security").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftstate.authz import format_token_keys, new_token_key

CA_DAYS = 3650
LEAF_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate and its private key, as file paths."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ClusterPki:
    """What :func:`make_cluster_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    nodes: dict[str, CertPair]
    admin: CertPair
    token_key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from creation on (replacing
    any file there)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raftstate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    common_name: str = "raftstate cluster CA", now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA certificate and its key."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    uri: str = "",
    days: int = LEAF_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA: a server certificate when
    ``hosts`` (IP addresses or DNS names) are given, a client certificate
    carrying the identity ``uri`` (a ``raftstate://`` URI) otherwise."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertPair:
    """Write ``<stem>.pem`` (0644) and ``<stem>.key`` (0600) into ``directory``."""
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    write_private(pair.key, _key_pem(key))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read a CA written by :func:`make_cluster_pki`."""
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key}: not an EC private key")
    return cert, key


def make_cluster_pki(
    directory: Path, node_ids: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS
) -> ClusterPki:
    """Create a CA, one server certificate per node, an admin client
    certificate and a token key in ``directory`` (created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    ca_pair = write_pair(directory, "ca", ca, ca_key)
    nodes = {}
    for node_id in node_ids:
        cert, key = issue_cert(ca, ca_key, f"raftstate node {node_id}", hosts=hosts)
        nodes[node_id] = write_pair(directory, node_id, cert, key)
    cert, key = issue_cert(ca, ca_key, "raftstate admin", uri="raftstate://admin/root")
    admin = write_pair(directory, "admin", cert, key)
    token_key = directory / "token.key"
    write_private(token_key, format_token_keys({"k1": new_token_key()}).encode())
    return ClusterPki(ca_pair.cert, ca_pair.key, nodes, admin, token_key)


def issue_client_pair(pki: ClusterPki, directory: Path, stem: str, uri: str) -> CertPair:
    """Sign a client certificate for identity ``uri`` with the cluster CA."""
    ca, ca_key = load_ca(pki.ca_cert, pki.ca_key)
    cert, key = issue_cert(ca, ca_key, stem, uri=uri)
    return write_pair(directory, stem, cert, key)


__all__ = [
    "CertPair",
    "ClusterPki",
    "issue_cert",
    "issue_client_pair",
    "load_ca",
    "make_ca",
    "make_cluster_pki",
    "write_pair",
    "write_private",
]
