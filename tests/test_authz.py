"""The sans-IO authorization rules, token format and identity URIs (raftstate/authz.py)."""

from __future__ import annotations

import pytest

from raftstate import snapshotfile
from raftstate.authz import (
    Access,
    Identity,
    Role,
    authorize,
    format_token_keys,
    identity_from_sans,
    identity_uri,
    method_access,
    parse_identity_uri,
    parse_token_keys,
    parse_ttl,
    sign_token,
    token_id_of,
    verify_token,
)
from raftstate.errors import InvalidArgument, PermissionDenied, Unauthenticated
from raftstate.statemachine import DeviceTable, encode_delete, encode_revoke
from raftstate.v1 import auth_pb2

KEY = b"k" * 32
KEYS = {"k1": KEY}
NOW = 1_800_000_000
D = "/raftstate.v1.DeviceStateService/"
HB, STREAM, GET, LIST, DELETE = (
    D + m for m in ("Heartbeat", "HeartbeatStream", "GetDevice", "ListDevices", "DeleteDevice")
)
STATUS = "/raftstate.v1.ClusterService/Status"
ISSUE, REVOKE = "/raftstate.v1.AuthService/IssueToken", "/raftstate.v1.AuthService/RevokeToken"


def claims(role: Role = Role.DEVICE, **kw: object) -> auth_pb2.TokenClaims:
    values: dict[str, object] = {
        "role": int(role),
        "token_id": b"\x01" * 8,
        "issued_at_s": NOW,
        "expires_at_s": NOW + 60,
    }
    if role is Role.DEVICE:
        values["device_ids"] = ["pump-17"]
    values.update(kw)
    return auth_pb2.TokenClaims(**values)  # type: ignore[arg-type]


def token(role: Role = Role.DEVICE, **kw: object) -> str:
    return sign_token(claims(role, **kw), "k1", KEY)


# ---- tokens -------------------------------------------------------------------


def test_a_signed_token_verifies_to_its_claims() -> None:
    ident = verify_token(token(), NOW, KEYS)
    assert ident == Identity(Role.DEVICE, "", frozenset({"pump-17"}), "", "01" * 8, NOW + 60)


def test_a_token_is_compact() -> None:
    assert len(token()) < 100


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # tag
        lambda t: t.replace("rst1.", "rst2."),
        lambda t: t.replace(".k1.", ".k9."),  # unknown key id
        lambda t: t + ".x",
        lambda t: "",
        lambda t: "Bearer",
        lambda t: t.split(".")[0] + "." + t.split(".")[1] + ".!!!." + t.split(".")[3],
        lambda t: "rst1.k1." + "A" * 9000 + ".AAAA",
    ],
)
def test_a_malformed_or_forged_token_is_unauthenticated(mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Unauthenticated):
        verify_token(mangle(token()), NOW, KEYS)


def test_changed_claims_break_the_signature() -> None:
    good = token()
    forged_body = sign_token(claims(device_ids=["pump-18"]), "k1", KEY).split(".")[2]
    parts = good.split(".")
    with pytest.raises(Unauthenticated, match="signature"):
        verify_token(".".join([parts[0], parts[1], forged_body, parts[3]]), NOW, KEYS)


def test_a_token_signed_with_another_key_is_refused() -> None:
    other = sign_token(claims(), "k1", b"o" * 32)
    with pytest.raises(Unauthenticated, match="signature"):
        verify_token(other, NOW, KEYS)


def test_expiry_is_exclusive() -> None:
    verify_token(token(), NOW + 59, KEYS)
    with pytest.raises(Unauthenticated, match="expired"):
        verify_token(token(), NOW + 60, KEYS)


def test_a_revoked_token_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="revoked"):
        verify_token(token(), NOW, KEYS, {b"\x01" * 8: NOW + 60})
    verify_token(token(), NOW, KEYS, {b"\x02" * 8: NOW + 60})


def test_rotated_keys_all_verify() -> None:
    t2 = sign_token(claims(), "k2", b"2" * 32)
    keys = {"k2": b"2" * 32, "k1": KEY}
    assert verify_token(t2, NOW, keys).role is Role.DEVICE
    assert verify_token(token(), NOW, keys).role is Role.DEVICE


