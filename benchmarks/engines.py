"""One adapter per engine under test, so every scenario drives them the same way.

Each adapter is used from one asyncio task in a worker process of its own. rusticai-core's
engines are synchronous and are called directly (blocking the loop, which has nothing else
to do in their workers); rusticai-k8s's AsyncK8sEngine is awaited. In every case the
clock starts right before ``run_agent`` is called and the agents are the same
ResponderProbeAgent spec on the same Redis messaging backend.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
from typing import Any

from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.messaging import MessagingConfig

from .common import PrivateRedis, children_of, cmdline

ORG = "bench-org"
AGENT_MODULE = "rustic_ai.testing.execution.integration_agents"  # the module of the agents under test

LABELS = {
    "k8s-warm": "rusticai-k8s warm",
    "k8s-cold": "rusticai-k8s cold",
    "k8s-warm-preload": "rusticai-k8s warm+preload",
    "multiprocess": "MultiProcessExecutionEngine",
    "multithreaded": "MultiThreadedEngine",
    "ray": "RayExecutionEngine",
}


class Adapter(abc.ABC):
    key: str
    in_process = False  # agents live in this very process (memory is a delta of our PSS)
    redis_port: int
    messaging: MessagingConfig
    notes: list[str]

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def run_agent(self, guild: GuildSpec, agent: AgentSpec, machine_id: int) -> None: ...

    @abc.abstractmethod
    async def stop_agent(self, guild_id: str, agent_id: str) -> None: ...

    async def run_many(self, guild: GuildSpec, agents: list[AgentSpec]) -> list[BaseException | None]:
        """Several agents of one guild (memory scenario); one after the other unless overridden."""
        out: list[BaseException | None] = []
        for i, spec in enumerate(agents):
            try:
                await self.run_agent(guild, spec, machine_id=i + 1)
                out.append(None)
            except Exception as exc:
                out.append(exc)
        return out

    async def pids(self, guild_id: str, agent_ids: list[str]) -> dict[str, int]:
        """Process of each agent (not for in-process engines)."""
        return {}

    def extra_memory(self) -> dict[str, float]:
        """PSS of the engine's own helper processes, for context (MB)."""
        return {}


# -- rusticai-k8s ---------------------------------------------------------------------------------


class K8sAdapter(Adapter):
    def __init__(self, mode: str, hosts: int = 2, capacity: int = 100, preload: str = "") -> None:
        self.key = f"k8s-{mode}" + ("-preload" if preload else "")
        self.mode = mode
        self.n_hosts = hosts
        self.capacity = capacity
        self.preload = preload
        self.notes = [f"AsyncK8sEngine over a LocalCluster: {hosts} rustic-agent-host processes, launch_mode={mode}"]
        if preload:
            self.notes.append(f"RUSTIC_AGENT_HOST_PRELOAD={preload}")
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        from rustic_ai.k8s import AsyncK8sEngine, EngineSettings
        from rustic_ai.k8s.cli.local_cluster import LocalCluster

        host_env = {"RUSTIC_AGENT_HOST_PRELOAD": self.preload} if self.preload else {}
        self.cluster = LocalCluster(self.n_hosts, launch_mode=self.mode, capacity=self.capacity, host_env=host_env)
        await self._stack.enter_async_context(self.cluster)
        self.redis_port = self.cluster.redis_port
        from .common import redis_messaging

        self.messaging = redis_messaging(self.redis_port)
        settings = EngineSettings.from_env({}, redis_url=self.cluster.redis_url, key_prefix=self.cluster.key_prefix)
        self.engine = AsyncK8sEngine(settings, organization_id=ORG)
        await self._stack.enter_async_context(self.engine)

    async def close(self) -> None:
        await self._stack.aclose()

    async def run_agent(self, guild: GuildSpec, agent: AgentSpec, machine_id: int) -> None:
        await self.engine.run_agent(guild, agent, self.messaging, machine_id=machine_id)

    async def stop_agent(self, guild_id: str, agent_id: str) -> None:
        await self.engine.stop_agent(guild_id, agent_id)

    async def run_many(self, guild: GuildSpec, agents: list[AgentSpec]) -> list[BaseException | None]:
        requests = [self.engine.build_request(guild, a, self.messaging, machine_id=i + 1) for i, a in enumerate(agents)]
        results = await self.engine.launch_many(requests)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def pids(self, guild_id: str, agent_ids: list[str]) -> dict[str, int]:
        wanted = set(agent_ids)
        return {r.agent_id: r.pid for r in await self.engine.list_agents(guild_id) if r.agent_id in wanted and r.pid}

    def host_pids(self) -> dict[str, int]:
        return {h.name: h.pid for h in self.cluster.hosts}

    def forkserver_pids(self) -> dict[str, int]:
        out = {}
        for h in self.cluster.hosts:
            for child in children_of(h.pid):
                if "forkserver" in cmdline(child):
                    out[h.name] = child
        return out

    def extra_memory(self) -> dict[str, float]:
        from .common import pss_mb

        out = {}
        with contextlib.suppress(OSError):
            for name, pid in self.host_pids().items():
                out[f"{name}_host_process_mb"] = pss_mb(pid)
            for name, pid in self.forkserver_pids().items():
                out[f"{name}_fork_server_mb"] = pss_mb(pid)
        return out


# -- rusticai-core's engines ------------------------------------------------------------------------


class _PrivateRedisAdapter(Adapter):
    async def start(self) -> None:
        from .common import redis_messaging

        self.redis = PrivateRedis().start()
        self.redis_port = self.redis.port
        self.messaging = redis_messaging(self.redis_port)

    async def close(self) -> None:
        self.redis.close()


