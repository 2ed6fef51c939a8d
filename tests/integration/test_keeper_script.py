"""The engine keeper's script (registry ``keep_agents``) against a real redis-server.

What the keeper may do to an agent its engine launched: write back the desired state that
Redis lost with its data, and queue the agent for adoption only when no record, no queue
entry and no host lease of it has existed for longer than the hosts' lease. The checks
here read Redis itself (the orphan queue, the desired hash), not what the script answers.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from rustic_ai.k8s.base.models import AgentKey, LaunchRequest
from rustic_ai.k8s.engine.keeper import MAX_PUSHES, Keeper
from rustic_ai.k8s.registry import LocationRegistry
from support.eventually import eventually
from support.registry_records import beat, rec

LEASE_S = 0.5  # the hosts' lease these tests record (short: "missing for longer than it" comes quickly)


@pytest.fixture
async def registry(redis_url, key_prefix):
    async with LocationRegistry(redis_url, f"{key_prefix}-{uuid.uuid4().hex[:6]}", agent_ttl_s=60,
                                lease_s=LEASE_S) as reg:
        yield reg


def request(agent: str) -> LaunchRequest:
    return LaunchRequest(guild_spec={"id": "g"}, agent_spec={"id": agent}, messaging_config={})


async def keep(registry, wanted, epoch="e"):
    """One round; the epoch is the one already in Redis unless the caller says otherwise."""
    if epoch == "e":
        epoch = await registry.redis.get(registry.keys.epoch) or ""
    result = await registry.keep_agents(wanted, epoch, fallback_lease_s=60, margin_s=0)
    return result, {k.key.agent_id: k for k in result.agents}


async def queued(registry) -> list[str]:
    return await registry.redis.lrange(registry.keys.orphans, 0, -1)


async def wipe(registry) -> None:
    """Redis restarted empty, for this fleet's keys."""
    keys = [k async for k in registry.redis.scan_iter(f"{registry.keys.prefix}:*")]
    if keys:
        await registry.redis.delete(*keys)


async def test_an_agent_with_a_record_is_never_queued_and_a_move_is_reported(registry):
    await beat(registry, "h2:1")
    await registry.set_desired(request("a"))
    assert (await registry.claim_agent(rec("g", "a", "h2:1"))).ok
    for _ in range(3):
        _, by_id = await keep(registry, [(request("a"), "h1:1")])  # the engine last saw it on h1
        assert (by_id["a"].status, by_id["a"].owner) == ("running", "h2:1")
    assert await queued(registry) == []


async def test_an_agent_missing_past_the_lease_is_queued_once(registry):
    await registry.set_desired(request("a"))
    await beat(registry, "h2:1")  # an adopter; h1, the agent's host, has no lease
    first, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "missing" and first.wait_s == pytest.approx(LEASE_S)
    assert await queued(registry) == []

    async def pushed():
        await beat(registry, "h2:1")
        _, by_id = await keep(registry, [(request("a"), "h1:1")])
        return by_id["a"].status == "pushed"

    await eventually(pushed, timeout=5, interval=0.05, what="the agent queued")
    member = registry.keys.member(AgentKey("g", "a"))
    assert await queued(registry) == [member]
    # Taken by a host (its adopting list) or still on the queue: never pushed again.
    for _ in range(2):
        _, by_id = await keep(registry, [(request("a"), "h1:1")])
        assert by_id["a"].status == "queued"
    assert await registry.pop_orphans(1, "h2:1") == [AgentKey("g", "a")]
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "queued"
    assert await queued(registry) == []
    assert await registry.redis.lrange(registry.keys.host_adopting("h2:1"), 0, -1) == [member]


async def test_an_agent_the_keeper_gave_up_on_is_not_queued(registry):
    await registry.set_desired(request("a"))
    await beat(registry, "h2:1")
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "missing"
    await asyncio.sleep(LEASE_S + 0.1)  # past the wait, so only no_push keeps it off the queue
    await beat(registry, "h2:1")
    epoch = await registry.redis.get(registry.keys.epoch)
    result = await registry.keep_agents([(request("a"), "h1:1")], epoch, fallback_lease_s=60, margin_s=0,
                                        no_push=[AgentKey("g", "a")])
    assert result.agents[0].status == "missing"
    assert await queued(registry) == []


