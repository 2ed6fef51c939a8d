"""Talk to remote agents over the guild's real messaging backend (Redis or NATS).

A `Probe` is a local rusticai agent (rusticai-testing's LocalTestAgent) that joins a
guild through rusticai-core's SyncExecutionEngine, publishes on the default topic and
captures what remote agents answer. ResponderProbeAgent answers "Hello Responder!" with
"Acknowledged: <message id>".
"""

from __future__ import annotations

import uuid

from rustic_ai.core.guild.builders import AgentBuilder, GuildBuilder
from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.guild.guild import Guild
from rustic_ai.core.messaging import MessagingConfig
from rustic_ai.testing.execution.integration_agents import (
    InitiatorProbeAgent,
    LocalTestAgent,
    ResponderProbeAgent,
)

SYNC_ENGINE = "rustic_ai.core.guild.execution.sync.sync_exec_engine.SyncExecutionEngine"


def redis_messaging(port: int) -> MessagingConfig:
    return MessagingConfig(
        backend_module="rustic_ai.redis.messaging.backend",
        backend_class="RedisMessagingBackend",
        backend_config={"redis_client": {"host": "127.0.0.1", "port": port}},
    )


def nats_messaging(url: str) -> MessagingConfig:
    """rusticai-nats: ``backend_config`` is its NATSBackendConfig (servers, auth, TLS, TTL, retries)."""
    return MessagingConfig(
        backend_module="rustic_ai.nats.messaging.backend",
        backend_class="NATSMessagingBackend",
        backend_config={"nats_client": {"servers": [url]}},
    )


def close_nats_event_loops(monkeypatch) -> None:
    """rusticai-nats 1.4 runs each backend's client on an event loop of its own and, on cleanup,
    stops that loop without closing it; in a long test process the loop and its self-pipe are
    collected later as ResourceWarnings (errors here) blamed on whichever test runs then. For the
    current test, cleanup also closes the stopped loop. Agent processes exit and need nothing."""
    from rustic_ai.nats.messaging.connection_manager import NATSConnectionManager

    original = NATSConnectionManager.close

    def close(self) -> None:
        original(self)
        loop = self._loop
        if self._owns_loop and loop is not None and not loop.is_running() and not loop.is_closed():
            loop.close()

    monkeypatch.setattr(NATSConnectionManager, "close", close)


def guild_spec(guild_id: str) -> GuildSpec:
    return GuildBuilder(guild_id, "Test Guild", "integration test guild").build_spec()


def responder(agent_id: str = "responder", name: str | None = None) -> AgentSpec:
    return (
        AgentBuilder(ResponderProbeAgent)
        .set_id(agent_id)
        .set_name(name or f"Responder {agent_id}")
        .set_description("answers Hello Responder!")
        .build_spec()
    )


def initiator(agent_id: str = "initiator") -> AgentSpec:
    return (
        AgentBuilder(InitiatorProbeAgent)
        .set_id(agent_id)
        .set_name("Initiator Agent")
        .set_description("starts the exchange")
        .build_spec()
    )


class Probe:
    def __init__(self, guild_id: str, messaging: MessagingConfig) -> None:
        self.guild = Guild(
            id=guild_id,
            name="probe",
            description="test probe",
            messaging_config=messaging,
            execution_engine_clz=SYNC_ENGINE,
            organization_id="test-org",
        )
        spec = (
            AgentBuilder(LocalTestAgent)
            .set_id(f"probe-{uuid.uuid4().hex[:6]}")
            .set_name("Probe")
            .set_description("local test probe")
            .build_spec()
        )
        self.agent: LocalTestAgent = self.guild._add_local_agent(spec)  # type: ignore[assignment]

    def hello(self) -> None:
        self.agent.publish_dict("default_topic", {"content": "Hello Responder!"})

    def acks_from(self, agent_id: str) -> list:
        return [
            m
            for m in list(self.agent.captured_messages)
            if m.sender.id == agent_id and str(m.payload.get("content", "")).startswith("Acknowledged:")
        ]

    def clear(self) -> None:
        self.agent.clear_messages()

    def close(self) -> None:
        self.guild.shutdown()