class _CoreEngineAdapter(_PrivateRedisAdapter):
    """rusticai-core's own synchronous engines, driven the same way."""

    async def close(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            await super().close()

    async def run_agent(self, guild: GuildSpec, agent: AgentSpec, machine_id: int) -> None:
        self.engine.run_agent(guild, agent, self.messaging, machine_id=machine_id)

    async def stop_agent(self, guild_id: str, agent_id: str) -> None:
        self.engine.stop_agent(guild_id, agent_id)


class MultiProcessAdapter(_CoreEngineAdapter):
    key = "multiprocess"

    def __init__(self) -> None:
        import multiprocessing

        self.notes = [
            f"multiprocessing start method {multiprocessing.get_start_method()}; the engine caps a guild at "
            f"cpu_count()={os.cpu_count()} agents, so every launch is stopped before the next"
        ]

    async def start(self) -> None:
        from rustic_ai.core.guild.execution.multiprocess import MultiProcessExecutionEngine

        await super().start()
        self.engine = MultiProcessExecutionEngine("bench", ORG)

    async def run_many(self, guild: GuildSpec, agents: list[AgentSpec]) -> list[BaseException | None]:
        # The memory scenario needs more idle agents than cpu_count(): lift the per-guild cap.
        self.engine.max_processes = max(self.engine.max_processes, len(agents) + 1)
        self.notes.append(f"memory scenario: max_processes raised to {self.engine.max_processes}")
        return await super().run_many(guild, agents)

    async def pids(self, guild_id: str, agent_ids: list[str]) -> dict[str, int]:
        return {a: p.pid for a, p in self.engine.processes.items() if a in agent_ids and p.pid}

    def extra_memory(self) -> dict[str, float]:
        from .common import pss_mb

        manager = getattr(self.engine.agent_tracker.manager, "_process", None)
        out = {}
        if manager is not None and manager.pid:
            with contextlib.suppress(OSError):
                out["manager_process_mb"] = pss_mb(manager.pid)
        return out


class MultiThreadedAdapter(_CoreEngineAdapter):
    key = "multithreaded"
    in_process = True

    def __init__(self) -> None:
        self.notes = ["agents are threads of the worker process: memory is its PSS growth per agent"]

    async def start(self) -> None:
        from rustic_ai.core.guild.execution.multithreaded.multithreaded_exec_engine import MultiThreadedEngine

        await super().start()
        self.engine = MultiThreadedEngine("bench", ORG)


def start_local_ray() -> list[str]:
    """A local Ray runtime set up the same way for every Ray measurement; returns notes on it."""
    # Before Ray is imported: with this off, Ray treats the machine as a one-node
    # "cluster" on 127.0.0.1 and binds every server (GCS, raylet, agents, workers)
    # to loopback instead of all interfaces.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # RayAgentWrapper installs a SimpleSpanProcessor with an OTLP exporter to
    # localhost:4318; with no collector there every span export retries for ~7 s
    # inside the agent, before it answers. Measured without tracing.
    os.environ["OTEL_SDK_DISABLED"] = "true"
    # Ray schedules an agent actor on 0.3 logical CPUs by default: six per two cores,
    # fewer than the memory scenario keeps idle at once. 0.1 lets 20 be scheduled.
    os.environ["RUSTIC_NUM_CPUS_PER_AGENT"] = "0.1"
    import ray

    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _node_ip_address="127.0.0.1",
    )
    return [f"local Ray {ray.__version__} started by ray.init() on 127.0.0.1 (not timed); "
            "RUSTIC_NUM_CPUS_PER_AGENT=0.1 so 10+ idle agents fit on 2 logical CPUs",
            "OTEL_SDK_DISABLED=true: RayAgentWrapper's OTLP span exporter has no collector here "
            "and would stall each reply ~7 s in export retries"]


class RayAdapter(_PrivateRedisAdapter):
    key = "ray"

    def __init__(self) -> None:
        self.notes = []

    async def start(self) -> None:
        await super().start()
        self.notes.extend(start_local_ray())
        from rustic_ai.ray.execution import RayExecutionEngine

        self.engine = RayExecutionEngine("bench", ORG)

    async def close(self) -> None:
        import ray

        try:
            with contextlib.suppress(Exception):
                self.engine.shutdown()
            if ray.is_initialized():
                ray.shutdown()
        finally:
            await super().close()

    async def run_agent(self, guild: GuildSpec, agent: AgentSpec, machine_id: int) -> None:
        self.engine.run_agent(guild, agent, self.messaging, machine_id=machine_id)

    async def stop_agent(self, guild_id: str, agent_id: str) -> None:
        self.engine.stop_agent(guild_id, agent_id)

    async def pids(self, guild_id: str, agent_ids: list[str]) -> dict[str, int]:
        import ray

        out = {}
        for agent_id in agent_ids:
            handle = self.engine.agent_wrappers.get(guild_id, {}).get(agent_id)
            if handle is not None:
                with contextlib.suppress(Exception):
                    out[agent_id] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=10)
        return out


def make_adapter(key: str, **kw: Any) -> Adapter:
    if key == "k8s-warm":
        return K8sAdapter("warm", **kw)
    if key == "k8s-cold":
        return K8sAdapter("cold", **kw)
    if key == "k8s-warm-preload":
        return K8sAdapter("warm", preload=AGENT_MODULE, **kw)
    if key == "multiprocess":
        return MultiProcessAdapter()
    if key == "multithreaded":
        return MultiThreadedAdapter()
    if key == "ray":
        return RayAdapter()
    raise ValueError(f"unknown engine {key!r}")


async def settle(seconds: float) -> None:
    """Lets agents go idle before memory is read."""
    await asyncio.sleep(seconds)
