"""Per-node static keys for the UDP Raft transport.

Theory of operation
-------------------
Each node has a static X25519 key pair. The private key lives in the node's
``node_key_file`` (one line: 32 raw bytes, URL-safe base64 without padding),
a 0600 file no other user may read; every member's public key is listed in
``[peer_keys]`` of every node's config. The transport
(:class:`~raftstate.transport.crypto.NodeIdentity`) mixes
``X25519(own private, peer public)`` into the pair key that MACs HELLOs and
salts sessions, so only the two nodes of a pair can compute it: a process
holding the cluster secret but not n2's private key cannot speak as n2 (its
HELLOs fail the MAC and are counted as ``bad_mac``).

:func:`generate_key_pair` draws the private key from the OS CSPRNG;
:func:`write_key_file` writes it 0600 from the first byte
(:mod:`raftstate.privfile`); :func:`load_identity` reads and checks it for a
config. The TCP transport (pysyncobj) does not use these keys: its
encryption is Fernet under the cluster secret only, so config validation
refuses node keys with ``transport = "tcp"``.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from raftstate.errors import ConfigError
from raftstate.privfile import write_private

if TYPE_CHECKING:
    from raftstate.config import NodeConfig
    from raftstate.transport.crypto import NodeIdentity

KEY_SIZE = 32


def encode_key(raw: bytes) -> str:
    """32 raw key bytes as URL-safe base64 without padding (43 characters)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_key(field: str, text: str) -> bytes:
    """The 32 raw bytes of an encoded key. Raises :class:`ConfigError` naming
    ``field`` if it is not URL-safe base64 of 32 bytes."""
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_SIZE:
        raise ConfigError(f"{field}: must be a 32-byte key in URL-safe base64 (43 characters)")
    return raw


def generate_key_pair() -> tuple[str, str]:
    """A fresh ``(private, public)`` pair, both encoded."""
    private = X25519PrivateKey.generate()
    return (
        encode_key(private.private_bytes_raw()),
        encode_key(private.public_key().public_bytes_raw()),
    )


def public_key_of(private_encoded: str) -> str:
    """The encoded public key for an encoded private key."""
    raw = decode_key("node_key_file", private_encoded)
    return encode_key(X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw())


def write_key_file(path: str | os.PathLike[str], private_encoded: str) -> None:
    """Write a node key file, 0600 from its first byte."""
    write_private(path, private_encoded + "\n")


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The raw private key in ``path``. Raises :class:`ConfigError` naming
    ``node_key_file`` if it is missing, unreadable, readable by group or
    others, or not a key."""
    p = Path(path)
    try:
        st = os.stat(p)
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"node_key_file: cannot read {p}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"node_key_file: {p} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); run chmod 600 {p}"
        )
    return decode_key("node_key_file", text)


def load_identity(cfg: NodeConfig) -> NodeIdentity | None:
    """The transport identity ``cfg`` describes, or ``None`` without
    ``node_key_file``. Raises :class:`ConfigError` if the key file is bad or
    this node's own ``peer_keys`` entry does not match its private key."""
    from raftstate.transport.crypto import NodeIdentity

    if not cfg.node_key_file:
        return None
    private = read_key_file(cfg.node_key_file)
    own = cfg.peer_keys.get(cfg.node_id)
    public = NodeIdentity.public_key_of(private)
    if own is not None and decode_key(f"peer_keys[{cfg.node_id}]", own) != public:
        raise ConfigError(
            f"peer_keys[{cfg.node_id}]: does not match the key in node_key_file {cfg.node_key_file}"
        )
    peers = {
        member: decode_key(f"peer_keys[{member}]", key)
        for member, key in cfg.peer_keys.items()
        if member != cfg.node_id
    }
    return NodeIdentity(private, peers)


__all__ = [
    "decode_key",
    "encode_key",
    "generate_key_pair",
    "load_identity",
    "public_key_of",
    "read_key_file",
    "write_key_file",
]
