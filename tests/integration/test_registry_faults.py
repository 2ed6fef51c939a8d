"""The registry when things break between two steps: lost replies, hosts that die mid-way,
stops that race adoptions. Each test names what would be lost or resurrected without the fix.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from rustic_ai.k8s.base.errors import RegistryUnavailableError
from rustic_ai.k8s.base.models import AgentKey
from rustic_ai.k8s.registry import ClaimResult, LocationRegistry
from support.proxy import CuttableProxy
from support.registry_records import beat, rec

A, B, C = (AgentKey("g", x) for x in "abc")


@pytest.fixture
def key_prefix() -> str:
    """These tests look at the fleet-wide orphan queue: each gets its own namespace."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def registry(redis_url, key_prefix):
    async with LocationRegistry(redis_url, key_prefix, agent_ttl_s=60, lease_s=60) as reg:
        for host in ("h1:1", "h2:1", "other:1", "warm:1"):  # only a host with a lease may adopt
            await beat(reg, host)
        yield reg


@pytest.fixture
def proxy(redis_server):
    p = CuttableProxy(redis_server.port).start()
    yield p
    p.close()


@pytest.fixture
async def proxied(proxy, key_prefix):
    """A registry whose replies the test can lose on the wire (same Redis, same namespace)."""
    async with LocationRegistry(f"redis://127.0.0.1:{proxy.port}/0", key_prefix, agent_ttl_s=60, lease_s=60,
                                socket_timeout_s=2) as reg:
        await reg.ping()  # connected and handshaken: the next reply lost is the command's own
        yield reg


async def _queue(reg) -> list[AgentKey]:
    from rustic_ai.k8s.registry import Keys

    return [Keys.parse_member(m) for m in await reg.redis.lrange(reg.keys.orphans, 0, -1)]


async def _adopting(reg, host) -> list[AgentKey]:
    from rustic_ai.k8s.registry import Keys

    return [Keys.parse_member(m) for m in await reg.redis.lrange(reg.keys.host_adopting(host), 0, -1)]


# -- the orphan queue never loses an agent ----------------------------------------------------


async def test_a_pop_whose_reply_is_lost_still_hands_over_the_batch(registry, proxied, proxy):
    await registry.push_orphans([A, B])
    await registry.pop_orphans(0, "warm:1")  # loads the script, so the lost reply is the pop's own
    proxy.lose_next_reply()
    # The pop ran in Redis, its reply was dropped, the client retried on a new connection:
    # the retry must return what the first attempt moved, not an empty queue.
    assert sorted(await proxied.pop_orphans(10, "h1:1")) == [A, B]
    assert proxy.replies_lost == 1


async def test_a_pop_that_failed_outright_returns_its_batch_on_the_next_call(registry, proxied, proxy):
    await registry.push_orphans([A, B])
    await registry.pop_orphans(0, "warm:1")
    proxy.lose_next_reply(times=10)  # more than the client's retries: the call fails
    with pytest.raises(RegistryUnavailableError, match="pop_orphans"):
        await proxied.pop_orphans(10, "h1:1")
    assert sorted(await registry.pop_orphans(10, "h1:1")) == [A, B]


async def test_orphans_of_a_host_that_dies_before_adopting_go_back_to_the_queue(registry):
    await beat(registry, "adopter:1")
    await registry.push_orphans([A, B])
    assert sorted(await registry.pop_orphans(10, "adopter:1")) == [A, B]
    await registry.redis.delete(registry.keys.host("adopter:1"))  # dies, its lease lapses, no ack
    assert await registry.reap_dead_hosts("other:1") == ["adopter:1"]
    assert sorted(await registry.pop_orphans(10, "other:1")) == [A, B]
    assert await _adopting(registry, "adopter:1") == []


async def test_a_draining_hosts_unfinished_adoptions_go_back_to_the_queue(registry):
    await beat(registry, "drains:1")
    await registry.push_orphans([A, B])
    await registry.pop_orphans(10, "drains:1")
    await registry.ack_orphans([A], "drains:1")  # adopted A, then drains before B
    assert await registry.remove_host("drains:1") == 1
    assert await registry.pop_orphans(10, "other:1") == [B]


