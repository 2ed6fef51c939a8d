"""Chaos: random faults against a live fleet, with the exactly-once invariant checked throughout.

A fixed seed makes the fault order repeatable. Faults: kill an agent process, SIGKILL a
host (and start a replacement), SIGTERM a host (drain; start a replacement), restart
Redis empty, launch and stop agents concurrently. After each fault, and at the end:
every agent that should run is running exactly once; periodically, every one answers a
message. At the end: no process of the fleet is left and no registry key of a stopped
agent remains. Bounded: RUSTIC_K8S_CHAOS_FAULTS faults (default 20), each checkpoint
with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import uuid

import pytest

from rustic_ai.k8s import AsyncK8sEngine
from rustic_ai.k8s.base.models import AgentKey
from support.eventually import eventually
from support.fleet import live_copies, processes_with_env
from support.hosts import HostProcess, pid_alive, start_hosts
from support.probe import Probe, guild_spec, redis_messaging, responder
from support.redis_server import RedisServer

SEED = 20261127
FAULTS = int(os.environ.get("RUSTIC_K8S_CHAOS_FAULTS", "20"))
ENV = {
    "RUSTIC_AGENT_HOST_LEASE_S": "2",
    "RUSTIC_AGENT_HOST_LEASE_RENEW_S": "0.4",
    "RUSTIC_AGENT_HOST_FENCE_MARGIN_S": "0.6",
    "RUSTIC_AGENT_HOST_RESTART_BACKOFF_S": "0.1",
    "RUSTIC_AGENT_HOST_RESTART_BACKOFF_MAX_S": "0.5",
    "RUSTIC_AGENT_HOST_MAX_RESTARTS": "1000",  # this test is about exactly-once, not the limit
    "RUSTIC_AGENT_HOST_STOP_GRACE_S": "2",
}


class Fleet:
    def __init__(self, redis: RedisServer, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix
        self.hosts: list[HostProcess] = []
        self.serial = 0

    def start(self, n: int) -> None:
        names = [f"h{self.serial + i}" for i in range(n)]
        self.serial += n
        self.hosts += start_hosts(self.redis.url, self.prefix, names, env=ENV)

    @property
    def live(self) -> list[HostProcess]:
        return [h for h in self.hosts if h.proc.poll() is None]

    def close(self) -> None:
        for h in self.hosts:
            h.close()


@pytest.mark.timeout(420)
async def test_chaos_keeps_every_agent_running_exactly_once(engine_settings):
    rng = random.Random(SEED)
    prefix = f"chaos{uuid.uuid4().hex[:6]}"
    redis = RedisServer().start()
    fleet = Fleet(redis, prefix)
    messaging = redis_messaging(redis.port)
    settings = dataclasses.replace(engine_settings, redis_url=redis.url, key_prefix=prefix, discovery_refresh_s=0.2)
    g = guild_spec(f"chaos-{uuid.uuid4().hex[:6]}")
    probe = None
    log: list[str] = []
    try:
        fleet.start(3)
        async with AsyncK8sEngine(settings) as engine:
            wanted = {f"a{i}" for i in range(12)}
            results = await engine.launch_many(
                [engine.build_request(g, responder(a), messaging, machine_id=i) for i, a in enumerate(sorted(wanted))]
            )
            assert not [r for r in results if isinstance(r, BaseException)], results
            probe = Probe(g.id, messaging)
            await checkpoint(engine, fleet, g.id, wanted, probe, answer=True)
            next_id = 12
            for n in range(FAULTS):
                print(f"fault {n}: ", end="", flush=True)
                fault = rng.choice(["kill_agent", "kill_agent", "sigkill_host", "sigterm_host", "restart_redis",
                                    "launch_and_stop"])
                log.append(fault)
                print(fault, flush=True)
                if fault == "kill_agent":
                    victim = rng.choice(sorted(wanted))
                    rec = await eventually(lambda v=victim: engine.registry.get_agent(AgentKey(g.id, v)), timeout=10)
                    if rec.pid:
                        _kill(rec.pid)
                        # Check only once the kill has landed; a checkpoint in the instant
                        # before would see the old copy alive.
                        await eventually(lambda p=rec.pid: not pid_alive(p), timeout=5, what="victim gone")
                elif fault == "sigkill_host":
                    rng.choice(fleet.live).kill()
                    fleet.start(1)
                elif fault == "sigterm_host":
                    host = rng.choice(fleet.live)
                    fleet.start(1)  # the rolling-update order: new pod first, then the old one drains
                    assert await asyncio.to_thread(host.terminate, 30) == 0
                elif fault == "restart_redis":
                    redis.restart()
                else:
                    new = [f"a{next_id}", f"a{next_id + 1}"]
                    next_id += 2
                    gone = rng.sample(sorted(wanted), 2)
                    reqs = [engine.build_request(g, responder(a), messaging, machine_id=next_id) for a in new]
                    outcome = await asyncio.gather(engine.launch_many(reqs),
                                                   *(engine.stop_agent(g.id, a) for a in gone))
                    assert not [r for r in outcome[0] if isinstance(r, BaseException)], outcome[0]
                    wanted = (wanted - set(gone)) | set(new)
                await checkpoint(engine, fleet, g.id, wanted, probe, answer=(n % 5 == 4))
            await checkpoint(engine, fleet, g.id, wanted, probe, answer=True)
            for a in sorted(wanted):
                await engine.stop_agent(g.id, a)
            leftovers = [k async for k in engine.registry.redis.scan_iter(f"{prefix}:agent:*")]
            assert leftovers == [], "registry keys of stopped agents remain"
        assert len(log) >= 20 or FAULTS < 20
        counts = {f: log.count(f) for f in sorted(set(log))}
        print(f"\nchaos: {len(log)} faults {counts}; 0 duplicates, 0 lost agents; final agents {len(wanted)}")
    finally:
        if probe is not None:
            probe.close()
        fleet.close()
        redis.close()
    # No agent process, fork server or host of this fleet outlives it.
    await eventually(lambda: not processes_with_env(f"RUSTIC_K8S_KEY_PREFIX={prefix}"), timeout=10,
                     what=f"no orphan processes (faults: {log})")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def checkpoint(engine, fleet: Fleet, guild_id: str, wanted: set[str], probe, *, answer: bool) -> None:
    async def exactly_once() -> bool:
        running = {r.agent_id for r in await engine.list_agents(guild_id)}
        if running != wanted:
            return False
        for a in wanted:
            if len(await live_copies(engine, fleet.live, AgentKey(guild_id, a))) != 1:
                return False
        return True

    await eventually(exactly_once, timeout=30, interval=0.2, what=f"every agent running exactly once: {sorted(wanted)}")
    # A duplicate can never be transient-and-fine: check again right away, on every host.
    for a in wanted:
        copies = await live_copies(engine, fleet.live, AgentKey(guild_id, a))
        record = await engine.registry.get_agent(AgentKey(guild_id, a))
        assert len(copies) == 1, f"{a}: copies {copies}, registry {record}, hosts {[h.address for h in fleet.live]}"
    if answer:
        async def all_answer() -> bool:
            missing = [a for a in wanted if not probe.acks_from(a)]
            if missing:
                probe.hello()
            return not missing

        probe.clear()
        await eventually(all_answer, timeout=30, interval=0.5, what="every agent answering")
