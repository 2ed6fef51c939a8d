"""The async engine against real agent-host processes, real agents and a real Redis."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from rustic_ai.k8s import AgentState, AsyncK8sEngine
from rustic_ai.k8s.base.restart import RestartPolicy
from support.eventually import eventually
from support.fleet import answers
from support.hosts import pid_alive
from support.probe import guild_spec, responder


def gid() -> str:
    return f"guild-{uuid.uuid4().hex[:8]}"


async def test_agents_run_in_separate_processes_spread_over_hosts(two_hosts, engine, messaging, probe_factory):
    g = guild_spec(gid())
    records = [await engine.run_agent(g, responder(f"r{i}"), messaging, machine_id=i + 1) for i in range(4)]
    pids = {r.pid for r in records}
    assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    assert {r.host for r in records} == {h.address for h in two_hosts}
    assert os.getpid() not in pids and all(p not in pids for p in (h.pid for h in two_hosts))
    listed = await engine.list_agents(g.id)
    assert {(r.agent_id, r.host, r.pid) for r in listed} == {(r.agent_id, r.host, r.pid) for r in records}
    probe = probe_factory(g.id)
    for r in records:
        assert await answers(probe, r.agent_id)


async def test_run_agent_returns_only_when_the_agent_is_subscribed(two_hosts, engine, messaging, probe_factory):
    g = guild_spec(gid())
    probe = probe_factory(g.id)
    await engine.run_agent(g, responder("r"), messaging)
    probe.hello()  # one hello, right after run_agent returned: it must be answered
    await eventually(lambda: probe.acks_from("r"), timeout=10, what="reply to the first message")


async def test_removing_one_agent_leaves_the_other_running(two_hosts, engine, messaging, probe_factory):
    g = guild_spec(gid())
    a = await engine.run_agent(g, responder("a"), messaging)
    b = await engine.run_agent(g, responder("b"), messaging)
    await engine.stop_agent(g.id, "a")
    assert not await engine.is_agent_running(g.id, "a")
    await eventually(lambda: not pid_alive(a.pid), timeout=5, what="stopped agent's process gone")
    assert await engine.is_agent_running(g.id, "b") and pid_alive(b.pid)
    assert list(await engine.get_agents_in_guild(g.id)) == ["b"]
    probe = probe_factory(g.id)
    assert await answers(probe, "b")
    assert probe.acks_from("a") == []


async def test_a_killed_agent_process_is_noticed_and_reported_not_running(two_hosts, engine, messaging):
    g = guild_spec(gid())
    rec = await engine.run_agent(g, responder("victim"), messaging, restart=RestartPolicy(max_restarts=0))
    survivor = await engine.run_agent(g, responder("survivor"), messaging)
    os.kill(rec.pid, signal.SIGKILL)
    # Noticed at once by the host, not at the next heartbeat (20 s by default).
    await eventually(lambda: _not_running(engine, g.id, "victim"), timeout=3, what="kill noticed")
    info = await engine.registry.get_agent(rec.key)
    assert info.state == AgentState.FAILED and info.exit_code == -signal.SIGKILL
    assert await engine.is_agent_running(g.id, "survivor") and pid_alive(survivor.pid)


async def _not_running(engine, guild_id, agent_id) -> bool:
    return not await engine.is_agent_running(guild_id, agent_id)


async def test_two_guilds_with_identical_agent_ids(two_hosts, engine, messaging, probe_factory):
    g1, g2 = guild_spec(gid()), guild_spec(gid())
    r1 = await engine.run_agent(g1, responder("responder"), messaging)
    r2 = await engine.run_agent(g2, responder("responder"), messaging)
    assert r1.pid != r2.pid
    assert list(await engine.get_agents_in_guild(g1.id)) == ["responder"]
    assert list(await engine.get_agents_in_guild(g2.id)) == ["responder"]
    p1, p2 = probe_factory(g1.id), probe_factory(g2.id)
    assert await answers(p1, "responder") and await answers(p2, "responder")
    await engine.stop_agent(g1.id, "responder")
    assert not await engine.is_agent_running(g1.id, "responder")
    assert await engine.is_agent_running(g2.id, "responder")


async def test_find_agents_by_name_returns_full_specs(two_hosts, engine, messaging):
    g = guild_spec(gid())
    spec = responder("x", name="The Responder")
    await engine.run_agent(g, spec, messaging)
    [found] = await engine.find_agents_by_name(g.id, "The Responder")
    assert found.class_name == spec.class_name and found.id == "x"
    assert await engine.find_agents_by_name(g.id, "nobody") == []


async def test_launch_many_spreads_a_burst_over_hosts(two_hosts, engine, messaging):
    g = guild_spec(gid())
    reqs = [engine.build_request(g, responder(f"r{i}"), messaging, machine_id=i) for i in range(6)]
    results = await engine.launch_many(reqs)
    assert all(not isinstance(r, BaseException) for r in results), results
    per_host = {h.address: sum(r.host == h.address for r in results) for h in two_hosts}
    assert sorted(per_host.values()) == [3, 3]


async def test_shutdown_stops_the_agents_the_engine_launched(two_hosts, engine_settings, messaging):
    g = guild_spec(gid())
    async with AsyncK8sEngine(engine_settings) as eng:
        rec = await eng.run_agent(g, responder("r"), messaging)
    await eventually(lambda: not pid_alive(rec.pid), timeout=10, what="agent stopped by engine shutdown")
    async with AsyncK8sEngine(engine_settings) as eng:
        assert not await eng.is_agent_running(g.id, "r")


async def test_a_new_engine_manages_agents_launched_by_another(two_hosts, engine_settings, messaging):
    g = guild_spec(gid())
    first = AsyncK8sEngine(engine_settings, stop_agents_on_shutdown=False)
    async with first:
        rec = await first.run_agent(g, responder("r"), messaging)
    async with AsyncK8sEngine(engine_settings) as second:
        assert await second.is_agent_running(g.id, "r")
        assert list(await second.get_agents_in_guild(g.id)) == ["r"]
        await second.stop_agent(g.id, "r")
        assert not await second.is_agent_running(g.id, "r")
    assert not pid_alive(rec.pid)


async def test_stopping_an_agent_that_is_not_running_is_a_no_op(two_hosts, engine):
    await engine.stop_agent("no-such-guild", "no-such-agent")


@pytest.mark.parametrize("discovery", ["static"])
async def test_static_discovery(two_hosts, engine_settings, messaging, discovery):
    import dataclasses

    settings = dataclasses.replace(engine_settings, discovery=discovery, hosts=(two_hosts[1].address,))
    async with AsyncK8sEngine(settings) as eng:
        rec = await eng.run_agent(guild_spec(gid()), responder("r"), messaging)
        assert rec.host == two_hosts[1].address
