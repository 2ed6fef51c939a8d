"""Limits: an agent over its memory limit is killed as a crash; a guild cannot outgrow its quota."""

from __future__ import annotations

import uuid

import grpc
import pytest

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.k8s import AgentState, GuildLimitError
from rustic_ai.k8s.base.models import AgentKey
from rustic_ai.k8s.base.restart import RestartPolicy
from rustic_ai.k8s.protocol.v1 import agent_host_pb2 as pb
from rustic_ai.k8s.protocol.v1 import agent_host_pb2_grpc as pb_grpc
from support.eventually import eventually
from support.hosts import pid_alive, start_hosts
from support.memory_agents import GrowsPastItsLimit
from support.probe import guild_spec, responder

LIMIT_MB = 250


@pytest.fixture(scope="module")
def hosts(redis_url, key_prefix):
    hs = start_hosts(redis_url, key_prefix, ["limits-a", "limits-b"], env={
        "RUSTIC_AGENT_HOST_AGENT_MEMORY_MB": str(LIMIT_MB),
        "RUSTIC_AGENT_HOST_MEMORY_CHECK_S": "0.2",
        "RUSTIC_AGENT_HOST_MAX_AGENTS_PER_GUILD": "2",
    })
    yield hs
    for h in hs:
        h.close()


def hog(agent_id: str):
    return (AgentBuilder(GrowsPastItsLimit).set_id(agent_id).set_name(agent_id)
            .set_description("grows past its memory limit").build_spec())


async def test_an_agent_over_its_memory_limit_is_killed_and_reported_while_its_neighbour_runs(hosts, engine, messaging):
    g = guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    neighbour = await engine.run_agent(g, responder("neighbour"), messaging)
    # One restart allowed: the kill counts as a crash, so the agent comes back once, grows
    # again and is then marked failed.
    policy = RestartPolicy(max_restarts=1, backoff_initial_s=0.1)
    hogger = await engine.run_agent(g, hog("hog"), messaging, restart=policy)
    host = next(h for h in hosts if h.address == hogger.host)

    async def failed():
        info = await engine.agent_info(g.id, "hog", output_lines=50)
        return info if info.state == AgentState.FAILED else None

    info = await eventually(failed, timeout=30, what="the hog failed")
    assert info.reason.startswith("memory limit exceeded: ") and f"MB > {LIMIT_MB} MB" in info.reason, info.reason
    assert "gave up after 1 restarts" in info.reason
    assert info.restarts == 1 and info.exit_code == -9
    assert not pid_alive(hogger.pid)
    # The registry says the same, for engines and the CLI.
    stored = await engine.registry.get_agent(AgentKey(g.id, "hog"))
    assert stored is not None and stored.state == AgentState.FAILED and stored.reason == info.reason
    # ListAgents too.
    async with grpc.aio.insecure_channel(host.address) as channel:
        listed = await pb_grpc.AgentHostServiceStub(channel).ListAgents(pb.ListAgentsRequest(guild_id=g.id), timeout=5)
    [row] = [a for a in listed.agents if a.agent_id == "hog"]
    assert row.reason == info.reason
    # The neighbour and both hosts are unharmed.
    assert pid_alive(neighbour.pid) and await engine.is_agent_running(g.id, "neighbour")
    assert (await engine.agent_info(g.id, "neighbour")).state == AgentState.RUNNING
    assert all(h.proc.poll() is None for h in hosts)
    assert "memory limit exceeded" in host.logs()


async def test_a_guild_at_its_limit_is_refused_everywhere_and_other_guilds_are_not(hosts, engine, messaging):
    g, other = guild_spec(f"g-{uuid.uuid4().hex[:6]}"), guild_spec(f"g-{uuid.uuid4().hex[:6]}")
    await engine.run_agent(g, responder("one"), messaging)
    await engine.run_agent(g, responder("two"), messaging)
    # Permanent, not "host full": the engine does not try the other host, which would refuse too.
    with pytest.raises(GuildLimitError, match=f"guild {g.id} already has 2 live agents"):
        await engine.run_agent(g, responder("three"), messaging)
    assert not await engine.is_agent_running(g.id, "three")
    assert engine.metrics.retries.collect()[0].samples == []  # no host was tried twice
    # On the wire it is FAILED_PRECONDITION, on every host.
    for h in hosts:
        async with grpc.aio.insecure_channel(h.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.AgentHostServiceStub(channel).CreateAgent(pb.CreateAgentRequest(
                    guild_spec_json=g.model_dump_json().encode(),
                    agent_spec_json=responder("three").model_dump_json().encode(),
                    messaging_config_json=messaging.model_dump_json().encode()), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await engine.run_agent(other, responder("one"), messaging)  # the limit is per guild
    # Stopping one of the guild's agents makes room again.
    await engine.stop_agent(g.id, "two")
    await engine.run_agent(g, responder("three"), messaging)
    assert await engine.is_agent_running(g.id, "three")