async def test_acked_orphans_are_not_returned_again_unacked_ones_are(registry):
    await registry.push_orphans([A, B])
    assert sorted(await registry.pop_orphans(10, "h1:1")) == [A, B]
    assert await registry.ack_orphans([A], "h1:1") == 1
    assert await registry.pop_orphans(10, "h1:1") == [B]
    await registry.ack_orphans([B], "h1:1")
    assert await registry.pop_orphans(10, "h1:1") == []


async def test_pop_returns_at_most_count_and_a_smaller_count_gives_the_rest_back(registry):
    await registry.push_orphans([A, B, C])
    assert await registry.pop_orphans(2, "h1:1") == [A, B]
    assert await registry.pop_orphans(2, "h1:1") == [A, B]  # not acked: the same two, nothing more
    assert await registry.pop_orphans(1, "h1:1") == [A]  # room shrank: B goes back, first in line
    assert await _queue(registry) == [B, C]
    assert await registry.pop_orphans(0, "h1:1") == []  # full: everything goes back
    assert await _queue(registry) == [A, B, C]


async def test_concurrent_pops_by_many_hosts_hand_each_orphan_to_one_host(registry):
    agents = [AgentKey("g", f"a{i}") for i in range(40)]
    await registry.push_orphans(agents)
    for i in range(10):
        await beat(registry, f"h{i}:1")
    batches = await asyncio.gather(*(registry.pop_orphans(5, f"h{i}:1") for i in range(10)))
    popped = [k for batch in batches for k in batch]
    assert sorted(popped) == sorted(agents) and len(popped) == len(set(popped))


async def test_an_empty_queue_pops_nothing(registry):
    assert await registry.pop_orphans(10, "h1:1") == []
    assert await registry.pop_orphans(0, "h1:1") == []
    assert await registry.pop_orphans(-1, "h1:1") == []
    assert await registry.ack_orphans([], "h1:1") == 0
    assert await registry.requeue_orphans([], "h1:1") == 0


async def test_ack_touches_only_the_named_hosts_adoptions(registry):
    await registry.push_orphans([A])
    await registry.pop_orphans(10, "h1:1")
    assert await registry.ack_orphans([A], "h2:1") == 0  # not h2's
    assert await registry.ack_orphans([B], "h1:1") == 0  # never popped
    assert await _adopting(registry, "h1:1") == [A]


async def test_an_agent_queued_twice_is_handed_out_once(registry):
    await registry.push_orphans([A])
    await registry.push_orphans([A])  # e.g. a drain's hand-off and a reap of the same host
    assert await registry.pop_orphans(10, "h1:1") == [A]
    await registry.ack_orphans([A], "h1:1")
    assert await registry.pop_orphans(10, "h1:1") == []


async def test_a_host_whose_lease_is_gone_takes_no_orphans(registry):
    # Once reaped nobody would give back what it took; it may adopt again after renewing.
    await registry.push_orphans([A])
    assert await registry.pop_orphans(10, "lapsed:1") == []
    assert await _queue(registry) == [A]
    await beat(registry, "lapsed:1")
    assert await registry.pop_orphans(10, "lapsed:1") == [A]


async def test_pop_without_a_host_still_works_for_old_callers(registry):
    await registry.push_orphans([A, B])
    assert await registry.pop_orphans(1) == [A]
    assert await registry.pop_orphans(10) == [B]


# -- reaping with a grace list; handing an agent off in one step ------------------------------


