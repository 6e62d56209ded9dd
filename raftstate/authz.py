"""Identities, bearer tokens and the authorization rules: sans-IO.

Theory of operation
-------------------
A call is admitted in two steps (the I/O side is :mod:`raftstate.authn`):

1. **Authenticate**, before the request is decoded: the caller's identity
   comes either from its mTLS client certificate (TLS already verified the
   chain to the cluster CA; the identity is the certificate's single
   ``raftstate://`` URI SAN, :func:`parse_identity_uri`) or from a bearer
   token in the ``authorization`` metadata (:func:`verify_token`). No
   credential, a bad one, an expired one or a revoked one raises
   :class:`~raftstate.errors.Unauthenticated`.
2. **Authorize**, after decoding, with the device ids the request names:
   :func:`authorize` raises :class:`~raftstate.errors.PermissionDenied`
   when the role or scope does not cover the method or an id. Unknown
   methods are admin-only (default deny).

Requests that name many devices (``HeartbeatStream`` messages,
``HeartbeatBatch`` items) are authorized in two steps: the role against the
method once per call (an operator may not write heartbeats at all: the whole
call is PERMISSION_DENIED), then each device id against the credential's
scope (a device credential covers only its own id, a gateway its prefix or
id list, admin everything). An id outside the scope is refused on its own,
with a PERMISSION_DENIED result for that message or item, and the rest go
on, so a gateway whose scope lags its fleet by one device still delivers the
others. Nothing is written for a refused id.

Identity URIs (in a client certificate's SAN)::

    raftstate://device/<device id>
    raftstate://gateway/prefix/<prefix>
    raftstate://gateway/ids/<id>,<id>,...
    raftstate://operator/<name>
    raftstate://admin/<name>

Tokens are ``rst1.<kid>.<b64url(TokenClaims)>.<b64url(tag)>`` where the tag
is HMAC-SHA256 (truncated to 128 bits) over everything before the last dot,
keyed by the cluster token key ``kid``. Why HMAC and not Ed25519: the nodes
both issue (``Auth.IssueToken``) and verify tokens, so every verifier would
hold the signing key anyway and a public-key signature buys nothing; HMAC
verification costs about a microsecond against ~100 µs for Ed25519 (a
device sends its token on every call), and the tag is 22 characters instead
of 86. Keys rotate by id: every key in the key file verifies, the first one
signs. Revocation is by token id, committed through the Raft log
(:class:`~raftstate.statemachine.DeviceTable` keeps the set until the
token's own expiry).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from raftstate.errors import InvalidArgument, PermissionDenied, Unauthenticated
from raftstate.model import DEVICE_ID_MAX, DEVICE_ID_RE
from raftstate.v1 import auth_pb2

TOKEN_PREFIX = "rst1"
TAG_BYTES = 16
TOKEN_ID_BYTES = 8
#: Longest token accepted before any work is done on it.
TOKEN_MAX_CHARS = 8192
#: Longest TTL IssueToken grants.
MAX_TTL_S = 400 * 86400
URI_SCHEME = "raftstate://"
_KID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


class Role(enum.IntEnum):
    """What a credential may do (values match ``auth.proto`` ``AuthRole``)."""

    DEVICE = 1
    GATEWAY = 2
    OPERATOR = 3
    ADMIN = 4


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. ``device_ids``/``prefix`` scope device and
    gateway roles; ``token_id`` is set for token credentials (hex)."""

    role: Role
    name: str = ""
    device_ids: frozenset[str] = frozenset()
    prefix: str = ""
    token_id: str = ""
    expires_at_s: int = 0

    def covers(self, device_id: str) -> bool:
        """Whether this identity's scope includes ``device_id``."""
        if self.role in (Role.OPERATOR, Role.ADMIN):
            return True
        if device_id in self.device_ids:
            return True
        return bool(self.prefix) and device_id.startswith(self.prefix)

    def describe(self) -> str:
        """A short label for logs (no secrets)."""
        what = self.name or self.prefix or ",".join(sorted(self.device_ids))
        via = f" token {self.token_id}" if self.token_id else " cert"
        return f"{self.role.name.lower()}/{what}{via}"


