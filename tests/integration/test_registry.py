"""The location registry against a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rustic_ai.k8s.base.errors import RegistryUnavailableError
from rustic_ai.k8s.base.models import AgentKey, AgentState, HostRecord, HostState
from rustic_ai.k8s.registry import LocationRegistry
from support.eventually import eventually
from support.registry_records import beat, rec


@pytest.fixture
def key_prefix() -> str:
    """Registry tests look at whole-fleet listings: each gets its own namespace."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def registry(redis_url, key_prefix):
    # A namespace per test: hosts one test registers must not be another's peers or reapers.
    async with LocationRegistry(redis_url, f"{key_prefix}-{uuid.uuid4().hex[:6]}", agent_ttl_s=60, lease_s=60) as reg:
        yield reg


async def test_same_agent_ids_in_two_guilds_coexist(registry):
    await beat(registry, "h1:1")
    for guild in ("g1", "g2"):
        assert (await registry.claim_agent(rec(guild, "initiator", "h1:1"))).ok
    assert [r.guild_id for r in await registry.list_guild("g1")] == ["g1"]
    assert [r.guild_id for r in await registry.list_guild("g2")] == ["g2"]
    await registry.remove_agent(AgentKey("g1", "initiator"), "h1:1")
    assert await registry.list_guild("g1") == []
    assert await registry.is_agent_running(AgentKey("g2", "initiator"))


async def test_listing_returns_the_full_spec(registry):
    await registry.claim_agent(rec("g", "a", "h1:1"))
    [r] = await registry.list_guild("g")
    assert r.spec_dict()["class_name"] == "pkg.Cls" and r.name == "a-name" and r.host == "h1:1"


async def test_moving_an_agent_updates_both_hosts_loads(registry):
    await beat(registry, "h1:1")
    await beat(registry, "h2:1")
    await registry.claim_agent(rec("g", "a", "h1:1"), exclusive=False)
    await registry.claim_agent(rec("g", "a", "h2:1"), exclusive=False)
    loads = {h.address: h.agents for h in await registry.list_hosts()}
    assert loads == {"h1:1": 0, "h2:1": 1}


async def test_exclusive_claim_refuses_an_agent_owned_by_a_live_host(registry):
    await beat(registry, "h1:1")
    await beat(registry, "h2:1")
    assert (await registry.claim_agent(rec("g", "a", "h1:1"))).ok
    result = await registry.claim_agent(rec("g", "a", "h2:1"))
    assert not result.ok and result.owner == "h1:1"
    # once h1's lease is gone the agent may move
    await registry.remove_host("h1:1")
    assert (await registry.claim_agent(rec("g", "a", "h2:1"))).ok


async def test_concurrent_exclusive_claims_have_one_winner(registry):
    hosts = [f"h{i}:1" for i in range(8)]
    for h in hosts:
        await beat(registry, h)
    results = await asyncio.gather(*(registry.claim_agent(rec("g", "a", h)) for h in hosts))
    assert sum(r.ok for r in results) == 1


async def test_update_is_fenced_to_the_owner(registry):
    await registry.claim_agent(rec("g", "a", "h1:1"))
    assert not await registry.update_agent(AgentKey("g", "a"), "h2:1", state=AgentState.FAILED)
    assert await registry.update_agent(AgentKey("g", "a"), "h1:1", state=AgentState.FAILED, exit_code=-9)
    r = await registry.get_agent(AgentKey("g", "a"))
    assert r.state == AgentState.FAILED and r.exit_code == -9
    assert not await registry.is_agent_running(AgentKey("g", "a"))


async def test_remove_by_a_non_owner_keeps_the_owners_entry(registry):
    await beat(registry, "h1:1")
    await registry.claim_agent(rec("g", "a", "h1:1"))
    assert not await registry.remove_agent(AgentKey("g", "a"), "h2:1")
    assert await registry.is_agent_running(AgentKey("g", "a"))


async def test_heartbeat_reports_missing_and_lost_agents(registry):
    a, b, c = (AgentKey("g", x) for x in "abc")
    await beat(registry, "h1:1")
    await beat(registry, "h2:1")
    await registry.claim_agent(rec("g", "a", "h1:1"))
    await registry.claim_agent(rec("g", "b", "h2:1"))  # b belongs to h2 now
    result = await beat(registry, "h1:1", [a, b, c])
    assert result.missing == [c] and result.lost == [b] and not result.host_was_missing