async def test_a_spared_host_is_not_reaped_until_the_reaper_stops_sparing_it(registry):
    await beat(registry, "slow:1")
    await registry.claim_agent(rec("g", "a", "slow:1"))
    await registry.redis.delete(registry.keys.host("slow:1"))  # lease lapsed, but it was promised time
    assert await registry.reap_dead_hosts("other:1", spare=["slow:1"]) == []
    assert await registry.reap_dead_hosts("other:1", spare="slow:1") == []  # one address, not its letters
    assert await _queue(registry) == [] and await registry.host_agents("slow:1") == [A]
    assert await registry.reap_dead_hosts("other:1", spare=("unrelated:1",)) == ["slow:1"]
    assert await _queue(registry) == [A]


async def test_the_reaper_still_never_reaps_itself_when_it_spares_others(registry):
    await registry.redis.sadd(registry.keys.hosts, "me:1")  # listed, lease gone
    assert await registry.reap_dead_hosts("me:1", spare=["x:1"]) == []


async def test_hand_off_removes_the_agent_and_queues_it_in_one_step(registry):
    await beat(registry, "drains:1")
    await registry.claim_agent(rec("g", "a", "drains:1"))
    assert await registry.hand_off_agent(A, "drains:1")
    assert await registry.get_agent(A) is None and await registry.list_guild("g") == []
    assert {h.address: h.agents for h in await registry.list_hosts()}["drains:1"] == 0
    assert await registry.pop_orphans(10, "h1:1") == [A]


async def test_hand_off_of_an_agent_another_host_owns_changes_nothing(registry):
    await registry.claim_agent(rec("g", "a", "h2:1"))
    assert not await registry.hand_off_agent(A, "h1:1")
    assert (await registry.get_agent(A)).host == "h2:1" and await registry.is_agent_running(A)
    assert await _queue(registry) == []


async def test_hand_off_of_an_unknown_agent_queues_nothing(registry):
    assert not await registry.hand_off_agent(A, "h1:1")
    assert await _queue(registry) == []


async def test_a_hand_off_whose_reply_is_lost_answers_true_and_queues_once(registry, proxied, proxy):
    await registry.claim_agent(rec("g", "a", "h1:1"))
    await registry.hand_off_agent(B, "h1:1")  # loads the script, so the lost reply is the hand-off's own
    proxy.lose_next_reply()
    # The first attempt removed and queued the agent; the client's retry finds it queued.
    assert await proxied.hand_off_agent(A, "h1:1")
    assert proxy.replies_lost == 1
    assert await _queue(registry) == [A]


# -- a stop racing an adoption does not resurrect the agent -----------------------------------


def _request(guild: str, agent: str):
    from rustic_ai.k8s.base.models import LaunchRequest

    return LaunchRequest(guild_spec={"id": guild}, agent_spec={"id": agent}, messaging_config={})


async def test_a_claim_that_requires_desired_state_is_refused_once_it_is_cleared(registry):
    await registry.set_desired(_request("g", "a"))
    await registry.clear_desired(A)  # the engine stopped it
    result = await registry.claim_agent(rec("g", "a", "h1:1"), require_desired=True)
    assert result == ClaimResult(ok=False, owner="", reason="not desired")
    assert await registry.get_agent(A) is None and await registry.list_guild("g") == []
    assert {h.address: h.agents for h in await registry.list_hosts()}["h1:1"] == 0


async def test_a_claim_that_requires_desired_state_succeeds_while_it_is_desired(registry):
    await registry.set_desired(_request("g", "a"))
    assert (await registry.claim_agent(rec("g", "a", "h1:1"), require_desired=True)).ok
    assert await registry.is_agent_running(A)


async def test_desired_state_is_checked_per_agent_and_only_when_asked(registry):
    await registry.set_desired(_request("g", "b"))  # another agent of the guild is desired
    assert not (await registry.claim_agent(rec("g", "a", "h1:1"), require_desired=True)).ok
    assert (await registry.claim_agent(rec("g", "a", "h1:1"))).ok  # a direct launch, as before


async def test_a_conflicting_claim_names_the_owner_and_why(registry):
    await registry.set_desired(_request("g", "a"))
    await registry.claim_agent(rec("g", "a", "h1:1"))
    result = await registry.claim_agent(rec("g", "a", "h2:1"), require_desired=True)
    assert not result.ok and result.owner == "h1:1" and result.reason == "owned by another live host"


