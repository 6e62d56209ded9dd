"""``raftstate auth issue|revoke``: bearer tokens, through the admin API.

Both need admin credentials (``RAFTSTATE_CA`` + ``RAFTSTATE_TOKEN`` or
``RAFTSTATE_CERT``/``RAFTSTATE_KEY``, as ``raftstate cluster up`` prints, or
the client flags of :mod:`raftstate.cli.clientflags`).
``issue`` prints the token on stdout (and its id and expiry on stderr), so
``TOKEN=$(raftstate auth issue ...)`` works; ``revoke`` takes the token id or
the whole token and returns once the revocation is committed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc

from raftstate.authz import MAX_TTL_S, Role, parse_ttl
from raftstate.cli.clientflags import add_client_flags
from raftstate.richstatus import decode_trailer
from raftstate.sdk.client import parse_endpoints
from raftstate.sdk.credentials import Credentials
from raftstate.v1 import auth_pb2, auth_pb2_grpc


def token_ttl(text: str) -> int:
    """``--ttl``: a duration (``3600``, ``45m``, ``12h``, ``30d``) from 1 s to
    :data:`MAX_TTL_S`, in seconds; raises ``ArgumentTypeError`` otherwise."""
    try:
        seconds = parse_ttl(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not 0 < seconds <= MAX_TTL_S:
        raise argparse.ArgumentTypeError(
            f"must be from 1 second to {MAX_TTL_S // 86400}d, got {text.strip()!r}"
        )
    return seconds


def add_auth_parser(sub: Any) -> None:
    auth = sub.add_parser("auth", help="issue and revoke bearer tokens (admin)")
    add_client_flags(auth, outer=True)
    asub = auth.add_subparsers(dest="auth_cmd", required=True)
    issue = asub.add_parser("issue", help="print a new token")
    issue.add_argument(
        "--role",
        required=True,
        choices=[r.name.lower() for r in Role],
        help="device: its own id; gateway: --prefix or --device ids; operator; admin",
    )
    issue.add_argument("--device", action="append", default=[], help="device id (repeat: list)")
    issue.add_argument("--prefix", default="", help="gateway: every id with this prefix")
    issue.add_argument("--name", default="", help="operator/admin: who (shown in logs)")
    issue.add_argument(
        "--ttl",
        type=token_ttl,
        default=token_ttl("30d"),
        help=f"lifetime: 3600, 45m, 12h, 30d (default), at most {MAX_TTL_S // 86400}d",
    )
    revoke = asub.add_parser("revoke", help="revoke a token by id or whole token")
    revoke.add_argument("token", help="token id (hex, from issue) or the token itself")
    for p in (issue, revoke):
        add_client_flags(p, outer=False)


def _call(
    endpoints: str,
    deadline_s: float,
    creds: Credentials,
    fn: Callable[[auth_pb2_grpc.AuthServiceStub, Any], Any],
) -> Any:
    """Try each endpoint in turn until one answers (or the deadline)."""
    end = time.monotonic() + deadline_s
    last: grpc.RpcError | None = None
    while time.monotonic() < end:
        for endpoint in parse_endpoints(endpoints):
            with creds.channel(endpoint) as ch:
                try:
                    return fn(auth_pb2_grpc.AuthServiceStub(ch), creds.metadata())
                except grpc.RpcError as err:
                    last = err
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE,):
                        raise decode_trailer(
                            err.code(), err.details() or "", err.trailing_metadata()
                        ) from None
        time.sleep(0.2)
    assert last is not None
    raise decode_trailer(last.code(), last.details() or "", last.trailing_metadata())


def auth_main(args: argparse.Namespace, endpoints: str) -> int:
    from raftstate.errors import RaftStateError

    try:
        if args.auth_cmd == "issue":
            request = auth_pb2.IssueTokenRequest(
                role=auth_pb2.AuthRole.ValueType(int(Role[args.role.upper()])),
                device_ids=args.device,
                prefix=args.prefix,
                name=args.name,
                ttl_s=args.ttl,
            )
            res = _call(
                endpoints,
                args.deadline,
                args.credentials,
                lambda stub, md: stub.IssueToken(request, timeout=5, metadata=md),
            )
            expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(res.expires_at_s))
            print(f"token id {res.token_id}, expires {expires}", file=sys.stderr)
            print(res.token)
        else:
            request_r = auth_pb2.RevokeTokenRequest(token=args.token)
            res = _call(
                endpoints,
                args.deadline,
                args.credentials,
                lambda stub, md: stub.RevokeToken(request_r, timeout=5, metadata=md),
            )
            state = "was already revoked" if res.already_revoked else "revoked on every node"
            print(f"token {res.token_id} {state} (committed through the log)")
    except ValueError as err:
        print(f"raftstate auth {args.auth_cmd}: {err}", file=sys.stderr)
        return 2
    except RaftStateError as err:
        print(
            f"raftstate auth {args.auth_cmd}: {type(err).__name__}: {err.message}", file=sys.stderr
        )
        return 1
    return 0


__all__ = ["add_auth_parser", "auth_main"]
