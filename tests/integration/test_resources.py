"""Placement by resources, against real hosts that declare GPUs, custom resources and labels.

Three hosts share the module (each test keeps to its own guild and stops what it started,
so every test finds the fleet empty):

    gpu-a   GPUs GPU-a0, GPU-a1 (UUIDs)   4 CPUs   license=1   pool=gpu, zone=a
    gpu-b   GPU 0 (an index)              2 CPUs               pool=gpu, zone=b
    cpu     no GPU                        8 CPUs               pool=cpu

What an agent sees is read from outside: every test agent (support.resource_agents) writes
its pid and its CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES to a file of its own.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from rustic_ai.core.guild.builders import AgentBuilder, GuildBuilder
from rustic_ai.core.guild.dsl import AgentSpec, ResourceSpec
from rustic_ai.core.guild.guild import Guild
from support.eventually import eventually, eventually_sync
from support.hosts import pid_alive, start_hosts
from support.resource_agents import ENV_DIR_ENV, EnvReporter, env_path

from rustic_ai.k8s import AsyncK8sEngine
from rustic_ai.k8s.base.errors import InsufficientResourcesError, InvalidSpecError
from rustic_ai.k8s.base.resources import PlacementPolicy

HOSTS = {
    "gpu-a": {"RUSTIC_AGENT_HOST_GPUS": "GPU-a0,GPU-a1", "RUSTIC_AGENT_HOST_CPUS": "4",
              "RUSTIC_AGENT_HOST_RESOURCES": '{"license": 1}', "RUSTIC_AGENT_HOST_LABELS": "pool=gpu,zone=a"},
    "gpu-b": {"RUSTIC_AGENT_HOST_GPUS": "1", "RUSTIC_AGENT_HOST_CPUS": "2", "RUSTIC_AGENT_HOST_LABELS": "pool=gpu,zone=b"},
    "cpu": {"RUSTIC_AGENT_HOST_GPUS": "none", "RUSTIC_AGENT_HOST_CPUS": "8", "RUSTIC_AGENT_HOST_LABELS": "pool=cpu"},
}


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("agent-env")


@pytest.fixture(scope="module")
def fleet(redis_url, key_prefix, env_dir):
    """name -> HostProcess, started together."""
    started = []
    try:
        for name, env in HOSTS.items():
            started += start_hosts(redis_url, key_prefix, [name], env={**env, ENV_DIR_ENV: str(env_dir)})
        yield {h.name: h for h in started}
    finally:
        for h in started:
            h.close()


@pytest.fixture
async def engine(engine_settings, fleet):
    async with AsyncK8sEngine(engine_settings, organization_id="test-org") as eng:
        yield eng


def gid() -> str:
    return f"res-{uuid.uuid4().hex[:8]}"


def agent(agent_id: str, **resources) -> AgentSpec:
    spec = AgentBuilder(EnvReporter).set_id(agent_id).set_name(agent_id).set_description("reports its env").build_spec()
    return spec.model_copy(update={"resources": ResourceSpec(**resources)})


def guild(guild_id: str, placement: dict | None = None):
    builder = GuildBuilder(guild_id, "Resource Guild", "placement tests")
    if placement is not None:
        builder.set_property("rustic_k8s_placement", placement)
    return builder.build_spec()


async def seen(env_dir, record) -> dict:
    """What the agent process wrote about itself (once its pid is the one the host reported)."""
    path = env_path(env_dir, record.guild_id, record.agent_id)

    def read():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data["pid"] == record.pid else None

    return await eventually(read, timeout=10, what=f"{record.key} wrote its environment")


async def free_gpus(engine, address) -> float:
    [h] = [h for h in await engine.registry.list_hosts() if h.address == address]
    return len(h.inventory.gpus) - sum(h.usage.gpus.values()) / 1000


async def stop_all(engine, guild_id):
    for r in await engine.list_agents(guild_id):
        await engine.stop_agent(guild_id, r.agent_id)


async def test_hosts_advertise_what_they_have(engine, fleet):
    by_name = {h.name: h for h in await engine.registry.list_hosts()}
    assert by_name["gpu-a"].inventory.gpus == ("GPU-a0", "GPU-a1") and by_name["gpu-a"].inventory.cpu == 4000
    assert by_name["gpu-a"].inventory.custom == {"license": 1000}
    assert by_name["gpu-b"].inventory.gpus == ("0",) and by_name["gpu-b"].labels == {"pool": "gpu", "zone": "b"}
    assert by_name["cpu"].inventory.gpus == () and by_name["cpu"].inventory.mem > 0
    health = await engine.pool.client(fleet["gpu-a"].address).health()
    assert health.inventory == by_name["gpu-a"].inventory and health.labels == {"pool": "gpu", "zone": "a"}


async def test_a_gpu_agent_sees_only_its_device_and_a_plain_one_sees_none(engine, fleet, env_dir, messaging):
    g = guild(gid(), {"selector": {"zone": "a"}})
    gpu = await engine.run_agent(g, agent("gpu", num_gpus=1), messaging)
    plain = await engine.run_agent(g, agent("plain"), messaging)
    assert gpu.host == plain.host == fleet["gpu-a"].address
    gpu_env, plain_env = await seen(env_dir, gpu), await seen(env_dir, plain)
    assert gpu_env["NVIDIA_VISIBLE_DEVICES"] in ("GPU-a0", "GPU-a1")
    assert gpu_env["CUDA_VISIBLE_DEVICES"] == gpu_env["NVIDIA_VISIBLE_DEVICES"]  # a UUID is CUDA's name too
    assert plain_env["CUDA_VISIBLE_DEVICES"] == "" and plain_env["NVIDIA_VISIBLE_DEVICES"] == "void"
    second = await engine.run_agent(g, agent("gpu2", num_gpus=1), messaging)
    assert {(await seen(env_dir, second))["NVIDIA_VISIBLE_DEVICES"], gpu_env["NVIDIA_VISIBLE_DEVICES"]} == {
        "GPU-a0", "GPU-a1"}  # whole GPUs are exclusive
    await stop_all(engine, g.id)


async def test_fractions_share_a_device_up_to_one_and_the_error_names_what_is_short(engine, fleet, env_dir,
                                                                                    messaging):
    g = guild(gid(), {"selector": {"zone": "b"}})
    halves = [await engine.run_agent(g, agent(f"half{i}", num_gpus=0.5), messaging) for i in range(2)]
    assert {r.host for r in halves} == {fleet["gpu-b"].address}
    assert [(await seen(env_dir, r))["CUDA_VISIBLE_DEVICES"] for r in halves] == ["0", "0"]  # its index
    with pytest.raises(InsufficientResourcesError, match=r"needs 0\.25 GPU; largest free 0\b"):
        await engine.run_agent(g, agent("quarter", num_gpus=0.25), messaging)
    await engine.stop_agent(g.id, "half0")
    with pytest.raises(InsufficientResourcesError, match=r"needs 1 GPU; largest free 0\.5"):
        await engine.run_agent(g, agent("whole", num_gpus=1), messaging)
    await stop_all(engine, g.id)
    assert await free_gpus(engine, fleet["gpu-b"].address) == 1.0  # given back on stop
    whole = await engine.run_agent(g, agent("whole", num_gpus=1), messaging)
    assert (await seen(env_dir, whole))["NVIDIA_VISIBLE_DEVICES"] == "0"
    await stop_all(engine, g.id)


async def test_only_hosts_that_fit_are_used(engine, fleet, messaging):
    g = guild(gid())
    lic = await engine.run_agent(g, agent("licensed", custom_resources={"license": 1}), messaging)
    assert lic.host == fleet["gpu-a"].address  # the only host with a license
    with pytest.raises(InsufficientResourcesError, match=r"needs 1 license; 0 free"):
        await engine.run_agent(g, agent("licensed2", custom_resources={"license": 1}), messaging)
    big = await engine.run_agent(g, agent("big", num_cpus=6), messaging)
    assert big.host == fleet["cpu"].address  # 8 CPUs; the others have 4 and 2
    with pytest.raises(InsufficientResourcesError, match=r"needs 8 GPU; largest free 2"):
        await engine.run_agent(g, agent("greedy", num_gpus=8), messaging)
    with pytest.raises(InvalidSpecError, match="whole number of GPUs"):
        await engine.run_agent(g, agent("odd", num_gpus=1.5), messaging)
    await stop_all(engine, g.id)


async def test_selector_pack_and_spread(engine, fleet, messaging):
    on_cpu = guild(gid(), {"selector": {"pool": "cpu"}})
    records = [await engine.run_agent(on_cpu, agent(f"c{i}"), messaging) for i in range(2)]
    assert {r.host for r in records} == {fleet["cpu"].address}
    with pytest.raises(InsufficientResourcesError, match="do not match the selector pool=tpu"):
        await engine.run_agent(guild(gid()), agent("tpu"), messaging, placement=PlacementPolicy(selector={"pool": "tpu"}))

    spread = guild(gid(), {"affinity": "spread"})
    spread_records = await engine.launch_many([engine.build_request(spread, agent(f"s{i}"), messaging)
                                               for i in range(3)])
    assert len({r.host for r in spread_records}) == 3
    pack = guild(gid(), {"affinity": "pack"})
    first = await engine.run_agent(pack, agent("p0"), messaging)
    rest = [await engine.run_agent(pack, agent(f"p{i}"), messaging) for i in range(1, 4)]
    assert {r.host for r in rest} == {first.host}
    # Per agent, through the guild's property: one agent of a packed guild goes where it is told.
    mixed = guild(gid(), {"affinity": "pack", "agents": {"loner": {"selector": {"zone": "b"}}}})
    loner = await engine.run_agent(mixed, agent("loner"), messaging)
    assert loner.host == fleet["gpu-b"].address
    for g in (on_cpu, spread, pack, mixed):
        await stop_all(engine, g.id)


async def test_two_engines_launching_at_once_never_overcommit(engine_settings, fleet, env_dir, messaging):
    """Two engines, 12 half-GPU agents at once, 3 GPUs in the fleet: 6 start, 6 are refused; no
    device carries more than 1.0, by what the agent processes themselves see."""
    g = guild(gid(), {"selector": {"pool": "gpu"}})
    async with AsyncK8sEngine(engine_settings) as one, AsyncK8sEngine(engine_settings) as two:
        results = await asyncio.gather(*(
            (one if i % 2 else two).run_agent(g, agent(f"h{i}", num_gpus=0.5), messaging) for i in range(12)),
            return_exceptions=True)
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(started) == 6 and all(isinstance(r, InsufficientResourcesError) for r in refused), refused
        per_device: dict[tuple[str, str], int] = {}
        for r in started:
            device = (r.host, (await seen(env_dir, r))["NVIDIA_VISIBLE_DEVICES"])
            per_device[device] = per_device.get(device, 0) + 1
        assert all(pid_alive(r.pid) for r in started)
        assert sorted(per_device.values()) == [2, 2, 2]  # two halves per device, three devices
        await stop_all(one, g.id)


def test_an_unchanged_guild_with_the_sync_engine_honours_resources(fleet, redis_url, key_prefix, env_dir,
                                                                   messaging, monkeypatch):
    """rusticai-core builds K8sExecutionEngine from its class path; the selector comes from the environment."""
    monkeypatch.setenv("RUSTIC_K8S_REDIS_URL", redis_url)
    monkeypatch.setenv("RUSTIC_K8S_KEY_PREFIX", key_prefix)
    monkeypatch.setenv("RUSTIC_K8S_SELECTOR", "zone=b")
    g = Guild(id=gid(), name="Sync Guild", description="resources through K8sExecutionEngine",
              messaging_config=messaging, execution_engine_clz="rustic_ai.k8s.K8sExecutionEngine",
              organization_id="test-org")
    try:
        g.launch_agent(agent("sync-gpu", num_gpus=0.5))
        [record] = g._get_execution_engine().list_agents(g.id)
        assert record.host == fleet["gpu-b"].address
        path = env_path(env_dir, g.id, "sync-gpu")
        data = eventually_sync(lambda: path.exists() and json.loads(path.read_text()), timeout=10,
                               what="the agent wrote its environment")
        assert data["pid"] == record.pid and data["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        g.shutdown()


async def test_a_launch_can_wait_for_capacity_to_appear(engine, fleet, messaging, caplog):
    g = guild(gid(), {"selector": {"zone": "b"}})
    await engine.run_agent(g, agent("holder", num_gpus=1), messaging)
    caplog.set_level("INFO", logger="rustic_ai.k8s.engine.engine")
    waiting = asyncio.create_task(engine.run_agent(g, agent("waiter", num_gpus=1), messaging,
                                                   placement=PlacementPolicy(wait_s=30)))
    await eventually(lambda: any("waiting up to" in r.getMessage() for r in caplog.records), timeout=10,
                     what="the launch waiting for capacity")
    assert not waiting.done()
    await engine.stop_agent(g.id, "holder")  # capacity appears
    record = await asyncio.wait_for(waiting, 20)
    assert record.host == fleet["gpu-b"].address
    await stop_all(engine, g.id)


async def test_rustic_k8s_hosts_shows_used_over_total(engine, fleet, redis_url, key_prefix, messaging):
    import os
    import sys

    g = guild(gid(), {"selector": {"zone": "a"}})
    await engine.run_agent(g, agent("counted", num_gpus=0.5, num_cpus=1), messaging)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rustic_ai.k8s.cli.main", "hosts", "--redis-url", redis_url, "--key-prefix", key_prefix,
        stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    [row] = [line for line in out.decode().splitlines() if line.startswith(fleet["gpu-a"].address)]
    assert "1/4" in row and "0.5/2" in row and "license=0/1" in row and "pool=gpu,zone=a" in row
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rustic_ai.k8s.cli.main", "agents", "--guild", g.id, "--redis-url", redis_url,
        "--key-prefix", key_prefix, stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, _ = await proc.communicate()
    [line] = [line for line in out.decode().splitlines() if "counted" in line]
    assert "1 CPU" in line and "GPU GPU-a" in line and "×0.5" in line  # what the agent holds
    await stop_all(engine, g.id)
