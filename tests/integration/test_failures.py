"""The failure model (docs/architecture.md): real hosts, real agents, a real Redis.

Leases are shortened (3 s) so the suite stays fast; the defaults are measured by
`scripts/dev bench --only failover` instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

from rustic_ai.k8s import AgentState, AsyncK8sEngine, RegistryUnavailableError
from support.eventually import eventually
from support.fleet import answers, live_copies, peers_known
from support.hosts import HostProcess, pid_alive, start_hosts
from support.probe import guild_spec, responder
from support.proxy import CuttableProxy
from support.redis_server import RedisServer

FAST = {
    "RUSTIC_AGENT_HOST_LEASE_S": "3",
    "RUSTIC_AGENT_HOST_LEASE_RENEW_S": "0.4",
    "RUSTIC_AGENT_HOST_FENCE_MARGIN_S": "0.6",
    "RUSTIC_AGENT_HOST_RESTART_BACKOFF_S": "0.2",
    "RUSTIC_AGENT_HOST_STOP_GRACE_S": "2",
}


@pytest.fixture(scope="module")
def redis_server():
    """This module restarts Redis, so it gets its own."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"f{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hosts(redis_url, prefix):
    started: list[HostProcess] = []

    def start(*names: str, env: dict[str, str] | None = None, url: str | None = None) -> list[HostProcess]:
        new = start_hosts(url or redis_url, prefix, list(names), env={**FAST, **(env or {})})
        started.extend(new)
        return new

    yield start
    for h in started:
        h.close()


@pytest.fixture
async def engine(redis_url, prefix, engine_settings):
    import dataclasses

    settings = dataclasses.replace(engine_settings, redis_url=redis_url, key_prefix=prefix)
    async with AsyncK8sEngine(settings) as eng:
        yield eng


def gid() -> str:
    return f"guild-{uuid.uuid4().hex[:8]}"


async def test_a_crashed_agent_is_restarted_with_backoff_then_marked_failed(hosts, engine, messaging,
                                                                           probe_factory):
    hosts("h1", env={"RUSTIC_AGENT_HOST_MAX_RESTARTS": "2"})
    g = guild_spec(gid())
    rec = await engine.run_agent(g, responder("crashy"), messaging)
    probe = probe_factory(g.id)
    pid = rec.pid
    for restart in (1, 2):
        os.kill(pid, signal.SIGKILL)
        info = await eventually(lambda: _restarted(engine, rec, restart), timeout=10, what=f"restart {restart}")
        assert info.pid != pid and pid_alive(info.pid)
        pid = info.pid
        assert await answers(probe, "crashy")
    os.kill(pid, signal.SIGKILL)
    info = await eventually(lambda: _failed(engine, rec), timeout=10, what="marked failed")
    assert info.exit_code == -signal.SIGKILL
    assert "gave up after 2 restarts" in info.reason
    assert info.output, "the failed agent's last output is kept"
    assert not await engine.is_agent_running(g.id, "crashy")
    registered = await engine.registry.get_agent(rec.key)
    assert registered.state == AgentState.FAILED and registered.exit_code == -signal.SIGKILL


async def _restarted(engine, rec, n):
    info = await engine.agent_info(rec.guild_id, rec.agent_id)
    return info if info.state == AgentState.RUNNING and info.restarts == n else None


async def _failed(engine, rec):
    info = await engine.agent_info(rec.guild_id, rec.agent_id, output_lines=20)
    return info if info.state == AgentState.FAILED else None


async def test_a_killed_host_s_agents_come_back_on_other_hosts_without_any_engine(
    hosts, engine_settings, redis_url, prefix, messaging, probe_factory
):
    import dataclasses

    a, b = hosts("a", "b")
    settings = dataclasses.replace(engine_settings, redis_url=redis_url, key_prefix=prefix)
    g = guild_spec(gid())
    async with AsyncK8sEngine(settings, stop_agents_on_shutdown=False) as first:  # the engine goes away
        records = [await first.run_agent(g, responder(f"r{i}"), messaging) for i in range(4)]
    on_a = [r for r in records if r.host == a.address]
    assert on_a, "placement used both hosts"
    a.kill()  # SIGKILL: no drain, no deregistration
    await eventually(lambda: not any(pid_alive(r.pid) for r in on_a), timeout=5, what="A's agents died with it")
    async with AsyncK8sEngine(settings) as second:
        async def all_on_b():
            agents = await second.list_agents(g.id)
            return len(agents) == 4 and all(r.host == b.address for r in agents)

        await eventually(all_on_b, timeout=15, what="A's agents placed again on B")
        probe = probe_factory(g.id)
        for r in records:
            assert await answers(probe, r.agent_id)
            assert await live_copies(second, [a, b], r.key) != []
        for r in records:
            assert len(await live_copies(second, [a, b], r.key)) == 1


async def test_a_partitioned_host_fences_itself_before_another_host_takes_over(
    hosts, redis_server, engine, messaging
):
    proxy = CuttableProxy(redis_server.port).start()
    try:
        [a] = hosts("a", url=f"redis://127.0.0.1:{proxy.port}/0")
        g = guild_spec(gid())
        rec = await engine.run_agent(g, responder("single"), messaging)
        assert rec.host == a.address
        [b] = hosts("b")
        await peers_known(engine.registry, [a.address, b.address])  # else A may hold on B's unknown word
        proxy.cut()  # A can no longer reach Redis; it stays alive and reachable over gRPC
        overlaps = 0
        deadline = time.monotonic() + 20
        moved = None
        while time.monotonic() < deadline:
            old_alive = pid_alive(rec.pid)
            current = await engine.registry.get_agent(rec.key)
            new_alive = current is not None and current.host == b.address and pid_alive(current.pid)
            overlaps += old_alive and new_alive
            if new_alive and not old_alive:
                moved = current
                break
            await asyncio.sleep(0.02)
        assert moved is not None, "the agent was not taken over by B"
        assert overlaps == 0, "two live copies existed at once"
        proxy.heal()  # A comes back: it must not start its fenced copy again
        await eventually(lambda: _a_renewed(engine, a), timeout=10, what="A serving again")
        for _ in range(10):
            assert len(await live_copies(engine, [a, b], rec.key)) == 1
            await asyncio.sleep(0.2)
    finally:
        proxy.close()


async def _a_renewed(engine, a) -> bool:
    return a.address in {h.address for h in await engine.registry.list_hosts()}


async def test_a_draining_host_hands_its_agents_over_and_engine_calls_do_not_fail(
    hosts, engine, messaging, probe_factory
):
    [a] = hosts("a")
    g = guild_spec(gid())
    records = [await engine.run_agent(g, responder(f"d{i}"), messaging) for i in range(3)]
    [b] = hosts("b")
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def keep_calling():
        i = 0
        while not stop.is_set():
            try:
                await engine.get_agents_in_guild(g.id)
                await engine.is_agent_running(g.id, "d0")
                extra = await engine.run_agent(g, responder(f"extra{i}"), messaging)
                assert extra.host == b.address
                await engine.stop_agent(g.id, f"extra{i}")
            except BaseException as exc:  # noqa: BLE001 - every failure is counted
                failures.append(exc)
            i += 1

    caller = asyncio.create_task(keep_calling())
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(a.proc.wait, 30)
    drain_s = time.monotonic() - t0
    assert code == 0 and drain_s < 25

    async def all_on_b():
        agents = await engine.list_agents(g.id)
        return {r.agent_id for r in agents if r.host == b.address} >= {"d0", "d1", "d2"}

    await eventually(all_on_b, timeout=15, what="agents moved to B")
    stop.set()
    await caller
    assert failures == []
    probe = probe_factory(g.id)
    for r in records:
        assert await answers(probe, r.agent_id)


async def test_redis_restarted_empty_hosts_reregister_and_agents_keep_running(
    hosts, engine, redis_server, messaging
):
    hosts("a", "b")
    g = guild_spec(gid())
    records = [await engine.run_agent(g, responder(f"k{i}"), messaging) for i in range(3)]
    redis_server.stop()
    with pytest.raises(RegistryUnavailableError, match="Redis"):
        await engine.is_agent_running(g.id, "k0")
    redis_server.start()  # same port, empty

    async def back():
        agents = {r.agent_id: r.pid for r in await engine.list_agents(g.id)}
        return agents == {r.agent_id: r.pid for r in records}

    await eventually(back, timeout=10, what="hosts re-registered the same processes")
    assert all(pid_alive(r.pid) for r in records)
    assert set(await engine.registry.desired(g.id)) == {"k0", "k1", "k2"}  # restored by the hosts


async def test_a_frozen_host_is_skipped_without_hanging(hosts, engine, messaging):
    a, b = hosts("a", "b")
    os.kill(a.pid, signal.SIGSTOP)  # alive, lease still valid, answers nothing
    try:
        g = guild_spec(gid())
        t0 = time.monotonic()
        placed = [await engine.run_agent(g, responder(f"z{i}"), messaging) for i in range(3)]
        assert all(r.host == b.address for r in placed)
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(a.pid, signal.SIGCONT)


async def test_concurrent_launches_of_one_agent_start_exactly_one_copy(hosts, engine_settings, redis_url, prefix,
                                                                        messaging):
    import dataclasses

    from rustic_ai.k8s import AgentAlreadyExistsError

    a, b, c = hosts("a", "b", "c")
    settings = dataclasses.replace(engine_settings, redis_url=redis_url, key_prefix=prefix, placement="round_robin")
    g = guild_spec(gid())
    async with AsyncK8sEngine(settings) as e1, AsyncK8sEngine(settings) as e2:
        # Two engines, round-robin from different starting points: the copies race on different hosts.
        results = await asyncio.gather(*(e.run_agent(g, responder("only"), messaging) for e in (e1, e2, e1, e2)),
                                       return_exceptions=True)
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, AgentAlreadyExistsError)]
        assert len(started) == 1 and len(refused) == 3, results
        assert len(await live_copies(e1, [a, b, c], started[0].key)) == 1
