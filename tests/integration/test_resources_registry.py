"""Resource accounting in the registry's scripts, against a real redis-server.

The claim deducts what an agent needs in the same script as it takes the agent; every way an
agent leaves a host (stop, failed, hand-off, failover by another host's claim, reap) gives it
back. What a host has in use is read back from the registry's own listing and checked against
the sum of what the agents were granted.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from support.eventually import eventually
from support.registry_records import rec

from rustic_ai.k8s.base.models import AgentKey, AgentState, HostRecord, HostState, LaunchRequest
from rustic_ai.k8s.base.resources import HostInventory, ResourceRequest
from rustic_ai.k8s.registry import SHORT, LocationRegistry

GPU_HOST = HostInventory(cpu=4000, mem=8192, gpus=("GPU-a", "GPU-b"), custom={"license": 2000})


def need(**resources) -> str:
    return ResourceRequest.from_agent_spec({"resources": resources}).to_json()


@pytest.fixture
async def registry(redis_url):
    async with LocationRegistry(redis_url, f"res{uuid.uuid4().hex[:8]}", agent_ttl_s=60, lease_s=60) as reg:
        yield reg


async def host(registry, address, inventory=GPU_HOST, agents=()):
    return await registry.heartbeat(HostRecord(address, capacity=100, state=HostState.SERVING,
                                               inventory=inventory, labels={"pool": "gpu"}), list(agents))


async def usage(registry, address):
    [h] = [h for h in await registry.list_hosts() if h.address == address]
    return h.usage


async def test_whole_gpus_are_exclusive_and_fractions_share_one_device(registry):
    await host(registry, "h:1")
    whole = await registry.claim_agent(rec("g", "whole", "h:1"), need=need(num_gpus=1))
    assert whole.ok and json.loads(whole.allocation) == {"gpu": {"GPU-a": 1000}}
    halves = [await registry.claim_agent(rec("g", f"half{i}", "h:1"), need=need(num_gpus=0.5)) for i in range(2)]
    assert [json.loads(c.allocation) for c in halves] == [{"gpu": {"GPU-b": 500}}] * 2
    third = await registry.claim_agent(rec("g", "third", "h:1"), need=need(num_gpus=0.25))
    assert not third.ok and third.reason == SHORT and third.short == ("gpu", 250, 0)
    assert (await usage(registry, "h:1")).gpus == {"GPU-a": 1000, "GPU-b": 1000}


async def test_a_fraction_goes_to_the_fullest_device_that_fits(registry):
    await host(registry, "h:1")
    assert (await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=0.5))).ok
    b = await registry.claim_agent(rec("g", "b", "h:1"), need=need(num_gpus=0.3))
    assert json.loads(b.allocation) == {"gpu": {"GPU-a": 300}}  # GPU-b stays whole for a whole request
    whole = await registry.claim_agent(rec("g", "w", "h:1"), need=need(num_gpus=1))
    assert json.loads(whole.allocation) == {"gpu": {"GPU-b": 1000}}
    refused = await registry.claim_agent(rec("g", "w2", "h:1"), need=need(num_gpus=1))
    assert refused.short == ("gpu", 1000, 200)  # needs 1 GPU; largest free 0.2


async def test_cpu_memory_and_custom_resources_are_deducted_and_refused_when_short(registry):
    await host(registry, "h:1")
    ok = await registry.claim_agent(rec("g", "a", "h:1"),
                                    need=need(num_cpus=3, custom_resources={"license": 1, "memory_mb": 4096}))
    assert json.loads(ok.allocation) == {"cpu": 3000, "mem": 4096, "custom": {"license": 1000}}
    assert (await registry.claim_agent(rec("g", "b", "h:1"), need=need(num_cpus=2))).short == ("cpu", 2000, 1000)
    assert (await registry.claim_agent(rec("g", "c", "h:1"),
                                       need=need(custom_resources={"license": 1.5}))).short == ("custom:license",
                                                                                                1500, 1000)
    assert (await registry.claim_agent(rec("g", "d", "h:1"),
                                       need=need(custom_resources={"quantum": 1}))).short == ("custom:quantum", 1000, 0)
    u = await usage(registry, "h:1")
    assert (u.cpu, u.mem, dict(u.custom)) == (3000, 4096, {"license": 1000})
    # A refused claim changed nothing: the agent is not registered anywhere.
    assert await registry.get_agent(AgentKey("g", "b")) is None


async def test_an_agent_without_resources_takes_nothing_but_its_slot(registry):
    await host(registry, "h:1", inventory=HostInventory())
    plain = await registry.claim_agent(rec("g", "plain", "h:1"))
    assert plain.ok and plain.allocation == ""
    assert (await registry.claim_agent(rec("g", "gpu", "h:1"), need=need(num_gpus=1))).short == ("gpu", 1000, 0)


async def test_resources_come_back_on_stop_failure_hand_off_and_failover(registry):
    await host(registry, "h1:1")
    await host(registry, "h2:1")
    for agent in ("stop", "fail", "hand", "move"):
        assert (await registry.claim_agent(rec("g", agent, "h1:1"), need=need(num_cpus=1))).ok
    assert (await usage(registry, "h1:1")).cpu == 4000
    await registry.remove_agent(AgentKey("g", "stop"), "h1:1")
    assert (await usage(registry, "h1:1")).cpu == 3000
    await registry.update_agent(AgentKey("g", "fail"), "h1:1", state=AgentState.FAILED, exit_code=1)
    assert (await usage(registry, "h1:1")).cpu == 2000
    assert (await registry.get_agent(AgentKey("g", "fail"))).allocation == ""
    await registry.hand_off_agent(AgentKey("g", "hand"), "h1:1")
    assert (await usage(registry, "h1:1")).cpu == 1000
    # Another host adopts the last one (exclusive=False: as after a reap).
    moved = await registry.claim_agent(rec("g", "move", "h2:1"), exclusive=False, need=need(num_cpus=1))
    assert moved.ok
    assert (await usage(registry, "h1:1")).cpu == 0 and (await usage(registry, "h2:1")).cpu == 1000


async def test_a_reaped_host_holds_nothing_and_its_agents_fit_elsewhere(registry, redis_url):
    await host(registry, "live:1", inventory=HostInventory(gpus=("0",)))
    async with LocationRegistry(redis_url, registry.keys.prefix, agent_ttl_s=60, lease_s=0.2) as short_lease:
        await short_lease.heartbeat(HostRecord("dead:1", capacity=10, inventory=GPU_HOST), [])
        assert (await short_lease.claim_agent(rec("g", "a", "dead:1"), need=need(num_gpus=1))).ok
    await host(registry, "live:1", inventory=HostInventory(gpus=("0",)))  # renewed after dead:1 registered
    reaped: list[str] = []

    async def dead_reaped() -> bool:  # once its 0.2 s lease has run out
        reaped.extend(await registry.reap_dead_hosts("live:1"))
        return bool(reaped)

    await eventually(dead_reaped, timeout=5, interval=0.05, what="dead:1 reaped")
    assert reaped == ["dead:1"]
    assert await registry.redis.exists(registry.keys.host_alloc("dead:1")) == 0
    adopted = await registry.claim_agent(rec("g", "a", "live:1"), need=need(num_gpus=1))
    assert adopted.ok and json.loads(adopted.allocation) == {"gpu": {"0": 1000}}


async def test_a_forced_allocation_is_taken_as_it_is_and_a_renewal_restores_the_usage(registry):
    await host(registry, "h:1")
    first = await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=0.5))
    await registry.redis.delete(registry.keys.host_alloc("h:1"), registry.keys.agent(AgentKey("g", "a")))
    again = await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=0.5), previous=first.allocation,
                                       force=True)
    assert again.allocation == first.allocation
    await registry.redis.hdel(registry.keys.host("h:1"), "used")
    await host(registry, "h:1", agents=[AgentKey("g", "a")])
    assert (await usage(registry, "h:1")).gpus == json.loads(first.allocation)["gpu"]


async def test_concurrent_claims_from_many_clients_never_overcommit(registry, redis_url):
    """Two engines (here: two clients, 40 claims at once) racing for 2 GPUs of one host."""
    await host(registry, "h:1")
    async with LocationRegistry(redis_url, registry.keys.prefix, agent_ttl_s=60, lease_s=60) as other:
        results = await asyncio.gather(*(
            (registry if i % 2 else other).claim_agent(rec("g", f"a{i}", "h:1"), need=need(num_gpus=0.5))
            for i in range(40)))
    granted = [json.loads(r.allocation)["gpu"] for r in results if r.ok]
    assert len(granted) == 4
    per_device: dict[str, int] = {}
    for g in granted:
        for device, m in g.items():
            per_device[device] = per_device.get(device, 0) + m
    assert per_device == {"GPU-a": 1000, "GPU-b": 1000}


async def test_unplaced_agents_are_listed_until_claimed_or_no_longer_wanted(registry):
    await host(registry, "h:1")
    for agent in ("a", "b"):
        await registry.set_desired(LaunchRequest(guild_spec={"id": "g"}, agent_spec={"id": agent}, messaging_config={}))
    assert await registry.report_unplaced(AgentKey("g", "a"), "needs 1 GPU; largest free 0", "h:1")
    assert await registry.report_unplaced(AgentKey("g", "b"), "needs 4 CPU; 1 free", "h:1")
    assert not await registry.report_unplaced(AgentKey("g", "gone"), "not wanted any more", "h:1")
    [a, _b] = await registry.list_unplaced()
    assert (a.key.agent_id, a.reason, a.host) == ("a", "needs 1 GPU; largest free 0", "h:1")
    await registry.claim_agent(rec("g", "a", "h:1"))
    assert not await registry.report_unplaced(AgentKey("g", "a"), "a late report", "h2:1")  # it runs now
    await registry.clear_desired(AgentKey("g", "b"))
    assert await registry.list_unplaced() == []


async def test_a_previous_allocation_is_kept_while_it_fits_and_replaced_when_it_does_not(registry):
    await host(registry, "h:1")
    a = await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=1))
    # A restart of a (a new process): it keeps its device.
    again = await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=1), previous=a.allocation)
    assert again.allocation == a.allocation
    # Its entry lost meanwhile (Redis restarted), another agent took the device: a restart gets the other one.
    await registry.redis.hdel(registry.keys.host_alloc("h:1"), "g\x1fa")
    b = await registry.claim_agent(rec("g", "b", "h:1"), need=need(num_gpus=1))
    assert b.allocation == a.allocation
    moved = await registry.claim_agent(rec("g", "a", "h:1"), need=need(num_gpus=1), previous=a.allocation)
    assert moved.ok and moved.allocation not in ("", a.allocation)
    # With force (a re-registration of a process that runs on it) it is taken as it is.
    forced = await registry.claim_agent(rec("g", "c", "h:1"), need=need(num_gpus=1), previous=a.allocation,
                                        force=True)
    assert forced.allocation == a.allocation