class Access(enum.Enum):
    """What a method needs."""

    PUBLIC = "public"  # no credential at all (health)
    AUTHENTICATED = "authenticated"  # any valid credential, any role (reflection)
    DEVICE_WRITE = "device-write"  # device/gateway in scope, or admin
    DEVICE_READ = "device-read"  # device/gateway in scope, operator, admin
    OPERATOR = "operator"  # operator or admin
    ADMIN = "admin"


DEVICE_SERVICE = "/raftstate.v1.DeviceStateService/"
CLUSTER_SERVICE = "/raftstate.v1.ClusterService/"
AUTH_SERVICE = "/raftstate.v1.AuthService/"
HEALTH_SERVICE = "/grpc.health.v1.Health/"
REFLECTION_SERVICE = "/grpc.reflection.v1alpha.ServerReflection/"
#: Not a gRPC method: an HTTP scrape of ``/metrics`` (raftstate/metricsserver.py).
METRICS_SCRAPE = "GET /metrics"

METHOD_ACCESS: dict[str, Access] = {
    DEVICE_SERVICE + "Heartbeat": Access.DEVICE_WRITE,
    DEVICE_SERVICE + "HeartbeatStream": Access.DEVICE_WRITE,
    DEVICE_SERVICE + "HeartbeatBatch": Access.DEVICE_WRITE,
    DEVICE_SERVICE + "GetDevice": Access.DEVICE_READ,
    DEVICE_SERVICE + "ListDevices": Access.OPERATOR,
    DEVICE_SERVICE + "DeleteDevice": Access.OPERATOR,
    DEVICE_SERVICE + "Watch": Access.OPERATOR,
    CLUSTER_SERVICE + "Status": Access.OPERATOR,
    AUTH_SERVICE + "IssueToken": Access.ADMIN,
    AUTH_SERVICE + "RevokeToken": Access.ADMIN,
    REFLECTION_SERVICE + "ServerReflectionInfo": Access.AUTHENTICATED,
    METRICS_SCRAPE: Access.OPERATOR,
}


def method_access(method: str) -> Access:
    """What ``method`` (``/package.Service/Method``) needs; health is public,
    anything unknown is admin-only."""
    if method.startswith(HEALTH_SERVICE):
        return Access.PUBLIC
    return METHOD_ACCESS.get(method, Access.ADMIN)


def authorize(identity: Identity, method: str, device_ids: Iterable[str] = ()) -> None:
    """Allow ``identity`` to call ``method`` on ``device_ids`` or raise
    ``PermissionDenied`` naming what is missing."""
    access = method_access(method)
    role = identity.role
    short = method.rsplit("/", 1)[-1]
    if access in (Access.PUBLIC, Access.AUTHENTICATED) or role is Role.ADMIN:
        return
    if access in (Access.OPERATOR, Access.ADMIN):
        if access is Access.OPERATOR and role is Role.OPERATOR:
            return
        need = "admin" if access is Access.ADMIN else "operator or admin"
        raise PermissionDenied(f"{short}: needs the {need} role; credential is {role.name.lower()}")
    if role is Role.OPERATOR:
        if access is Access.DEVICE_READ:
            return
        raise PermissionDenied(f"{short}: the operator role may not write heartbeats")
    for device_id in device_ids:
        if not identity.covers(device_id):
            raise PermissionDenied(
                f"{short}: device_id {device_id!r} is outside this {role.name.lower()} "
                "credential's scope"
            )


# ---- identity URIs ------------------------------------------------------------


def _device_id(value: str, where: str) -> str:
    if not value or len(value) > DEVICE_ID_MAX or DEVICE_ID_RE.fullmatch(value) is None:
        raise InvalidArgument(where, f"{value!r} is not a device id")
    return value


def parse_identity_uri(uri: str) -> Identity:
    """The identity a ``raftstate://`` URI names (module docstring). Raises
    ``InvalidArgument`` for anything else."""
    if not uri.startswith(URI_SCHEME):
        raise InvalidArgument("identity", f"{uri!r} is not a raftstate:// URI")
    parts = uri[len(URI_SCHEME) :].split("/")
    kind = parts[0]
    if kind == "device" and len(parts) == 2:
        device_id = _device_id(parts[1], "identity")
        return Identity(Role.DEVICE, device_id, frozenset({device_id}))
    if kind == "gateway" and len(parts) == 3 and parts[1] == "prefix":
        return Identity(Role.GATEWAY, parts[2], prefix=_device_id(parts[2], "identity"))
    if kind == "gateway" and len(parts) == 3 and parts[1] == "ids":
        ids = frozenset(_device_id(i, "identity") for i in parts[2].split(","))
        return Identity(Role.GATEWAY, parts[2], device_ids=ids)
    if kind in ("operator", "admin") and len(parts) == 2 and _NAME.fullmatch(parts[1]):
        return Identity(Role.OPERATOR if kind == "operator" else Role.ADMIN, parts[1])
    raise InvalidArgument("identity", f"{uri!r} does not name a device, gateway, operator or admin")


