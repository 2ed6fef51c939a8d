"""Plain records shared by every layer: what an agent is, where it runs, how to launch it.

The protocol adapter converts protobuf messages to these at its edge and the registry
adapter stores them in Redis hashes, so neither grpc nor redis types leak past their
adapters. ``LaunchRequest`` is also what an agent process receives, as JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .resources import Free, HostInventory, Usage


class AgentState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class HostState(enum.StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclasses.dataclass(frozen=True, order=True)
class AgentKey:
    """Agents are named by guild and id: agent ids repeat across guilds."""

    guild_id: str
    agent_id: str

    def __str__(self) -> str:
        return f"{self.guild_id}/{self.agent_id}"


class LaunchRequest(BaseModel):
    """Everything an agent process needs to build its agent, as JSON-able data.

    The three specs are kept as plain JSON objects here; ``rustic_ai.k8s.base.specs``
    validates them with rusticai-core's own pydantic models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    guild_spec: dict[str, Any]
    agent_spec: dict[str, Any]
    messaging_config: dict[str, Any]
    machine_id: int = 0
    client_type: str = "rustic_ai.core.messaging.SimpleClient"
    client_properties: dict[str, Any] = Field(default_factory=dict)
    organization_id: str = ""
    default_topic: str = "default_topic"
    # A RestartPolicy as a dict; None = AgentSpec.qos.retry_count or the host's default.
    restart: dict[str, Any] | None = None
    # W3C trace context (traceparent, tracestate) of the call that launched the agent: the
    # agent process starts its build span under it. Filled by the host, never by engines.
    trace_context: dict[str, str] = Field(default_factory=dict)
    # Where the agent may run and how it relates to its guild (base/resources.py
    # PlacementPolicy.to_dict()); set by the engine, kept in the desired state, so a host
    # adopting the agent honours the selector too.
    placement: dict[str, Any] = Field(default_factory=dict)
    # CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES for the devices the registry granted the
    # agent. Filled by the host right before the launch; whatever an engine put here is replaced.
    device_env: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> AgentKey:
        return AgentKey(str(self.guild_spec.get("id", "")), str(self.agent_spec.get("id", "")))


@dataclasses.dataclass
class AgentRecord:
    """One agent as a host, the registry or the engine sees it."""

    guild_id: str
    agent_id: str
    name: str = ""
    class_name: str = ""
    spec_json: str = ""  # the full AgentSpec, as JSON
    host: str = ""  # advertised address of the host running it
    pid: int = 0
    state: AgentState = AgentState.STARTING
    started_at: float = 0.0
    restarts: int = 0
    reason: str = ""
    exit_code: int | None = None
    output: list[str] = dataclasses.field(default_factory=list)
    host_alive: bool = True  # registry reads: is the owning host's lease current?
    allocation: str = ""  # what the registry granted it on its host (base/resources.Allocation JSON); "" = a slot only

    @property
    def key(self) -> AgentKey:
        return AgentKey(self.guild_id, self.agent_id)

    @property
    def is_live(self) -> bool:
        """Running (or about to) on a host that is alive."""
        return self.host_alive and self.state in (AgentState.STARTING, AgentState.RUNNING, AgentState.RESTARTING)

    def spec_dict(self) -> dict[str, Any]:
        return json.loads(self.spec_json) if self.spec_json else {}


@dataclasses.dataclass
class HostRecord:
    """One agent host as it registered itself."""

    address: str
    name: str = ""
    capacity: int = 0
    agents: int = 0
    state: HostState = HostState.SERVING
    version: str = ""
    started_at: float = 0.0
    # Resources (base/resources.py): totals the host advertises, what its agents hold, its labels.
    inventory: HostInventory = dataclasses.field(default_factory=HostInventory)
    usage: Usage = dataclasses.field(default_factory=Usage)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def free(self) -> Free:
        """What is left of the inventory (computed once per record: a listing serves many placements)."""
        return Free.of(self.inventory, self.usage)

    @property
    def has_room(self) -> bool:
        return self.capacity <= 0 or self.agents < self.capacity

    @property
    def accepts_agents(self) -> bool:
        return self.state == HostState.SERVING and self.has_room