@pytest.mark.parametrize(
    ("role", "kw"),
    [
        (Role.DEVICE, {"device_ids": []}),
        (Role.DEVICE, {"device_ids": ["a", "b"]}),
        (Role.DEVICE, {"device_ids": ["a"], "prefix": "x"}),
        (Role.GATEWAY, {}),
        (Role.GATEWAY, {"prefix": "site-", "device_ids": ["a"]}),
        (Role.GATEWAY, {"device_ids": ["bad id"]}),
        (Role.OPERATOR, {"device_ids": ["a"]}),
        (Role.ADMIN, {"name": "no spaces please"}),
        (Role.DEVICE, {"token_id": b"short"}),
    ],
)
def test_claims_that_describe_no_usable_credential_are_not_signed(
    role: Role, kw: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgument):
        token(role, **kw)


def test_token_id_of_reads_a_pasted_token() -> None:
    assert token_id_of(token()) == "01" * 8
    with pytest.raises(InvalidArgument):
        token_id_of("not-a-token")


def test_token_key_file_round_trip_and_refusals() -> None:
    keys = {"k1": KEY, "k2": b"2" * 32}
    assert parse_token_keys(format_token_keys(keys)) == keys
    assert list(parse_token_keys(format_token_keys(keys))) == ["k1", "k2"]  # first signs
    for bad in ("", "k1 c2hvcnQ=\n", "k1 !!!\n", "bad/id " + "A" * 44 + "\n"):
        with pytest.raises(ValueError):
            parse_token_keys(bad)


def test_parse_ttl() -> None:
    assert [parse_ttl(t) for t in ("90", "45m", "12h", "30d")] == [90, 2700, 43200, 2592000]
    with pytest.raises(ValueError):
        parse_ttl("soon")


# ---- identity URIs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "identity"),
    [
        ("raftstate://device/pump-17", Identity(Role.DEVICE, "pump-17", frozenset({"pump-17"}))),
        ("raftstate://gateway/prefix/site-3-", Identity(Role.GATEWAY, "site-3-", prefix="site-3-")),
        (
            "raftstate://gateway/ids/a,b",
            Identity(Role.GATEWAY, "a,b", device_ids=frozenset({"a", "b"})),
        ),
        ("raftstate://operator/alice", Identity(Role.OPERATOR, "alice")),
        ("raftstate://admin/root", Identity(Role.ADMIN, "root")),
    ],
)
def test_identity_uris_round_trip(uri: str, identity: Identity) -> None:
    assert parse_identity_uri(uri) == identity
    assert identity_uri(identity) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "https://device/pump-17",
        "raftstate://device/",
        "raftstate://device/a/b",
        "raftstate://device/bad id",
        "raftstate://gateway/pump",
        "raftstate://gateway/prefix/",
        "raftstate://superuser/x",
        "raftstate://admin/",
    ],
)
def test_malformed_identity_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_identity_uri(uri)


def test_a_certificate_needs_exactly_one_raftstate_uri() -> None:
    assert identity_from_sans(["127.0.0.1", "raftstate://admin/root"]).role is Role.ADMIN
    with pytest.raises(Unauthenticated):
        identity_from_sans(["localhost"])
    with pytest.raises(Unauthenticated):
        identity_from_sans(["raftstate://admin/root", "raftstate://device/x"])
    with pytest.raises(Unauthenticated):
        identity_from_sans(["raftstate://nobody/x"])


# ---- authorization ------------------------------------------------------------

DEVICE = Identity(Role.DEVICE, "pump-17", frozenset({"pump-17"}))
GW_PREFIX = Identity(Role.GATEWAY, prefix="site-3-")
GW_LIST = Identity(Role.GATEWAY, device_ids=frozenset({"a", "b"}))
OPERATOR = Identity(Role.OPERATOR, "alice")
ADMIN = Identity(Role.ADMIN, "root")
ALL_METHODS = (HB, STREAM, GET, LIST, DELETE, STATUS, ISSUE, REVOKE)

