"""Failover keeps resources: a killed host's agents go only to hosts that fit them, and an agent
that fits nowhere is reported (registry, `rustic-k8s unplaced`) and placed once a host fits it.

Leases are short (3 s). What the agents see is read from their own files (support.resource_agents).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import pytest
from rustic_ai.core.guild.builders import AgentBuilder, GuildBuilder
from rustic_ai.core.guild.dsl import ResourceSpec
from support.eventually import eventually
from support.fleet import peers_known
from support.hosts import HostProcess, pid_alive
from support.resource_agents import ENV_DIR_ENV, EnvReporter, env_path

from rustic_ai.k8s import AgentState, AsyncK8sEngine, EngineSettings
from rustic_ai.k8s.base.models import AgentKey

FAST = {
    "RUSTIC_AGENT_HOST_LEASE_S": "3",
    "RUSTIC_AGENT_HOST_LEASE_RENEW_S": "0.4",
    "RUSTIC_AGENT_HOST_FENCE_MARGIN_S": "0.6",
    "RUSTIC_AGENT_HOST_STOP_GRACE_S": "2",
}


@pytest.fixture
def prefix() -> str:
    return f"rf{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hosts(redis_url, prefix, tmp_path):
    """Factory: ``hosts(a={env}, b={env})`` starts those hosts at once and returns them in order."""
    started: list[HostProcess] = []

    def start(**envs: dict[str, str]) -> list[HostProcess]:
        new = [HostProcess(redis_url, prefix, name=name, env={**FAST, ENV_DIR_ENV: str(tmp_path), **env}, wait=False)
               for name, env in envs.items()]
        started.extend(new)
        for h in new:
            h.wait_ready()
        return new

    yield start
    for h in started:
        h.close()


def agent(agent_id: str, **resources):
    spec = AgentBuilder(EnvReporter).set_id(agent_id).set_name(agent_id).set_description("reports its env").build_spec()
    return spec.model_copy(update={"resources": ResourceSpec(**resources)})


def env_of(tmp_path, guild_id, agent_id) -> dict | None:
    try:
        return json.loads(env_path(tmp_path, guild_id, agent_id).read_text())
    except (OSError, ValueError):
        return None


async def unplaced_cli(redis_url, prefix) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rustic_ai.k8s.cli.main", "unplaced", "-o", "json", "--redis-url", redis_url,
        "--key-prefix", prefix, stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return json.loads(out)


async def test_a_killed_host_s_gpu_agents_go_only_where_they_fit_and_one_that_fits_nowhere_waits(
        hosts, engine_settings, redis_url, prefix, messaging, tmp_path):
    [a] = hosts(a={"RUSTIC_AGENT_HOST_GPUS": "2"})
    settings = engine_settings.__class__.from_env({}, redis_url=redis_url, key_prefix=prefix, call_timeout_s=5.0,
                                                 launch_timeout_s=30.0, discovery_refresh_s=0.2)
    g = GuildBuilder(f"fo-{uuid.uuid4().hex[:8]}", "Failover Guild", "resources survive failover").build_spec()
    async with AsyncK8sEngine(settings, stop_agents_on_shutdown=False) as engine:
        gpu = [await engine.run_agent(g, agent(f"gpu{i}", num_gpus=1), messaging) for i in range(2)]
        plain = await engine.run_agent(g, agent("plain"), messaging)
        assert {r.host for r in [*gpu, plain]} == {a.address}
        b, c = hosts(b={"RUSTIC_AGENT_HOST_GPUS": "1"}, c={"RUSTIC_AGENT_HOST_GPUS": "none"})
        # a must have heard of b and c, or they rightly wait out its whole hold limit before reaping it.
        await peers_known(engine.registry, [a.address, b.address, c.address])
        a.kill()  # SIGKILL: no drain; its agents die with it (PDEATHSIG)
        await eventually(lambda: not any(pid_alive(r.pid) for r in [*gpu, plain]), timeout=5,
                         what="a's agents died with it")

        async def settled():
            agents = {r.agent_id: r for r in await engine.list_agents(g.id)
                      if r.state == AgentState.RUNNING and r.pid and pid_alive(r.pid)}
            return agents if len(agents) == 2 else None

        agents = await eventually(settled, timeout=20, what="a's agents adopted where they fit")
        adopted_gpu = [r for aid, r in agents.items() if aid.startswith("gpu")]
        assert len(adopted_gpu) == 1 and adopted_gpu[0].host == b.address  # the only GPU left
        assert agents["plain"].host in (b.address, c.address)
        gpu_env = await eventually(lambda: (e := env_of(tmp_path, g.id, adopted_gpu[0].agent_id))
                                   and e["pid"] == adopted_gpu[0].pid and e, timeout=10, what="env of the adoptee")
        assert gpu_env["CUDA_VISIBLE_DEVICES"] == "0"
        left_over = ({"gpu0", "gpu1"} - {adopted_gpu[0].agent_id}).pop()

        # The one that fits nowhere is reported, not dropped: in the registry and by the CLI.
        async def reported():
            return [u for u in await unplaced_cli(redis_url, prefix) if u["agent"] == left_over]

        [entry] = await eventually(reported, timeout=10, what="the left-over GPU agent reported unplaced")
        assert "needs 1 GPU; largest free 0" in entry["reason"]
        assert a.address not in {h.address for h in await engine.registry.list_hosts()}  # reaped, holds nothing

        # Capacity appears (a scale-up): the waiting agent is placed there.
        [d] = hosts(d={"RUSTIC_AGENT_HOST_GPUS": "GPU-d0"})

        async def placed_on_d():
            r = await engine.registry.get_agent(AgentKey(g.id, left_over))
            return r if r is not None and r.host == d.address and r.state == AgentState.RUNNING and pid_alive(r.pid) else None

        record = await eventually(placed_on_d, timeout=20, what="the waiting agent placed on the new GPU host")
        env = await eventually(lambda: (e := env_of(tmp_path, g.id, left_over)) and e["pid"] == record.pid and e,
                               timeout=10, what="env of the late adoptee")
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-d0"
        assert await engine.registry.list_unplaced() == []
        for aid in ("gpu0", "gpu1", "plain"):
            await engine.stop_agent(g.id, aid)
        usage = {h.address: h.usage for h in await engine.registry.list_hosts()}
        assert all(not u.gpus or sum(u.gpus.values()) == 0 for u in usage.values())  # all given back


async def test_a_draining_host_s_gpu_agent_moves_only_to_a_host_with_a_gpu(hosts, redis_url, prefix, messaging,
                                                                            tmp_path):
    [a] = hosts(a={"RUSTIC_AGENT_HOST_GPUS": "1"})
    settings = EngineSettings.from_env({}, redis_url=redis_url, key_prefix=prefix, call_timeout_s=5.0,
                                       launch_timeout_s=30.0, discovery_refresh_s=0.2)
    g = GuildBuilder(f"dr-{uuid.uuid4().hex[:8]}", "Drain Guild", "resources survive a drain").build_spec()
    async with AsyncK8sEngine(settings) as engine:
        first = await engine.run_agent(g, agent("gpu", num_gpus=1), messaging)
        assert first.host == a.address
        cpu_only, gpu_host = hosts(c={"RUSTIC_AGENT_HOST_GPUS": "none", "RUSTIC_AGENT_HOST_CAPACITY": "1000"},
                                   g={"RUSTIC_AGENT_HOST_GPUS": "GPU-g0"})
        assert a.terminate() == 0  # SIGTERM: drain, hand the agent to the fleet

        async def moved():
            r = await engine.registry.get_agent(first.key)
            return r if r is not None and r.state == AgentState.RUNNING and r.host != a.address else None

        record = await eventually(moved, timeout=20, what="the drained agent running elsewhere")
        assert record.host == gpu_host.address  # not the emptier CPU-only host
        env = await eventually(lambda: (e := env_of(tmp_path, g.id, "gpu")) and e["pid"] == record.pid and e,
                               timeout=10, what="env of the moved agent")
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-g0"
        assert cpu_only.address not in {r.host for r in await engine.list_agents(g.id)}