async def test_an_engine_stop_between_an_adopters_read_and_its_claim_wins(registry, engine_settings):
    from rustic_ai.k8s import AsyncK8sEngine
    from support.redis_server import free_port

    dead = f"127.0.0.1:{free_port()}"  # the agent's host died; nothing listens there
    await registry.set_desired(_request("g", "a"))
    await registry.claim_agent(rec("g", "a", dead))
    # The adopter has read that the agent is wanted ...
    assert await registry.desired_request(A) is not None
    # ... then the engine stops it: clears the desired state, finds the copy's host gone ...
    async with AsyncK8sEngine(engine_settings, stop_agents_on_shutdown=False) as engine:
        await engine.stop_agent("g", "a")
    # ... and the adopter's claim, made on what it read, must not start it again.
    result = await registry.claim_agent(rec("g", "a", "h1:1"), require_desired=True)
    assert not result.ok and result.reason == "not desired"
    assert not await registry.is_agent_running(A) and await registry.desired("g") == {}


async def test_an_engine_stop_that_cannot_clear_desired_state_fails_and_stops_nothing(registry, engine_settings):
    from rustic_ai.k8s import AsyncK8sEngine
    from support.redis_server import free_port

    dead = f"127.0.0.1:{free_port()}"
    await registry.set_desired(_request("g", "a"))
    await registry.claim_agent(rec("g", "a", dead))
    async with AsyncK8sEngine(engine_settings, stop_agents_on_shutdown=False) as engine:
        async def unreachable(key):
            raise RegistryUnavailableError("Redis unreachable during clear_desired: test")

        engine.registry.clear_desired = unreachable
        # Stopping the copy while the agent stays desired would let an adopter start it again:
        # the stop must fail (the caller retries) instead of half-happening.
        with pytest.raises(RegistryUnavailableError, match="clear_desired"):
            await engine.stop_agent("g", "a")
    assert (await registry.get_agent(A)).host == dead
    assert await registry.desired_request(A) is not None


# -- Redis unreachable: every new call says so, by name ----------------------------------------

NEW_CALLS = {
    "pop_orphans": lambda reg: reg.pop_orphans(5, "h1:1"),
    "ack_orphans": lambda reg: reg.ack_orphans([A], "h1:1"),
    "requeue_orphans": lambda reg: reg.requeue_orphans([A], "h1:1"),
    "hand_off_agent": lambda reg: reg.hand_off_agent(A, "h1:1"),
    "claim_agent": lambda reg: reg.claim_agent(rec("g", "a", "h1:1"), require_desired=True),
    "reap_dead_hosts": lambda reg: reg.reap_dead_hosts("h1:1", spare=["h2:1"]),
    "remove_host": lambda reg: reg.remove_host("h1:1"),
}


@pytest.mark.parametrize("name", sorted(NEW_CALLS))
async def test_unreachable_redis_is_a_clear_error_for_the_orphan_calls(key_prefix, name):
    from support.redis_server import free_port

    async with LocationRegistry(f"redis://127.0.0.1:{free_port()}/0", key_prefix, socket_timeout_s=0.5) as reg:
        with pytest.raises(RegistryUnavailableError, match=f"Redis unreachable during {name}"):
            await NEW_CALLS[name](reg)


async def test_an_orphan_that_cannot_be_adopted_now_is_given_back_in_one_step(registry):
    await registry.push_orphans([A, B])
    await registry.pop_orphans(10, "h1:1")
    assert await registry.requeue_orphans([A], "h1:1") == 1  # e.g. the launch hit HostFullError
    assert await _queue(registry) == [A] and await _adopting(registry, "h1:1") == [B]
    assert await registry.requeue_orphans([A, C], "h1:1") == 0  # not h1's (any more): nothing queued twice
    assert await _queue(registry) == [A]
    assert await registry.pop_orphans(10, "h2:1") == [A]
