"""`rustic-k8s local`: a guild's agents across local agent hosts, exchanging messages.

An unchanged rusticai-core `Guild` builds `rustic_ai.k8s.K8sExecutionEngine` from its
class path; the engine finds the hosts through the registry. The relay agents pass a
baton around the ring over the Redis messaging backend and stamp host and pid at each
hop, so the output shows messages crossing hosts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.core.guild.guild import Guild
from rustic_ai.core.messaging import MessagingConfig

from ..demo.agents import ObserverAgent, RelayAgent
from .local_cluster import LocalCluster

SYNC_ENGINE = "rustic_ai.core.guild.execution.sync.sync_exec_engine.SyncExecutionEngine"


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_guild(cluster: LocalCluster, n_agents: int) -> tuple[Guild, ObserverAgent]:
    """Blocking: rusticai-core's Guild API is synchronous, so this runs in a worker thread."""
    os.environ.update(cluster.env)  # K8sExecutionEngine reads its settings from the environment
    messaging = MessagingConfig(
        backend_module="rustic_ai.redis.messaging.backend",
        backend_class="RedisMessagingBackend",
        backend_config={"redis_client": {"host": cluster.redis_host, "port": cluster.redis_port}},
    )
    guild = Guild(
        id=f"demo-{uuid.uuid4().hex[:6]}",
        name="Relay demo",
        description="a baton passed around agents on several hosts",
        messaging_config=messaging,
        execution_engine_clz="rustic_ai.k8s.K8sExecutionEngine",
        organization_id="demo-org",
    )
    for i in range(n_agents):
        t0 = time.perf_counter()
        spec = (
            AgentBuilder(RelayAgent)
            .set_id(f"relay-{i}")
            .set_name(f"Relay {i}")
            .set_description("passes the baton")
            .set_properties({"index": i, "ring_size": n_agents})
            .build_spec()
        )
        guild.launch_agent(spec)
        _say(f"launched relay-{i} in {(time.perf_counter() - t0) * 1000:.0f} ms")
    observer_spec = (
        AgentBuilder(ObserverAgent).set_id("observer").set_name("Observer").set_description("local observer")
        .build_spec()
    )
    observer = guild._add_local_agent(observer_spec)  # runs in this process, on the same messaging
    return guild, observer  # type: ignore[return-value]


async def run_demo(hosts: int, agents: int, launch_mode: str, stay: bool, *, capacity: int = 100,
                   redis_url: str | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    _say(f"starting a local cluster: Redis and {hosts} agent hosts ({launch_mode} launches)")
    async with LocalCluster(hosts, redis_url=redis_url, launch_mode=launch_mode, capacity=capacity,
                            on_progress=_say) as cluster:
        guild, observer = await asyncio.to_thread(run_guild, cluster, agents)
        try:
            records = await asyncio.to_thread(guild._get_execution_engine().list_agents, guild.id)  # type: ignore[attr-defined]
            names = {h.address: h.name for h in cluster.hosts}
            print(f"\n{'AGENT':<10} {'HOST':<8} {'ADDRESS':<22} {'PID':>7}  STATE")
            for r in sorted(records, key=lambda r: r.agent_id):
                print(f"{r.agent_id:<10} {names.get(r.host, '?'):<8} {r.host:<22} {r.pid:>7}  {r.state}")
            print()
            hops = agents * 2
            observer.start_baton(hops)
            _say(f"baton sent; waiting for {hops} hops")
            deadline = loop.time() + 20
            while not observer.finished and loop.time() < deadline and not stop.is_set():
                await asyncio.sleep(0.05)
            if not observer.finished:
                _say("the baton did not come back within 20 s")
                return 1
            for hop, stamp in enumerate(observer.finished[0], 1):
                print(f"  hop {hop:>2}: {stamp['agent']:<10} on {names.get(stamp['host'], stamp['host'])} "
                      f"({stamp['host']}) pid {stamp['pid']}")
            used = {s["host"] for s in observer.finished[0]}
            _say(f"the baton crossed {len(used)} hosts and {len({s['pid'] for s in observer.finished[0]})} processes")
            if stay:
                # The operator CLI reads the same variables as the engine (flags win).
                env = " ".join(f"{k}={v}" for k, v in cluster.env.items())
                print(f"\ncluster running; inspect it from another terminal with:\n  export {env}\n"
                      "  rustic-k8s hosts\n  rustic-k8s agents\nCtrl-C stops everything.", flush=True)
                await stop.wait()
        finally:
            _say("stopping: agents, hosts, Redis")
            await asyncio.to_thread(guild.shutdown)
    _say("stopped; no process left behind")
    return 0