def identity_uri(identity: Identity) -> str:
    """The URI :func:`parse_identity_uri` reads back as ``identity``."""
    if identity.role is Role.DEVICE:
        return f"{URI_SCHEME}device/{next(iter(identity.device_ids))}"
    if identity.role is Role.GATEWAY:
        if identity.prefix:
            return f"{URI_SCHEME}gateway/prefix/{identity.prefix}"
        return f"{URI_SCHEME}gateway/ids/{','.join(sorted(identity.device_ids))}"
    return f"{URI_SCHEME}{identity.role.name.lower()}/{identity.name}"


def identity_from_sans(uris: Iterable[str]) -> Identity:
    """The identity of a client certificate from its URI SANs: exactly one
    must be a ``raftstate://`` URI. Raises ``Unauthenticated``."""
    ours = [u for u in uris if u.startswith(URI_SCHEME)]
    if len(ours) != 1:
        raise Unauthenticated(
            f"client certificate must carry exactly one raftstate:// URI SAN, has {len(ours)}"
        )
    try:
        return parse_identity_uri(ours[0])
    except InvalidArgument as err:
        raise Unauthenticated(f"client certificate: {err.problem}") from None


# ---- tokens -------------------------------------------------------------------


def new_token_key() -> bytes:
    """32 random bytes for a token key."""
    return secrets.token_bytes(32)


def format_token_keys(keys: Mapping[str, bytes]) -> str:
    """The token key file: one ``<kid> <base64 key>`` per line, the signing key first."""
    return "".join(f"{kid} {base64.b64encode(key).decode()}\n" for kid, key in keys.items())


def parse_token_keys(text: str) -> dict[str, bytes]:
    """Read a token key file (:func:`format_token_keys`). Raises ``ValueError``
    naming the line for a bad id, bad base64 or a key under 32 bytes."""
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, _, b64 = line.partition(" ")
        if not _KID.fullmatch(kid) or kid in keys:
            raise ValueError(f"line {n}: key id must be 1-16 of [A-Za-z0-9_-] and unique")
        try:
            key = base64.b64decode(b64.strip(), validate=True)
        except binascii.Error:
            raise ValueError(f"line {n}: key is not base64") from None
        if len(key) < 32:
            raise ValueError(f"line {n}: key must be at least 32 bytes")
        keys[kid] = key
    if not keys:
        raise ValueError("no keys")
    return keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tag(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode(), hashlib.sha256).digest()[:TAG_BYTES]


def validate_claims(claims: auth_pb2.TokenClaims) -> None:
    """Check that claims describe a usable credential. Raises ``InvalidArgument``."""
    role = int(claims.role)
    if role == Role.DEVICE:
        if len(claims.device_ids) != 1 or claims.prefix:
            raise InvalidArgument("device_ids", "a device credential names exactly one device id")
    elif role == Role.GATEWAY:
        if bool(claims.prefix) == bool(claims.device_ids):
            raise InvalidArgument("prefix", "a gateway credential has a prefix or a list of ids")
        if claims.prefix:
            _device_id(claims.prefix, "prefix")
    elif role in (Role.OPERATOR, Role.ADMIN):
        if claims.device_ids or claims.prefix:
            raise InvalidArgument("device_ids", "operator/admin credentials take no device scope")
        if claims.name and not _NAME.fullmatch(claims.name):
            raise InvalidArgument("name", "1-128 characters from [A-Za-z0-9._:@-]")
    else:
        raise InvalidArgument("role", "must be device, gateway, operator or admin")
    for device_id in claims.device_ids:
        _device_id(device_id, "device_ids")
    if len(claims.token_id) != TOKEN_ID_BYTES:
        raise InvalidArgument("token_id", f"must be {TOKEN_ID_BYTES} bytes")