async def test_ttl_expires_entries_that_are_not_renewed(redis_url, key_prefix):
    async with LocationRegistry(redis_url, key_prefix, agent_ttl_s=0.3, lease_s=0.3) as reg:
        await beat(reg, "h1:1")
        await reg.claim_agent(rec("g", "a", "h1:1"))
        await eventually(lambda: reg.list_hosts(), timeout=0.1, what="host listed")  # listed while fresh
        await eventually(lambda: _empty(reg), timeout=5, what="entries expired")
        # expired guild members were pruned; the dead host waits for a reaper
        assert await reg.redis.scard(reg.keys.guild_agents("g")) == 0
        assert await reg.reap_dead_hosts("other:1") == ["h1:1"]
        assert await reg.redis.scard(reg.keys.hosts) == 0


async def _empty(reg) -> bool:
    return not await reg.list_guild("g") and not await reg.list_hosts()


async def test_heartbeat_after_redis_lost_everything_says_so(registry):
    await beat(registry, "h1:1")
    await registry.claim_agent(rec("g", "a", "h1:1"))
    await registry.redis.flushdb()
    result = await beat(registry, "h1:1", [AgentKey("g", "a")])
    assert result.host_was_missing and result.missing == [AgentKey("g", "a")]


async def test_ids_with_separators_do_not_collide(registry):
    await registry.claim_agent(rec("g:x", "a", "h1:1"))
    await registry.claim_agent(rec("g", "x:a", "h1:1"))
    assert [r.agent_id for r in await registry.list_guild("g:x")] == ["a"]
    assert [r.agent_id for r in await registry.list_guild("g")] == ["x:a"]
    await registry.claim_agent(rec("gü é/%", "ä b", "h 1:1"))
    assert [r.agent_id for r in await registry.list_guild("gü é/%")] == ["ä b"]


async def test_draining_hosts_are_listed_with_their_state(registry):
    await beat(registry, "h1:1", state=HostState.DRAINING)
    [h] = await registry.list_hosts()
    assert h.state == HostState.DRAINING and not h.accepts_agents


async def test_desired_state_round_trips(registry):
    from rustic_ai.k8s.base.models import LaunchRequest

    req = LaunchRequest(guild_spec={"id": "g"}, agent_spec={"id": "a"}, messaging_config={})
    await registry.set_desired(req)
    assert (await registry.desired("g"))["a"] == req
    await registry.clear_desired(AgentKey("g", "a"))
    assert await registry.desired("g") == {}


async def test_unreachable_redis_is_a_clear_error(key_prefix):
    from support.redis_server import free_port

    async with LocationRegistry(f"redis://127.0.0.1:{free_port()}/0", key_prefix, socket_timeout_s=0.5) as reg:
        with pytest.raises(RegistryUnavailableError, match="Redis unreachable during is_agent_running"):
            await reg.is_agent_running(AgentKey("g", "a"))


async def test_agents_of_a_host_whose_lease_lapsed_are_not_running(registry):
    await beat(registry, "h1:1")
    await registry.claim_agent(rec("g", "a", "h1:1"))
    assert await registry.is_agent_running(AgentKey("g", "a"))
    await registry.redis.delete(registry.keys.host("h1:1"))  # the lease runs out
    assert not await registry.is_agent_running(AgentKey("g", "a"))
    [r] = await registry.list_guild("g")
    assert not r.host_alive and not r.is_live


async def test_reaping_a_dead_host_queues_its_agents_exactly_once(registry):
    for reaper in ("live:1", "x:1", "y:1"):  # registered before the dead host last renewed: it knew them all
        await beat(registry, reaper)
    await beat(registry, "dead:1")
    for a in ("a", "b"):
        await registry.claim_agent(rec("g", a, "dead:1"))
    await registry.redis.delete(registry.keys.host("dead:1"))  # its lease lapses
    reaped = await asyncio.gather(*(registry.reap_dead_hosts(r) for r in ("live:1", "x:1", "y:1")))
    assert sorted(sum(reaped, [])) == ["dead:1"]  # one reaper won
    orphans = await registry.pop_orphans(10)
    assert sorted(orphans) == [AgentKey("g", "a"), AgentKey("g", "b")]
    assert await registry.pop_orphans(10) == []
    assert [h.address for h in await registry.list_hosts()] == ["live:1", "x:1", "y:1"]