# identity, device id -> the methods it may call
ALLOWED = [
    (DEVICE, "pump-17", {HB, STREAM, GET}),
    (DEVICE, "pump-18", set()),
    (GW_PREFIX, "site-3-x", {HB, STREAM, GET}),
    (GW_PREFIX, "site-4-x", set()),
    (GW_LIST, "b", {HB, STREAM, GET}),
    (GW_LIST, "c", set()),
    (OPERATOR, "any", {GET, LIST, DELETE, STATUS}),
    (ADMIN, "any", set(ALL_METHODS)),
]


@pytest.mark.parametrize(("identity", "device_id", "allowed"), ALLOWED)
def test_the_role_matrix(identity: Identity, device_id: str, allowed: set[str]) -> None:
    for method in ALL_METHODS:
        ids = [] if method in (LIST, STATUS, ISSUE, REVOKE) else [device_id]
        if method in allowed:
            authorize(identity, method, ids)
        else:
            with pytest.raises(PermissionDenied):
                authorize(identity, method, ids)


def test_every_id_of_a_request_must_be_in_scope() -> None:
    with pytest.raises(PermissionDenied, match="'c'"):
        authorize(GW_LIST, HB, ["a", "c"])


def test_health_is_public_and_unknown_methods_are_admin_only() -> None:
    assert method_access("/grpc.health.v1.Health/Check") is Access.PUBLIC
    assert method_access("/raftstate.v1.Something/New") is Access.ADMIN
    with pytest.raises(PermissionDenied):
        authorize(OPERATOR, "/raftstate.v1.Something/New", [])
    authorize(DEVICE, "/grpc.health.v1.Health/Watch", [])


# ---- revocations and deletes in the state machine -----------------------------


def test_revocations_are_kept_until_the_token_expires_and_survive_snapshots() -> None:
    t = DeviceTable()
    assert t.apply_control(encode_revoke(b"\x01" * 8, NOW + 10, NOW * 1000)).changed
    assert not t.apply_control(encode_revoke(b"\x01" * 8, NOW + 10, NOW * 1000)).changed
    u = DeviceTable()
    u.install(snapshotfile.copy_table(t))
    assert u.revoked == {b"\x01" * 8: NOW + 10} and u.digest() == t.digest()
    # An unrelated control entry after the expiry forgets it, on every node alike.
    t.apply_control(encode_delete("nobody", (NOW + 11) * 1000))
    assert t.revoked == {}


def test_delete_removes_the_record_bumps_the_revision_and_is_idempotent() -> None:
    from raftstate.model import Heartbeat
    from raftstate.statemachine import encode_batch

    t = DeviceTable()
    t.apply(encode_batch([Heartbeat("a", 5, {"k": "v"}, 0), Heartbeat("b", 1, {}, 0)], 1))
    res = t.apply_control(encode_delete("a", 2))
    assert (res.changed, res.revision, res.deleted and res.deleted.seq) == (True, 3, 5)
    assert t.get("a") is None and len(t) == 1 and [d.device_id for d in t.list().devices] == ["b"]
    again = t.apply_control(encode_delete("a", 3))
    assert (again.changed, again.revision) == (False, 3)
    # A later heartbeat creates it anew, whatever its seq.
    t.apply(encode_batch([Heartbeat("a", 1, {}, 0)], 4))
    assert t.get("a") is not None and t.revision == 4


def test_the_token_cache_still_checks_expiry_and_revocation_on_every_hit() -> None:
    from raftstate.authz import TokenCache

    cache = TokenCache(KEYS, max_entries=2)
    t = token()
    assert cache.verify(t, NOW, {}).role is Role.DEVICE
    assert cache.verify(t, NOW, {}).role is Role.DEVICE  # a hit
    with pytest.raises(Unauthenticated, match="revoked"):
        cache.verify(t, NOW, {b"\x01" * 8: NOW + 60})
    with pytest.raises(Unauthenticated, match="expired"):
        cache.verify(t, NOW + 60, {})
    with pytest.raises(Unauthenticated, match="signature"):
        cache.verify(t[:-2] + "AA", NOW, {})
    for i in range(5):  # bounded
        cache.verify(sign_token(claims(token_id=bytes([i]) * 8), "k1", KEY), NOW, {})
    assert len(cache._seen) == 2
