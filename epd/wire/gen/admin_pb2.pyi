from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatsRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class RoleStats(_message.Message):
    __slots__ = ("role", "instance_id", "state", "inflight", "load", "capacity")
    class LoadEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CapacityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    role: str
    instance_id: str
    state: str
    inflight: int
    load: _containers.ScalarMap[str, float]
    capacity: _containers.ScalarMap[str, int]
    def __init__(self, role: _Optional[str] = ..., instance_id: _Optional[str] = ..., state: _Optional[str] = ..., inflight: _Optional[int] = ..., load: _Optional[_Mapping[str, float]] = ..., capacity: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("pid", "roles")
    PID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    roles: _containers.RepeatedCompositeFieldContainer[RoleStats]
    def __init__(self, pid: _Optional[int] = ..., roles: _Optional[_Iterable[_Union[RoleStats, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("role", "timeout_s")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    role: str
    timeout_s: float
    def __init__(self, role: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("roles",)
    ROLES_FIELD_NUMBER: _ClassVar[int]
    roles: _containers.RepeatedCompositeFieldContainer[RoleStats]
    def __init__(self, roles: _Optional[_Iterable[_Union[RoleStats, _Mapping]]] = ...) -> None: ...

class SwitchRoleRequest(_message.Message):
    __slots__ = ("from_role", "to_role", "timeout_s")
    FROM_ROLE_FIELD_NUMBER: _ClassVar[int]
    TO_ROLE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    from_role: str
    to_role: str
    timeout_s: float
    def __init__(self, from_role: _Optional[str] = ..., to_role: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SwitchRoleReply(_message.Message):
    __slots__ = ("ok", "message", "instance_id", "offload_s", "migrate_s", "onload_s", "weights_reused", "roles")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_S_FIELD_NUMBER: _ClassVar[int]
    ONLOAD_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_REUSED_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    instance_id: str
    offload_s: float
    migrate_s: float
    onload_s: float
    weights_reused: bool
    roles: _containers.RepeatedCompositeFieldContainer[RoleStats]
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., instance_id: _Optional[str] = ..., offload_s: _Optional[float] = ..., migrate_s: _Optional[float] = ..., onload_s: _Optional[float] = ..., weights_reused: _Optional[bool] = ..., roles: _Optional[_Iterable[_Union[RoleStats, _Mapping]]] = ...) -> None: ...