async def test_not_queued_while_its_host_has_a_lease_or_nobody_could_adopt_it(registry):
    await registry.set_desired(request("a"))
    # Nobody has a lease: a hold every host shares may be keeping a copy alive.
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "no_adopter"
    # Its own host renewed (it re-registers the agent at once): the clock does not run.
    await beat(registry, "h1:1")
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "host_alive"
    assert await registry.redis.hgetall(registry.keys.keeper_missing) == {}
    assert await queued(registry) == []


async def test_an_agent_that_came_back_restarts_the_clock(registry):
    await registry.set_desired(request("a"))
    await beat(registry, "h2:1")
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "missing"
    assert (await registry.claim_agent(rec("g", "a", "h3:1"), exclusive=False)).ok
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "running"
    await registry.remove_agent(AgentKey("g", "a"))
    await beat(registry, "h2:1")
    before = await registry.redis.time()
    _, by_id = await keep(registry, [(request("a"), "h1:1")])
    assert by_id["a"].status == "missing"
    since = int(await registry.redis.hget(registry.keys.keeper_missing, registry.keys.member(AgentKey("g", "a"))))
    assert since >= before[0] * 1000 + before[1] // 1000, "the missing clock kept its first start"


async def test_desired_state_lost_with_the_data_is_written_back_and_a_stop_is_respected(registry):
    await registry.set_desired(request("a"))
    await registry.set_desired(request("b"))
    await beat(registry, "h1:1")
    for agent in ("a", "b"):
        assert (await registry.claim_agent(rec("g", agent, "h1:1"))).ok
    wanted = [(request("a"), "h1:1"), (request("b"), "h1:1")]
    first, _ = await keep(registry, wanted, epoch="")
    # Stopped elsewhere while Redis kept its data: the entry stays cleared and the engine forgets it.
    await registry.clear_desired(AgentKey("g", "b"))
    _, by_id = await keep(registry, wanted, epoch=first.epoch)
    assert by_id["b"].status == "gone" and not by_id["b"].restored
    assert set(await registry.desired("g")) == {"a"}

    await wipe(registry)
    after, by_id = await keep(registry, [(request("a"), "h1:1")], epoch=first.epoch)
    assert after.epoch != first.epoch
    assert by_id["a"].restored
    assert await registry.desired_request(AgentKey("g", "a")) == request("a")
    # The next round knows the new epoch: nothing is written back twice.
    _, by_id = await keep(registry, [(request("a"), "h1:1")], epoch=after.epoch)
    assert not by_id["a"].restored


async def test_a_first_round_after_a_wipe_writes_nothing_back(registry):
    """Without an epoch seen before, a missing entry may be a loss or a stop: left alone (the
    engine keeps the agent; the next round tells)."""
    _, by_id = await keep(registry, [(request("a"), "h1:1")], epoch="")
    assert by_id["a"].status == "unknown" and not by_id["a"].restored
    assert await registry.desired("g") == {}


async def test_a_stop_during_a_round_that_writes_desired_state_back_wins(registry):
    """The stop forgot the agent after the round read what to keep and before its script wrote
    the lost entry back: the keeper clears it again, so no adopter can resurrect the agent."""
    forgotten: list[AgentKey] = []
    keeper = Keeper(registry, interval_s=1.0, owned=lambda: [(request("a"), "h1:1")], wanted=lambda key: False,
                    moved=lambda key, host: None, gone=forgotten.append)
    await keeper.round()  # learns the epoch
    await wipe(registry)
    await keeper.round()
    assert await registry.desired("g") == {}
    assert keeper.restored == 0 and await queued(registry) == []


async def test_an_orphan_adopters_keep_dropping_is_queued_a_few_times_only(registry):
    """An adopter drops an orphan it cannot launch (a class that does not import): the keeper
    queues it again, but not for ever."""
    await registry.set_desired(request("a"))
    keeper = Keeper(registry, interval_s=1.0, owned=lambda: [(request("a"), "h1:1")], wanted=lambda key: True,
                    moved=lambda key, host: None, gone=lambda key: None)

    async def dropped_again() -> bool:
        await beat(registry, "h2:1")
        await keeper.round()
        taken = await registry.pop_orphans(8, "h2:1")
        await registry.ack_orphans(taken, "h2:1")  # as the reconciler does with a PermanentError
        return keeper.queued >= MAX_PUSHES

    await eventually(dropped_again, timeout=10, interval=0.05, what=f"{MAX_PUSHES} pushes")
    await asyncio.sleep(2 * LEASE_S)  # long past the wait again
    await beat(registry, "h2:1")
    await keeper.round()
    assert keeper.queued == MAX_PUSHES and await queued(registry) == []
