"""`K8sExecutionEngine`: the drop-in rusticai-core ExecutionEngine.

rusticai-core's Guild builds engines from a class path with only ``guild_id`` and
``organization_id``, so everything else comes from the environment (EngineSettings:
RUSTIC_K8S_REDIS_URL, RUSTIC_K8S_DISCOVERY, RUSTIC_K8S_HOSTS, ...). Each method runs
the async engine's coroutine on the process's shared background loop and waits for it
with a deadline a little longer than the call's own.

A Guild builds one engine per guild, so the facades of a process share one AsyncK8sEngine
per settings (shared.py: connections, channels, what it knows of the hosts); each facade
keeps the set of agents it launched, and its ``shutdown`` stops those, as rusticai-core's
engines do.
"""

from __future__ import annotations

import logging
from typing import Any

from rustic_ai.core.guild.agent import Agent
from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.guild.execution.execution_engine import ExecutionEngine
from rustic_ai.core.messaging import Client, MessagingConfig, SimpleClient

from ..base.errors import AgentAlreadyExistsError, HostUnavailableError
from ..base.models import AgentKey, AgentRecord, HostRecord
from ..base.settings import EngineSettings
from .engine import manager_agent_id
from .loop import run_sync
from .shared import shared_engine

log = logging.getLogger(__name__)

_MARGIN_S = 5.0
log = logging.getLogger(__name__)


class K8sExecutionEngine(ExecutionEngine):
    def __init__(self, guild_id: str, organization_id: str, settings: EngineSettings | None = None) -> None:
        super().__init__(guild_id=guild_id, organization_id=organization_id)
        self.settings = settings or EngineSettings.from_env()
        self._call_s = self.settings.call_timeout_s * 3 + _MARGIN_S
        self._launch_s = (self.settings.launch_timeout_s * 2 + self.settings.call_timeout_s + _MARGIN_S
                          + self.settings.capacity_wait_s)  # a launch may wait that long for a host that fits
        self.engine = shared_engine(self.settings, organization_id, self._call_s)
        self._owned: set[AgentKey] = set()  # launched by this facade: its shutdown stops them
        self._closed = False
        # A dropped facade (rusticai-api keeps no Guild it creates, a failed bootstrap drops
        # its own) leaves its agents running and holds no connection of its own to close.

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
        """Launches the agent on a host. Returns None: the agent lives in another process.

        An agent that already runs (ALREADY_EXISTS) is not an error here: rusticai-core's
        Guild asks is_agent_running first and means "make sure it runs", and between its
        question and the launch another host may have claimed the agent — e.g. adopted it
        from a dead host while that host's guild manager, adopted too, reloads its guild.
        """
        self._check_open()
        try:
            run_sync(
                self.engine.run_agent(
                    guild_spec, agent_spec, messaging_config, machine_id, client_type, client_properties, default_topic
                ),
                self._launch_s,
            )
        except AgentAlreadyExistsError as exc:
            log.info("run_agent: %s/%s already runs: %s", guild_spec.id, agent_spec.id, exc)
        self._owned.add(AgentKey(guild_spec.id, agent_spec.id))
        return None

    def get_agents_in_guild(self, guild_id: str) -> dict[str, AgentSpec]:
        return run_sync(self.engine.get_agents_in_guild(guild_id), self._call_s)

    def find_agents_by_name(self, guild_id: str, agent_name: str) -> list[AgentSpec]:
        return run_sync(self.engine.find_agents_by_name(guild_id, agent_name), self._call_s)

    def is_agent_running(self, guild_id: str, agent_id: str) -> bool:
        return run_sync(self.engine.is_agent_running(guild_id, agent_id), self._call_s)

    def stop_agent(self, guild_id: str, agent_id: str) -> None:
        self._check_open()
        run_sync(self.engine.stop_agent(guild_id, agent_id), self._launch_s)
        self._owned.discard(AgentKey(guild_id, agent_id))

    def shutdown(self) -> None:
        """Stops the agents this facade launched — and, for a guild manager among them
        (GuildBuilder.bootstrap), the rest of its guild, which the manager launched through an
        engine of its own. Idempotent; the shared engine stays up for others."""
        if self._closed:
            return
        self._closed = True
        owned, self._owned = sorted(self._owned, key=str), set()
        if owned:
            run_sync(self._stop(owned), self._launch_s * 2)

    async def _stop(self, keys: list[AgentKey]) -> None:
        await self.engine.stop_all(keys)  # managers first, so none launches more meanwhile
        for guild_id in sorted({k.guild_id for k in keys if k.agent_id == manager_agent_id(k.guild_id)}):
            await self.engine.stop_rest_of_guild(guild_id)

    def _check_open(self) -> None:
        if self._closed:
            raise HostUnavailableError("engine is shut down")

    # Beyond the base interface: where things run.
    def list_agents(self, guild_id: str) -> list[AgentRecord]:
        return run_sync(self.engine.list_agents(guild_id), self._call_s)

    def hosts(self) -> list[HostRecord]:
        return run_sync(self.engine.hosts(), self._call_s)