async def test_a_host_never_reaps_itself(registry):
    await registry.redis.sadd(registry.keys.hosts, "me:1")  # listed, lease gone
    assert await registry.reap_dead_hosts("me:1") == []


async def test_desired_state_is_restored_without_overwriting(registry):
    from rustic_ai.k8s.base.models import LaunchRequest

    old = LaunchRequest(guild_spec={"id": "g"}, agent_spec={"id": "a"}, messaging_config={}, machine_id=1)
    new = old.model_copy(update={"machine_id": 2})
    assert await registry.set_desired_if_missing(old)
    assert not await registry.set_desired_if_missing(new)
    assert (await registry.desired_request(AgentKey("g", "a"))).machine_id == 1


async def test_setting_the_state_of_a_host_whose_lease_lapsed_does_not_revive_it(registry):
    # A lease hash re-created without a TTL would make a dead host look alive forever:
    # never reaped, its agents counted as running.
    await beat(registry, "other:1")  # the reaper, known to h1 when h1 last renewed
    await beat(registry, "h1:1")
    await registry.claim_agent(rec("g", "a", "h1:1"))
    await registry.redis.delete(registry.keys.host("h1:1"))  # its lease lapses
    assert not await registry.set_host_state("h1:1", HostState.DRAINING)  # a late call of its drain
    assert not await registry.is_agent_running(AgentKey("g", "a"))
    assert await registry.reap_dead_hosts("other:1") == ["h1:1"]
    await beat(registry, "h2:1")
    assert await registry.set_host_state("h2:1", HostState.DRAINING)
    [h] = [h for h in await registry.list_hosts() if h.address == "h2:1"]
    assert h.state == HostState.DRAINING


async def test_a_reaper_the_dead_host_never_heard_of_waits_out_its_hold(registry):
    # h1 renewed (with a 60 s hold limit) before "late:1" ever registered: h1 may be holding
    # its agents on its peers' word that Redis is gone, and never asked late:1. Reaping it at
    # once could start a second copy.
    await registry.heartbeat(HostRecord("old:1", capacity=10, state=HostState.SERVING), [])
    await registry.heartbeat(HostRecord("h1:1", capacity=10, state=HostState.SERVING), [], hold_max_s=60)
    await registry.claim_agent(rec("g", "held", "h1:1"))
    await beat(registry, "late:1")
    await registry.redis.delete(registry.keys.host("h1:1"))
    assert await registry.reap_dead_hosts("late:1") == []
    assert await registry.reap_dead_hosts("unregistered:1") == []
    assert await registry.reap_dead_hosts("old:1") == ["h1:1"]  # old:1 was in h1's view: h1 asked it


async def test_a_reap_that_reaches_redis_late_does_nothing(registry):
    await beat(registry, "r:1")
    await beat(registry, "d:1")
    await registry.claim_agent(rec("g", "late", "d:1"))
    await registry.redis.delete(registry.keys.host("d:1"))
    now_ms = int(time.time() * 1000)
    # Sent "5 s ago" by the reaper's reckoning, valid for 1 s: it waited out a Redis pause.
    assert await registry.reap_dead_hosts("r:1", sent_ms=now_ms - 5000, validity_ms=1000) == []
    assert await registry.reap_dead_hosts("r:1", sent_ms=now_ms - 200, validity_ms=1000) == ["d:1"]


async def test_the_renewal_names_live_peers_and_redis_time(registry):
    await beat(registry, "p1:1")
    await beat(registry, "p2:1")
    result = await beat(registry, "me:1")
    assert result.peers == ("p1:1", "p2:1")
    assert abs(result.redis_ms - time.time() * 1000) < 5000
    await registry.redis.delete(registry.keys.host("p2:1"))  # lapsed peers are not asked for a hold
    assert (await beat(registry, "me:1")).peers == ("p1:1",)
