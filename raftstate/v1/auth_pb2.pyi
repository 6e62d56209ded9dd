from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUTH_ROLE_UNSPECIFIED: _ClassVar[AuthRole]
    AUTH_ROLE_DEVICE: _ClassVar[AuthRole]
    AUTH_ROLE_GATEWAY: _ClassVar[AuthRole]
    AUTH_ROLE_OPERATOR: _ClassVar[AuthRole]
    AUTH_ROLE_ADMIN: _ClassVar[AuthRole]
AUTH_ROLE_UNSPECIFIED: AuthRole
AUTH_ROLE_DEVICE: AuthRole
AUTH_ROLE_GATEWAY: AuthRole
AUTH_ROLE_OPERATOR: AuthRole
AUTH_ROLE_ADMIN: AuthRole

class TokenClaims(_message.Message):
    __slots__ = ("role", "token_id", "issued_at_s", "expires_at_s", "device_ids", "prefix", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: AuthRole
    token_id: bytes
    issued_at_s: int
    expires_at_s: int
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    name: str
    def __init__(self, role: _Optional[_Union[AuthRole, str]] = ..., token_id: _Optional[bytes] = ..., issued_at_s: _Optional[int] = ..., expires_at_s: _Optional[int] = ..., device_ids: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("role", "device_ids", "prefix", "name", "ttl_s")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    role: AuthRole
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    name: str
    ttl_s: int
    def __init__(self, role: _Optional[_Union[AuthRole, str]] = ..., device_ids: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., name: _Optional[str] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("token", "token_id", "expires_at_s")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_S_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expires_at_s: int
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at_s: _Optional[int] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("token_id", "already_revoked", "revision")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    already_revoked: bool
    revision: int
    def __init__(self, token_id: _Optional[str] = ..., already_revoked: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...
