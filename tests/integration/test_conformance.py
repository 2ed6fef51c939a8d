"""rusticai-testing's conformance suite, with agents in real agent-host processes.

The Guild builds `rustic_ai.k8s.K8sExecutionEngine` from its class path, so the engine
is configured only through the environment, exactly as a user's Guild would be.
"""

from __future__ import annotations

import pytest

from rustic_ai.testing.execution.base_test_integration import IntegrationTestABC
from support.probe import redis_messaging


class TestK8sExecutionEngineConformance(IntegrationTestABC):
    @pytest.fixture
    def messaging(self, guild_id, redis_server):
        return redis_messaging(redis_server.port)

    @pytest.fixture
    def execution_engine(self, two_hosts, redis_url, key_prefix, monkeypatch) -> str:
        monkeypatch.setenv("RUSTIC_K8S_REDIS_URL", redis_url)
        monkeypatch.setenv("RUSTIC_K8S_KEY_PREFIX", key_prefix)
        return "rustic_ai.k8s.K8sExecutionEngine"

    @pytest.fixture
    def org_id(self) -> str:
        return "conformance-org"

    def test_agents_ran_on_the_agent_hosts(self, guild, initiator_agent, responder_agent, two_hosts):
        """Beyond the suite: both agents run in host processes, not in the test process."""
        guild.launch_agent(initiator_agent)
        guild.launch_agent(responder_agent)
        records = guild._get_execution_engine().list_agents(guild.id)
        assert {r.agent_id for r in records} == {"initiator", "responder"}
        assert {r.host for r in records} <= {h.address for h in two_hosts}
        assert all(r.pid > 0 for r in records)
