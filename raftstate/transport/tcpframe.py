"""Frame bodies of the TCP Raft transport (pure functions).

pysyncobj's ``TcpConnection`` wrote ``int32 length | Fernet(zlib(pickle(x)))``
where ``x`` was a message dict, a handshake value, or ``(rand_key, x)`` once
the connection's random key was exchanged. Its reader buffered whatever
length a peer announced, decompressed without a bound and unpickled.

Here a frame is ``u32 length (big-endian) | body``, the body Fernet-encrypted
when the cluster has a secret (pysyncobj's encryptor, unchanged), and the
plaintext body is::

    u8 flags      bit 0: a 32-byte connection key follows; other bits 0
    [32 bytes]    the key the *receiver* chose (pysyncobj's rand key: binds
                  each frame to this connection, so a recorded frame cannot be
                  replayed on another one)
    u8 kind       1 RAND_KEY: 32 bytes, the sender's own connection key
                  2 ADDRESS:  the sender's member address, UTF-8, <= 255 bytes
                  3 MESSAGE:  one :mod:`~raftstate.transport.wirecodec` message
    payload       to the end of the body

Nothing is compressed (no decompression bombs) and nothing is unpickled.
:func:`frame_length` refuses a length above :data:`MAX_FRAME_BYTES` from the
4-byte header alone, so a reader can close the connection before buffering
more than one receive's worth of an over-long frame.
"""

from __future__ import annotations

import hmac
import struct
from typing import Any

from raftstate.errors import DecodeError, EncodeError
from raftstate.transport import wirecodec

HEADER = struct.Struct("!I")
RAND_KEY_SIZE = 32
MAX_ADDRESS_BYTES = 255

RAND_KEY = 1
ADDRESS = 2
MESSAGE = 3
_FLAG_KEY = 0x01

#: Largest plaintext body.
MAX_BODY_BYTES = 2 + RAND_KEY_SIZE + wirecodec.MAX_MESSAGE_BYTES


def fernet_size(plain: int) -> int:
    """Length of a Fernet token for ``plain`` bytes: version, timestamp, IV,
    AES-CBC ciphertext (PKCS7-padded), HMAC, all URL-safe base64."""
    raw = 1 + 8 + 16 + (plain // 16 + 1) * 16 + 32
    return 4 * ((raw + 2) // 3)


#: Largest frame body on the wire (an encrypted :data:`MAX_BODY_BYTES`).
MAX_FRAME_BYTES = fernet_size(MAX_BODY_BYTES)

#: What a decoded body can be: a message dict, a connection key, an address.
Body = dict[str, Any] | bytes | str


def encode_body(value: Any, key: bytes | None) -> bytes:
    """Encode a message dict (MESSAGE), ``bytes`` (RAND_KEY, 32 bytes) or
    ``str`` (ADDRESS), prefixed with the receiver's connection ``key`` when
    one was exchanged. Raises ``EncodeError`` for anything else."""
    if key is None:
        head = b"\x00"
    elif isinstance(key, bytes) and len(key) == RAND_KEY_SIZE:
        head = b"\x01" + key
    else:
        raise EncodeError("connection key must be 32 bytes")
    if isinstance(value, dict):
        return head + bytes((MESSAGE,)) + wirecodec.encode(value)
    if isinstance(value, bytes):
        if len(value) != RAND_KEY_SIZE:
            raise EncodeError(f"a connection key is {RAND_KEY_SIZE} bytes, not {len(value)}")
        return head + bytes((RAND_KEY,)) + value
    if isinstance(value, str):
        raw = value.encode("utf-8")
        if len(raw) > MAX_ADDRESS_BYTES:
            raise EncodeError(f"a node address is at most {MAX_ADDRESS_BYTES} bytes")
        return head + bytes((ADDRESS,)) + raw
    raise EncodeError(f"cannot send a {type(value).__name__} over the TCP transport")


def decode_body(body: bytes, key: bytes | None) -> Body:
    """Decode a plaintext body. ``key``: the connection key this side chose
    (every body must then carry it), or ``None`` before the exchange (no body
    may carry one). Raises ``DecodeError`` and nothing else."""
    if not isinstance(body, bytes):
        raise DecodeError("frame body must be bytes")
    if len(body) > MAX_BODY_BYTES:
        raise DecodeError(f"frame body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    if not body:
        raise DecodeError("empty frame body")
    flags = body[0]
    pos = 1
    if flags == _FLAG_KEY:
        carried = body[pos : pos + RAND_KEY_SIZE]
        pos += RAND_KEY_SIZE
        if key is None or not hmac.compare_digest(carried, key):
            raise DecodeError("frame carries the wrong connection key")
    elif flags != 0 or key is not None:
        raise DecodeError("frame lacks the connection key" if flags == 0 else "bad frame flags")
    if pos >= len(body):
        raise DecodeError("frame body has no kind")
    kind = body[pos]
    payload = body[pos + 1 :]
    if kind == MESSAGE:
        return wirecodec.decode(payload)
    if kind == RAND_KEY:
        if len(payload) != RAND_KEY_SIZE:
            raise DecodeError(f"a connection key is {RAND_KEY_SIZE} bytes, not {len(payload)}")
        return payload
    if kind == ADDRESS:
        if len(payload) > MAX_ADDRESS_BYTES:
            raise DecodeError("node address too long")
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"node address is not UTF-8: {exc}") from None
    raise DecodeError(f"unknown frame kind {kind}")


def frame_length(header: bytes) -> int:
    """The body length a 4-byte frame header announces. Raises
    ``DecodeError`` when it exceeds :data:`MAX_FRAME_BYTES`."""
    if len(header) < HEADER.size:
        raise DecodeError("truncated frame header")
    (length,) = HEADER.unpack_from(header)
    if length > MAX_FRAME_BYTES:
        raise DecodeError(f"frame of {length} bytes announced; the limit is {MAX_FRAME_BYTES}")
    return int(length)


__all__ = [
    "HEADER",
    "MAX_BODY_BYTES",
    "MAX_FRAME_BYTES",
    "RAND_KEY_SIZE",
    "Body",
    "decode_body",
    "encode_body",
    "fernet_size",
    "frame_length",
]
