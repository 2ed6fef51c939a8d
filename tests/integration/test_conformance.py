"""rusticai-testing's conformance suite, with agents in real agent-host processes.

The Guild builds `rustic_ai.k8s.K8sExecutionEngine` from its class path, so the engine
is configured only through the environment, exactly as a user's Guild would be.

The suite runs once per messaging backend that works across hosts (docs/messaging.md):
rusticai-redis and rusticai-nats, each against a private server of the test run. The hosts'
registry is Redis either way; only the agents' messages go through the backend under test.
Placement is round-robin so that a guild's first two agents land on different hosts and
every exchange in the suite crosses from one host process to the other.
"""

from __future__ import annotations

import uuid

import pytest

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.testing.execution.base_test_integration import IntegrationTestABC
from rustic_ai.testing.execution.integration_agents import LocalTestAgent
from support.eventually import eventually_sync
from support.probe import close_nats_event_loops, nats_messaging, redis_messaging


def _nats(request):
    close_nats_event_loops(request.getfixturevalue("monkeypatch"))
    return nats_messaging(request.getfixturevalue("nats_server").url)


BACKENDS = {
    "redis": lambda request: redis_messaging(request.getfixturevalue("redis_server").port),
    "nats": _nats,
}


class TestK8sExecutionEngineConformance(IntegrationTestABC):
    @pytest.fixture
    def guild_id(self) -> str:
        # The suite's own id (test node id + uuid, 133 characters here) is too long for
        # rusticai-nats: it names a JetStream consumer per agent and topic from the guild id
        # twice and the agent id twice, and NATS caps names at 255 (docs/messaging.md).
        return f"conformance-{uuid.uuid4().hex[:12]}"

    @pytest.fixture(params=sorted(BACKENDS))
    def messaging(self, request, guild_id):
        return BACKENDS[request.param](request)

    @pytest.fixture
    def execution_engine(self, two_hosts, redis_url, key_prefix, monkeypatch) -> str:
        monkeypatch.setenv("RUSTIC_K8S_REDIS_URL", redis_url)
        monkeypatch.setenv("RUSTIC_K8S_KEY_PREFIX", key_prefix)
        monkeypatch.setenv("RUSTIC_K8S_PLACEMENT", "round_robin")
        return "rustic_ai.k8s.K8sExecutionEngine"

    @pytest.fixture
    def org_id(self) -> str:
        return "conformance-org"

    def test_agents_on_two_hosts_talk_through_the_backend(self, guild, initiator_agent, responder_agent,
                                                          two_hosts):
        """Beyond the suite: the two agents run in different host processes, not in the test
        process, and the initiator's hello is answered by the responder across them."""
        guild.launch_agent(initiator_agent)
        guild.launch_agent(responder_agent)
        records = guild._get_execution_engine().list_agents(guild.id)
        assert {r.agent_id for r in records} == {"initiator", "responder"}
        assert {r.host for r in records} == {h.address for h in two_hosts}
        assert all(r.pid > 0 for r in records)

        local = guild._add_local_agent(
            AgentBuilder(LocalTestAgent).set_id("local_test").set_name("LocalTestAgent")
            .set_description("starts the exchange, captures the answers").build_spec())
        local.publish_initial_message()  # launch_agent returned: both agents are subscribed

        def exchange():
            hellos = {m.id for m in local.captured_messages
                      if m.sender.id == "initiator" and m.payload == {"content": "Hello Responder!"}}
            return [m for m in local.captured_messages
                    if m.sender.id == "responder" and m.payload["content"] in {f"Acknowledged: {i}" for i in hellos}]

        eventually_sync(exchange, timeout=10, what="the responder's answer to the initiator's hello")
