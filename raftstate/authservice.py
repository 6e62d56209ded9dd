"""The ``raftstate.v1.AuthService`` service: issue and revoke bearer tokens (admin only).

IssueToken signs claims with this node's first token key (every node holds
the same key file, so any node can issue and every node verifies); nothing
is written to the log, a token is valid by its signature alone. RevokeToken
commits a ``RevokeToken`` control entry through Raft: once applied on a
node, that node refuses the token (``DeviceTable.revoked``). The role check
itself happens in front of the handler (raftstate/rpcguard.py).
"""

from __future__ import annotations

import base64
import re
import secrets
import time

import grpc

from raftstate.authz import MAX_TTL_S, TOKEN_ID_BYTES, Role, sign_token, token_id_of
from raftstate.errors import FailedPrecondition, InvalidArgument
from raftstate.server import NodeServices, _unary
from raftstate.statemachine import encode_revoke
from raftstate.v1 import auth_pb2, auth_pb2_grpc

_HEX_ID = re.compile(rf"[0-9a-f]{{{2 * TOKEN_ID_BYTES}}}")


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, node: NodeServices, token_keys: dict[str, bytes]) -> None:
        self.node = node
        self._keys = token_keys

    @_unary
    async def IssueToken(  # noqa: N802 - gRPC method name
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        if not self._keys:
            raise FailedPrecondition("token_key_file: not set on this node; tokens are disabled")
        if not 0 < request.ttl_s <= MAX_TTL_S:
            raise InvalidArgument("ttl_s", f"must be between 1 and {MAX_TTL_S} seconds")
        if int(request.role) not in tuple(Role):
            raise InvalidArgument("role", "must be device, gateway, operator or admin")
        now_s = int(time.time())
        claims = auth_pb2.TokenClaims(
            role=request.role,
            token_id=secrets.token_bytes(TOKEN_ID_BYTES),
            issued_at_s=now_s,
            expires_at_s=now_s + request.ttl_s,
            device_ids=list(request.device_ids),
            prefix=request.prefix,
            name=request.name,
        )
        kid, key = next(iter(self._keys.items()))
        token = sign_token(claims, kid, key)
        return auth_pb2.IssueTokenResponse(
            token=token, token_id=claims.token_id.hex(), expires_at_s=claims.expires_at_s
        )

    @_unary
    async def RevokeToken(  # noqa: N802
        self, request: auth_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeTokenResponse:
        text = request.token.strip()
        now_s = int(time.time())
        if _HEX_ID.fullmatch(text):
            token_id, expires = bytes.fromhex(text), now_s + MAX_TTL_S
        else:
            token_id = bytes.fromhex(token_id_of(text))
            expires = _expiry_of(text, now_s + MAX_TTL_S)
        command = encode_revoke(token_id, expires, now_s * 1000)
        res = await self.node.propose_control(command, self.node.budget(context), "revocation")
        return auth_pb2.RevokeTokenResponse(
            token_id=token_id.hex(), already_revoked=not res.changed, revision=res.revision
        )


def _expiry_of(token: str, default: int) -> int:
    """The expiry a (pasted, unverified) token claims, or ``default``; the
    revocation is kept until then, so never less than a minute from now."""
    try:
        body = token.split(".")[2]
        claims = auth_pb2.TokenClaims.FromString(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
    except Exception:
        return default
    return max(claims.expires_at_s, int(time.time()) + 60) if claims.expires_at_s else default


__all__ = ["AuthService"]
