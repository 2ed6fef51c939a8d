"""`K8sExecutionEngine`: the drop-in rusticai-core ExecutionEngine.

rusticai-core's Guild builds engines from a class path with only ``guild_id`` and
``organization_id``, so everything else comes from the environment (EngineSettings:
RUSTIC_K8S_REDIS_URL, RUSTIC_K8S_DISCOVERY, RUSTIC_K8S_HOSTS, ...). Each method runs
the async engine's coroutine on the process's shared background loop and waits for it
with a deadline a little longer than the call's own.
"""

from __future__ import annotations

from typing import Any

from rustic_ai.core.guild.agent import Agent
from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.guild.execution.execution_engine import ExecutionEngine
from rustic_ai.core.messaging import Client, MessagingConfig, SimpleClient

from ..base.models import AgentRecord, HostRecord
from ..base.settings import EngineSettings
from .engine import AsyncK8sEngine
from .loop import run_sync

_MARGIN_S = 5.0


class K8sExecutionEngine(ExecutionEngine):
    def __init__(self, guild_id: str, organization_id: str, settings: EngineSettings | None = None) -> None:
        super().__init__(guild_id=guild_id, organization_id=organization_id)
        self.settings = settings or EngineSettings.from_env()
        self._call_s = self.settings.call_timeout_s * 3 + _MARGIN_S
        self._launch_s = (self.settings.launch_timeout_s * 2 + self.settings.call_timeout_s + _MARGIN_S
                          + self.settings.capacity_wait_s)  # a launch may wait that long for a host that fits
        self.engine = AsyncK8sEngine(self.settings, organization_id=organization_id)
        run_sync(self.engine.start(), self._call_s)

    def run_agent(
        self,
        guild_spec: GuildSpec,
        agent_spec: AgentSpec,
        messaging_config: MessagingConfig,
        machine_id: int,
        client_type: type[Client] = SimpleClient,
        client_properties: dict[str, Any] = {},  # noqa: B006 - the base class's signature
        default_topic: str = "default_topic",
    ) -> Agent | None:
        """Launches the agent on a host. Returns None: the agent lives in another process."""
        run_sync(
            self.engine.run_agent(
                guild_spec, agent_spec, messaging_config, machine_id, client_type, client_properties, default_topic
            ),
            self._launch_s,
        )
        return None

    def get_agents_in_guild(self, guild_id: str) -> dict[str, AgentSpec]:
        return run_sync(self.engine.get_agents_in_guild(guild_id), self._call_s)

    def find_agents_by_name(self, guild_id: str, agent_name: str) -> list[AgentSpec]:
        return run_sync(self.engine.find_agents_by_name(guild_id, agent_name), self._call_s)

    def is_agent_running(self, guild_id: str, agent_id: str) -> bool:
        return run_sync(self.engine.is_agent_running(guild_id, agent_id), self._call_s)

    def stop_agent(self, guild_id: str, agent_id: str) -> None:
        run_sync(self.engine.stop_agent(guild_id, agent_id), self._launch_s)

    def shutdown(self) -> None:
        run_sync(self.engine.shutdown(), self._launch_s)

    # Beyond the base interface: where things run.
    def list_agents(self, guild_id: str) -> list[AgentRecord]:
        return run_sync(self.engine.list_agents(guild_id), self._call_s)

    def hosts(self) -> list[HostRecord]:
        return run_sync(self.engine.hosts(), self._call_s)