def sign_token(claims: auth_pb2.TokenClaims, kid: str, key: bytes) -> str:
    """Encode and sign ``claims`` (validated first; raises ``InvalidArgument``)."""
    validate_claims(claims)
    signed = f"{TOKEN_PREFIX}.{kid}.{_b64(claims.SerializeToString())}"
    return f"{signed}.{_b64(_tag(key, signed))}"


def token_id_of(token: str) -> str:
    """The token id (hex) of a token, WITHOUT verifying it: for revoking a
    token by pasting it whole. Raises ``InvalidArgument``."""
    parts = token.split(".")
    try:
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            raise ValueError
        claims = auth_pb2.TokenClaims.FromString(_unb64(parts[2]))
    except Exception:
        raise InvalidArgument("token", "is not a raftstate token (rst1....)") from None
    if len(claims.token_id) != TOKEN_ID_BYTES:
        raise InvalidArgument("token", "carries no token id")
    return str(claims.token_id.hex())


def verify_token(
    token: str, now_s: int, keys: Mapping[str, bytes], revoked: Container[bytes] = frozenset()
) -> Identity:
    """The identity a valid token carries. Raises ``Unauthenticated`` for a
    malformed, unknown-key, forged, expired or revoked token. Pure: no clock
    (``now_s`` is Unix seconds), no I/O."""
    if len(token) > TOKEN_MAX_CHARS:
        raise Unauthenticated("token: too long")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        raise Unauthenticated("token: not a raftstate token (rst1.<kid>.<claims>.<tag>)")
    key = keys.get(parts[1])
    if key is None:
        raise Unauthenticated("token: signed with a key this cluster does not have")
    try:
        tag = _unb64(parts[3])
        body = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise Unauthenticated("token: not base64url") from None
    if not hmac.compare_digest(tag, _tag(key, token[: -len(parts[3]) - 1])):
        raise Unauthenticated("token: signature does not verify")
    try:  # authentic from here on: only our own issuer made these bytes
        claims = auth_pb2.TokenClaims.FromString(body)
        validate_claims(claims)
    except Exception:
        raise Unauthenticated("token: claims are malformed") from None
    if now_s >= claims.expires_at_s:
        raise Unauthenticated(f"token {claims.token_id.hex()}: expired")
    if claims.token_id in revoked:
        raise Unauthenticated(f"token {claims.token_id.hex()}: revoked")
    return Identity(
        Role(claims.role),
        claims.name,
        frozenset(claims.device_ids),
        claims.prefix,
        claims.token_id.hex(),
        claims.expires_at_s,
    )


class TokenCache:
    """Remembers tokens whose signature and claims verified, so a device
    that sends the same token on every call costs a dict lookup, not an
    HMAC and a decode. Expiry and revocation are still checked on every
    hit. At most ``max_entries`` tokens, oldest forgotten first. Not
    thread-safe (one per event loop)."""

    def __init__(self, keys: Mapping[str, bytes], max_entries: int = 4096) -> None:
        self._keys = dict(keys)
        self._max = max_entries
        self._seen: dict[str, Identity] = {}

    def verify(self, token: str, now_s: int, revoked: Container[bytes]) -> Identity:
        """As :func:`verify_token`, through the cache."""
        ident = self._seen.get(token)
        if ident is None:
            ident = verify_token(token, now_s, self._keys, revoked)
            if len(self._seen) >= self._max:
                del self._seen[next(iter(self._seen))]
            self._seen[token] = ident
            return ident
        if now_s >= ident.expires_at_s:
            del self._seen[token]
            raise Unauthenticated(f"token {ident.token_id}: expired")
        if bytes.fromhex(ident.token_id) in revoked:
            raise Unauthenticated(f"token {ident.token_id}: revoked")
        return ident


def parse_ttl(text: str) -> int:
    """Seconds in a TTL like ``90``, ``45m``, ``12h``, ``30d``. Raises ``ValueError``."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 3600, 45m, 12h or 30d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return int(m.group(1)) * scale


__all__ = [
    "Access",
    "Identity",
    "Role",
    "TokenCache",
    "authorize",
    "format_token_keys",
    "identity_from_sans",
    "identity_uri",
    "method_access",
    "new_token_key",
    "parse_identity_uri",
    "parse_token_keys",
    "parse_ttl",
    "sign_token",
    "token_id_of",
    "validate_claims",
    "verify_token",
]
