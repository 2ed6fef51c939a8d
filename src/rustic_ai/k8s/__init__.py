"""rusticai-k8s: run a Rustic AI guild's agents across a fleet of agent hosts.

Public surface::

    from rustic_ai.k8s import AsyncK8sEngine, K8sExecutionEngine, EngineSettings, HostSettings

``Guild(..., execution_engine_clz="rustic_ai.k8s.K8sExecutionEngine")`` builds the
synchronous engine from the environment; async code uses ``AsyncK8sEngine`` directly.
"""

from .base.errors import (
    AgentAlreadyExistsError,
    AgentLaunchError,
    AgentNotFoundError,
    ConfigError,
    ForbiddenModuleError,
    GuildLimitError,
    HostFullError,
    HostUnavailableError,
    InsufficientResourcesError,
    InvalidSpecError,
    LaunchTimeoutError,
    NoHostAvailableError,
    NotAuthorizedError,
    PermanentError,
    RegistryUnavailableError,
    RusticK8sError,
    TemporaryError,
)
from .base.models import AgentKey, AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from .base.resources import PlacementPolicy
from .base.settings import EngineSettings, HostSettings
from .base.version import VERSION as __version__
from .engine import AsyncK8sEngine, K8sExecutionEngine

__all__ = [
    "AgentAlreadyExistsError",
    "AgentKey",
    "AgentLaunchError",
    "AgentNotFoundError",
    "AgentRecord",
    "AgentState",
    "AsyncK8sEngine",
    "ConfigError",
    "EngineSettings",
    "ForbiddenModuleError",
    "GuildLimitError",
    "HostFullError",
    "HostRecord",
    "HostSettings",
    "HostState",
    "HostUnavailableError",
    "InsufficientResourcesError",
    "InvalidSpecError",
    "K8sExecutionEngine",
    "LaunchRequest",
    "LaunchTimeoutError",
    "NoHostAvailableError",
    "NotAuthorizedError",
    "PermanentError",
    "PlacementPolicy",
    "RegistryUnavailableError",
    "RusticK8sError",
    "TemporaryError",
    "__version__",
]
