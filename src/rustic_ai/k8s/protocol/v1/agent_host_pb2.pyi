from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_STARTING: _ClassVar[AgentState]
    AGENT_STATE_RUNNING: _ClassVar[AgentState]
    AGENT_STATE_RESTARTING: _ClassVar[AgentState]
    AGENT_STATE_FAILED: _ClassVar[AgentState]
    AGENT_STATE_STOPPING: _ClassVar[AgentState]
    AGENT_STATE_STOPPED: _ClassVar[AgentState]

class HostState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOST_STATE_UNSPECIFIED: _ClassVar[HostState]
    HOST_STATE_STARTING: _ClassVar[HostState]
    HOST_STATE_SERVING: _ClassVar[HostState]
    HOST_STATE_DRAINING: _ClassVar[HostState]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_STARTING: AgentState
AGENT_STATE_RUNNING: AgentState
AGENT_STATE_RESTARTING: AgentState
AGENT_STATE_FAILED: AgentState
AGENT_STATE_STOPPING: AgentState
AGENT_STATE_STOPPED: AgentState
HOST_STATE_UNSPECIFIED: HostState
HOST_STATE_STARTING: HostState
HOST_STATE_SERVING: HostState
HOST_STATE_DRAINING: HostState

class CreateAgentRequest(_message.Message):
    __slots__ = ("guild_spec_json", "agent_spec_json", "messaging_config_json", "machine_id", "client_type", "client_properties_json", "organization_id", "default_topic", "restart_policy_json", "placement_json")
    GUILD_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    AGENT_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PROPERTIES_JSON_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOPIC_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    guild_spec_json: bytes
    agent_spec_json: bytes
    messaging_config_json: bytes
    machine_id: int
    client_type: str
    client_properties_json: bytes
    organization_id: str
    default_topic: str
    restart_policy_json: bytes
    placement_json: bytes
    def __init__(self, guild_spec_json: _Optional[bytes] = ..., agent_spec_json: _Optional[bytes] = ..., messaging_config_json: _Optional[bytes] = ..., machine_id: _Optional[int] = ..., client_type: _Optional[str] = ..., client_properties_json: _Optional[bytes] = ..., organization_id: _Optional[str] = ..., default_topic: _Optional[str] = ..., restart_policy_json: _Optional[bytes] = ..., placement_json: _Optional[bytes] = ...) -> None: ...

class CreateAgentResponse(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: AgentInfo
    def __init__(self, agent: _Optional[_Union[AgentInfo, _Mapping]] = ...) -> None: ...

class StopAgentRequest(_message.Message):
    __slots__ = ("guild_id", "agent_id")
    GUILD_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    guild_id: str
    agent_id: str
    def __init__(self, guild_id: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class StopAgentResponse(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: AgentInfo
    def __init__(self, agent: _Optional[_Union[AgentInfo, _Mapping]] = ...) -> None: ...

class GetAgentInfoRequest(_message.Message):
    __slots__ = ("guild_id", "agent_id", "output_lines")
    GUILD_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LINES_FIELD_NUMBER: _ClassVar[int]
    guild_id: str
    agent_id: str
    output_lines: int
    def __init__(self, guild_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., output_lines: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("guild_id",)
    GUILD_ID_FIELD_NUMBER: _ClassVar[int]
    guild_id: str
    def __init__(self, guild_id: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("guild_id", "agent_id", "name", "class_name", "agent_spec_json", "host_address", "pid", "state", "has_exit_code", "exit_code", "started_at", "restarts", "reason", "output", "allocation_json")
    GUILD_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    HOST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_JSON_FIELD_NUMBER: _ClassVar[int]
    guild_id: str
    agent_id: str
    name: str
    class_name: str
    agent_spec_json: bytes
    host_address: str
    pid: int
    state: AgentState
    has_exit_code: bool
    exit_code: int
    started_at: float
    restarts: int
    reason: str
    output: _containers.RepeatedScalarFieldContainer[str]
    allocation_json: bytes
    def __init__(self, guild_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., name: _Optional[str] = ..., class_name: _Optional[str] = ..., agent_spec_json: _Optional[bytes] = ..., host_address: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[_Union[AgentState, str]] = ..., has_exit_code: _Optional[bool] = ..., exit_code: _Optional[int] = ..., started_at: _Optional[float] = ..., restarts: _Optional[int] = ..., reason: _Optional[str] = ..., output: _Optional[_Iterable[str]] = ..., allocation_json: _Optional[bytes] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("hold_for", "hold_lease_expires_ms")
    HOLD_FOR_FIELD_NUMBER: _ClassVar[int]
    HOLD_LEASE_EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    hold_for: str
    hold_lease_expires_ms: int
    def __init__(self, hold_for: _Optional[str] = ..., hold_lease_expires_ms: _Optional[int] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("host_name", "address", "agents_running", "capacity", "state", "version", "started_at", "hold_granted_s", "inventory_json", "usage_json", "labels_json")
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    HOLD_GRANTED_S_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    USAGE_JSON_FIELD_NUMBER: _ClassVar[int]
    LABELS_JSON_FIELD_NUMBER: _ClassVar[int]
    host_name: str
    address: str
    agents_running: int
    capacity: int
    state: HostState
    version: str
    started_at: float
    hold_granted_s: float
    inventory_json: bytes
    usage_json: bytes
    labels_json: bytes
    def __init__(self, host_name: _Optional[str] = ..., address: _Optional[str] = ..., agents_running: _Optional[int] = ..., capacity: _Optional[int] = ..., state: _Optional[_Union[HostState, str]] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., hold_granted_s: _Optional[float] = ..., inventory_json: _Optional[bytes] = ..., usage_json: _Optional[bytes] = ..., labels_json: _Optional[bytes] = ...) -> None: ...
