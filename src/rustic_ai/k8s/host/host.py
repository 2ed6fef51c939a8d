"""The agent host: runs agents as OS processes and keeps the registry true about them.

`AgentHost` implements the protocol's `HostApi`; the grpc adapter in front of it turns
its errors into status codes. It owns, in start order: the registry client, the gRPC
server, the process manager (built once the advertised address is known), and three
tasks — the heartbeat (lease, TTLs, self-fencing), the reconciler (re-placing agents of
dead or draining hosts) and one restart timer per crashed agent.

`shutdown()` drains in fixed phases: state DRAINING (health NOT_SERVING, registry says
draining, new agents refused with UNAVAILABLE) → every agent stopped (SIGTERM, grace,
SIGKILL) and handed to the fleet's orphan queue, so other hosts start it again (stop
first, then start: never two live copies) → host removed from the registry (shielded
from cancellation) → server stopped → clients closed. Safe to call twice or before start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Self

from opentelemetry import propagate, trace

from ..base.allowlist import ALLOWED_MODULES_ENV, ModuleAllowList
from ..base.errors import (
    AgentAlreadyExistsError,
    AgentNotFoundError,
    GuildLimitError,
    HostFullError,
    HostUnavailableError,
    RegistryUnavailableError,
    RusticK8sError,
)
from ..base.logfields import agent_log_fields, set_host_field
from ..base.models import AgentKey, AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from ..base.restart import RestartPolicy, RestartTracker
from ..base.settings import HostSettings
from ..base.specs import parse_launch
from ..base.version import VERSION
from ..process import AgentProcess, AgentProcessManager
from ..protocol import GrpcHostServer
from ..protocol.tls import server_credentials
from ..registry import LocationRegistry
from .address import advertised_address
from .heartbeat import Heartbeat
from .metrics import AgentView, HostMetrics, HostView, MetricsServer
from .reconciler import Reconciler
from .watchdog import MIB, MemoryWatchdog

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("rustic_ai.k8s.host")

_FINISHED_KEPT = 1000  # exited agents remembered for GetAgentInfo/ListAgents


@dataclasses.dataclass
class _Agent:
    """What the host knows of one agent it owns, running or waiting to restart."""

    record: AgentRecord
    request: LaunchRequest
    tracker: RestartTracker
    restart_task: asyncio.Task | None = None
    kill_reason: str = ""  # why the host itself killed the process (memory limit); its exit is a crash


class AgentHost:
    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.name = settings.name or os.environ.get("HOSTNAME") or socket.gethostname()
        self.state = HostState.STARTING
        self.address = ""
        self.started_at = time.time()
        self.registry = LocationRegistry.from_settings(
            settings,
            agent_ttl_s=settings.agent_ttl_s,
            lease_s=settings.lease_s,
        )
        # Checked before a request's specs are parsed (parsing imports); agents check it again.
        self.allowlist = ModuleAllowList(settings.allowed_modules)
        self.metrics = HostMetrics()
        self.metrics.view = self._metrics_view
        self.metrics_server = MetricsServer(self.metrics, settings.metrics_listen) if settings.metrics_listen else None
        # Rebuilt in start() once the advertised address is known (agents get it in
        # their environment); this one only answers health() and listings before that.
        self.processes = self._new_process_manager()
        credentials = (
            server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls else None
        )
        self.server = GrpcHostServer(self, settings.listen, max_message_bytes=settings.max_message_bytes,
                                     credentials=credentials, health_listen=settings.health_listen,
                                     observer=self.metrics.observe_call)
        self.watchdog = (
            MemoryWatchdog(limit_bytes=settings.agent_memory_mb * MIB, interval_s=settings.memory_check_s,
                           agents=self._running_pids, on_over=self._over_memory_limit)
            if settings.agent_memory_mb else None
        )
        self.default_restart = RestartPolicy(
            max_restarts=settings.max_restarts,
            window_s=settings.restart_window_s,
            backoff_initial_s=settings.restart_backoff_s,
            backoff_max_s=settings.restart_backoff_max_s,
        )
        self.heartbeat = Heartbeat(
            self.registry,
            lease_s=settings.lease_s,
            renew_s=settings.lease_renew_s,
            fence_margin_s=settings.fence_margin_s,
            agents_every_s=settings.heartbeat_s,
            host_record=self.health,
            agents=lambda: list(self._agents),
            on_missing=self._reregister,
            on_lost=self._stop_lost,
            on_fence=self._fence,
            on_recover=self._recover_fenced,
            on_drain_requested=self._drain_requested,
        )
        self.reconciler = Reconciler(
            self.registry,
            address=lambda: self.address,
            interval_s=settings.lease_renew_s,
            free_slots=self._free_slots,
            adopt=self.create_agent,
        )
        self._agents: dict[AgentKey, _Agent] = {}  # owned: running, starting or waiting to restart
        self._finished: collections.OrderedDict[AgentKey, AgentRecord] = collections.OrderedDict()
        self._fenced: dict[AgentKey, LaunchRequest] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._stopped = asyncio.Event()
        self._shutdown_lock = asyncio.Lock()
        # Set when an operator asks this host to drain; the entry point then shuts down
        # exactly as on SIGTERM.
        self.drain_requested = asyncio.Event()
        self.drain_reason = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.settings.tls:
            log.warning("serving gRPC in plain text on %s: anyone who can reach it can run code on this host; "
                        "set RUSTIC_AGENT_HOST_TLS_CERT_FILE, _TLS_KEY_FILE and _TLS_CLIENT_CA_FILE for mutual TLS "
                        "(README, Security)", self.settings.listen)
        await self.registry.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        port = await self.server.start()  # create_agent refuses until state is SERVING
        self.address = await advertised_address(self.settings.listen, port, self.settings.advertise)
        set_host_field(self.address)
        self.processes = self._new_process_manager({
            "RUSTIC_AGENT_HOST_ADDRESS": self.address,
            "RUSTIC_AGENT_HOST_LEARN_PRELOAD": "1" if self.settings.learn_preload else "0",  # read by the fork server
        })
        await self.processes.start()
        self.state = HostState.SERVING
        await self.heartbeat.beat()  # register at once; a Redis outage here is retried by the loop
        self._spawn(self.heartbeat.run(), "heartbeat")
        self._spawn(self.reconciler.run(), "reconciler")
        if self.watchdog is not None:
            self._spawn(self.watchdog.run(), "memory-watchdog")
        log.info("agent host %s serving on %s (capacity %d, %s launches, version %s)", self.name, self.address,
                 self.settings.capacity, self.settings.launch_mode, VERSION)

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Drains and stops; returns when every agent process has exited."""
        async with self._shutdown_lock:
            if not self._started or self._stopped.is_set():
                self._stopped.set()
                return
            log.info("agent host %s draining (%s): %d agents", self.name, reason, len(self._agents))
            self.state = HostState.DRAINING
            await self.server.set_serving(False)
            with contextlib.suppress(RegistryUnavailableError):
                await self.registry.set_host_state(self.address, HostState.DRAINING)
            try:
                async with asyncio.timeout(self.settings.drain_timeout_s):
                    await self._hand_off_all(reason)
            except TimeoutError:
                log.error("drain did not finish within %.0f s; killing what is left", self.settings.drain_timeout_s)
            await self.processes.close()  # SIGKILLs anything a timed-out drain left
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Deregistration must finish even if our caller is being cancelled.
            with contextlib.suppress(RegistryUnavailableError, asyncio.CancelledError):
                await asyncio.shield(self.registry.remove_host(self.address))
            await self.server.stop(grace_s=1.0)
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self.registry.close()
            self._stopped.set()
            log.info("agent host %s stopped", self.name)

    async def _hand_off_all(self, reason: str) -> None:
        keys = list(self._agents)
        results = await asyncio.gather(*(self._stop_one(k, f"host draining ({reason})") for k in keys),
                                       return_exceptions=True)
        stopped = [k for k, r in zip(keys, results, strict=True) if not isinstance(r, BaseException)]
        # Other hosts start these again if the engine still wants them (desired state).
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.push_orphans(stopped)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.shutdown("start failed")
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"agent-host:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- HostApi ---------------------------------------------------------------------------

    async def create_agent(self, request: LaunchRequest) -> AgentRecord:
        began = time.monotonic()
        key = request.key
        with agent_log_fields(key.guild_id, key.agent_id) as fields:
            try:
                record = await self._create_agent(request, fields)
            except Exception as exc:
                self.metrics.launched(exc, time.monotonic() - began)
                raise
        self.metrics.launched(None, time.monotonic() - began)
        return record

    async def _create_agent(self, request: LaunchRequest, log_fields: dict) -> AgentRecord:
        if self.state != HostState.SERVING:
            raise HostUnavailableError(f"host {self.address} is {self.state}; place the agent elsewhere")
        if self.heartbeat.fenced:
            raise HostUnavailableError(f"host {self.address} cannot renew its lease; place the agent elsewhere")
        self.allowlist.check_launch(request)  # before parse_launch: validating a spec imports its classes
        parsed = parse_launch(request)
        key = AgentKey(parsed.guild_spec.id, parsed.agent_spec.id)
        if key in self._agents:
            raise AgentAlreadyExistsError(f"agent {key} is already running on host {self.address}")
        if len(self._agents) >= self.settings.capacity:
            raise HostFullError(f"host {self.address} is full ({self.settings.capacity} agents)")
        limit = self.settings.max_agents_per_guild
        if limit and await self.registry.guild_size(key.guild_id, exclude_agent=key.agent_id) >= limit:
            # Read, then claimed below: launches racing on several hosts can overshoot by as
            # many as are in flight at once. A quota, not a lock.
            raise GuildLimitError(f"guild {key.guild_id} already has {limit} live agents, the most allowed")
        record = AgentRecord(
            guild_id=key.guild_id,
            agent_id=key.agent_id,
            name=parsed.agent_spec.name,
            class_name=parsed.agent_spec.class_name,
            spec_json=parsed.agent_spec.model_dump_json(),
            host=self.address,
            state=AgentState.STARTING,
            started_at=time.time(),
        )
        policy = RestartPolicy.for_request(request.restart, request.agent_spec, self.default_restart)
        # Claim before launching: a concurrent launch of the same agent on another host
        # loses here instead of producing a second live copy.
        claim = await self.registry.claim_agent(record)
        if not claim.ok:
            raise AgentAlreadyExistsError(f"agent {key} is already running on host {claim.owner}")
        agent = self._agents[key] = _Agent(record, request, RestartTracker(policy))
        self._finished.pop(key, None)
        try:
            # The launch is a span under the caller's (traceparent from the engine's call); the
            # agent process gets this span's context and builds under it.
            parent = propagate.extract(request.trace_context) if request.trace_context else None
            with _tracer.start_as_current_span("rk8s.host.create_agent", context=parent,
                                               attributes={"rk8s.guild_id": key.guild_id,
                                                           "rk8s.agent_id": key.agent_id}):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                proc = await self.processes.launch(request.model_copy(update={"trace_context": carrier}))
            log_fields["pid"] = proc.pid
        except BaseException:
            self._agents.pop(key, None)
            with contextlib.suppress(RegistryUnavailableError):
                await asyncio.shield(self.registry.remove_agent(key, self.address))
            raise
        await self._mark_running(agent, proc)
        log.info("agent %s (%s) running on %s, pid %d", key, record.class_name, self.address, proc.pid)
        return self._snapshot(agent.record, proc)

    async def stop_agent(self, key: AgentKey) -> AgentRecord:
        if key in self._agents:
            return await self._stop_one(key, "stopped on request")
        finished = self._finished.pop(key, None)
        self._fenced.pop(key, None)
        if finished is None:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.remove_agent(key, self.address)
        return finished

    async def _stop_one(self, key: AgentKey, reason: str, grace_s: float | None = None) -> AgentRecord:
        with agent_log_fields(key.guild_id, key.agent_id, self._agents[key].record.pid):
            record = await self._stop_one_bound(key, reason, grace_s)
        self.metrics.stops.inc()
        return record

    async def _stop_one_bound(self, key: AgentKey, reason: str, grace_s: float | None) -> AgentRecord:
        agent = self._agents[key]
        if agent.restart_task is not None:
            agent.restart_task.cancel()
        agent.record.state = AgentState.STOPPING
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.update_agent(key, self.address, state=AgentState.STOPPING)
        proc: AgentProcess | None = None
        if self.processes.get(key) is not None:
            with contextlib.suppress(AgentNotFoundError):  # it may exit on its own meanwhile
                proc = await self.processes.stop(key, grace_s)
        self._agents.pop(key, None)
        record = agent.record
        record.state = AgentState.STOPPED
        record.reason = reason
        if proc is not None:
            record.exit_code = proc.exit_code
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.remove_agent(key, self.address)
        log.info("agent %s stopped (%s), exit code %s", key, reason, record.exit_code)
        return self._snapshot(record, proc)

    async def agent_info(self, key: AgentKey, output_lines: int) -> AgentRecord:
        proc = self.processes.get(key)
        agent = self._agents.get(key)
        record = agent.record if agent is not None else self._finished.get(key)
        if record is None:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        snap = self._snapshot(record, proc)
        if output_lines <= 0:
            snap.output = []
        elif proc is not None:
            snap.output = proc.output.tail(output_lines)
        else:
            snap.output = record.output[-output_lines:]
        return snap

    async def list_agents(self, guild_id: str) -> list[AgentRecord]:
        records = [self._snapshot(a.record, self.processes.get(k)) for k, a in self._agents.items()]
        records += [dataclasses.replace(r) for r in self._finished.values()]
        out = [r for r in records if not guild_id or r.guild_id == guild_id]
        for r in out:
            r.output = []
        return sorted(out, key=lambda r: (r.guild_id, r.agent_id))

    def health(self) -> HostRecord:
        return HostRecord(
            address=self.address,
            name=self.name,
            capacity=self.settings.capacity,
            agents=len(self._agents),
            state=self.state,
            version=VERSION,
            started_at=self.started_at,
        )

    # -- crashes and restarts ----------------------------------------------------------------

    async def _on_unexpected_exit(self, proc: AgentProcess) -> None:
        """An agent process exited without being asked: noticed at once, not at the next beat."""
        agent = self._agents.get(proc.key)
        if agent is None or agent.record.state == AgentState.STOPPING:
            return
        record = agent.record
        record.exit_code = proc.exit_code
        record.output = proc.output.tail(self.settings.output_lines)
        # What ended it: the host's own kill (memory limit), else the exit code.
        cause, agent.kill_reason = agent.kill_reason or f"exited with code {proc.exit_code}", ""
        self.metrics.crashes.labels("memory" if cause.startswith("memory") else "exit").inc()
        now = time.monotonic()
        delay = agent.tracker.on_exit(now, ran_for_s=max(0.0, time.time() - record.started_at))
        if delay is None or self.state != HostState.SERVING:
            record.state = AgentState.FAILED
            limit = agent.tracker.policy.max_restarts
            record.reason = (f"{cause}; "
                             + ("not restarted (restarts disabled)" if limit == 0 else
                                f"gave up after {agent.tracker.total} restarts (limit {limit} in "
                                f"{agent.tracker.policy.window_s:.0f} s)"))
            self._agents.pop(proc.key, None)
            self._remember_finished(record)
            self.metrics.failures.inc()
            log.warning("agent %s on %s failed: %s", proc.key, self.address, record.reason)
            await self._update_quietly(proc.key, state=AgentState.FAILED, exit_code=proc.exit_code,
                                       reason=record.reason)
            return
        record.state = AgentState.RESTARTING
        record.reason = f"{cause}; restart {agent.tracker.total} in {delay:.1f} s"
        log.warning("agent %s on %s %s", proc.key, self.address, record.reason)
        await self._update_quietly(proc.key, state=AgentState.RESTARTING, exit_code=proc.exit_code,
                                   reason=record.reason)
        agent.restart_task = self._spawn(self._restart_after(agent, delay), f"restart:{proc.key}")

    async def _restart_after(self, agent: _Agent, delay: float) -> None:
        await asyncio.sleep(delay)  # the backoff itself, not a synchronisation
        key = agent.record.key
        if self._agents.get(key) is not agent or self.state != HostState.SERVING:
            return
        agent.restart_task = None
        try:
            with agent_log_fields(key.guild_id, key.agent_id) as fields:  # the new process's tasks log its pid
                proc = await self.processes.launch(agent.request)
                fields["pid"] = proc.pid
        except RusticK8sError as exc:
            log.warning("restart of %s failed: %s", key, exc)
            fake = _ExitedBeforeReady(key, agent.request, exc)
            await self._on_unexpected_exit(fake)  # counts against the same limit
            return
        agent.record.restarts += 1
        self.metrics.restarts.inc()
        await self._mark_running(agent, proc)
        log.info("agent %s restarted on %s, pid %d (restart %d)", key, self.address, proc.pid,
                 agent.record.restarts)

    async def _mark_running(self, agent: _Agent, proc: AgentProcess) -> None:
        # The process may already have died (on_exit ran while launch() was returning):
        # never let a late RUNNING overwrite the FAILED or RESTARTING it recorded.
        if not proc.running or self._agents.get(agent.record.key) is not agent:
            return
        record = agent.record
        record.pid, record.state, record.started_at = proc.pid, AgentState.RUNNING, proc.started_at
        await self._update_quietly(record.key, state=AgentState.RUNNING, pid=proc.pid,
                                   started_at=repr(proc.started_at), restarts=record.restarts,
                                   reason=record.reason)

    async def _update_quietly(self, key: AgentKey, **fields) -> None:
        try:
            await self.registry.update_agent(key, self.address, **fields)
        except RegistryUnavailableError as exc:  # the next heartbeat re-registers from our table
            log.warning("could not record %s of %s: %s", fields.get("state"), key, exc)

    # -- registry repairs, fencing -----------------------------------------------------------

    async def _reregister(self, keys: list[AgentKey], host_was_missing: bool) -> None:
        for key in keys:
            agent = self._agents.get(key)
            if agent is None:
                continue
            claim = await self.registry.claim_agent(agent.record)
            if not claim.ok:
                await self._stop_lost([key])
            else:
                # The entry vanished (Redis restarted empty, or an outage outlived the TTL):
                # restore what the engine wanted from what runs here; never overwrite.
                await self.registry.set_desired_if_missing(agent.request)

    async def _stop_lost(self, keys: list[AgentKey]) -> None:
        for key in keys:
            if key in self._agents:
                record = await self._stop_one(key, "another host owns this agent now")
                self._remember_finished(record)

    def _drain_requested(self, reason: str) -> None:
        if not self.drain_requested.is_set():
            log.warning("drain requested through the registry: %s", reason)
            self.drain_reason = reason
            self.drain_requested.set()

    def _free_slots(self) -> int:
        if self.state != HostState.SERVING or self.heartbeat.fenced:
            return 0
        return max(0, self.settings.capacity - len(self._agents))

    async def _fence(self) -> None:
        """Lease about to lapse: stop every agent now, before another host may start it."""
        agents = list(self._agents.items())
        for key, agent in agents:
            self._fenced[key] = agent.request
        await asyncio.gather(*(self._stop_fenced(k) for k, _ in agents), return_exceptions=True)

    async def _stop_fenced(self, key: AgentKey) -> None:
        agent = self._agents.pop(key, None)
        if agent is None:
            return
        if agent.restart_task is not None:
            agent.restart_task.cancel()
        agent.record.state = AgentState.STOPPING  # so the exit is not taken for a crash
        if self.processes.get(key) is not None:
            with contextlib.suppress(AgentNotFoundError):
                await self.processes.stop(key, grace_s=0.0)
        agent.record.state = AgentState.STOPPED
        agent.record.reason = "fenced: host lease could not be renewed"
        self._remember_finished(agent.record)

    async def _recover_fenced(self) -> None:
        """Lease renewed again: take back fenced agents nobody else has started meanwhile."""
        fenced, self._fenced = self._fenced, {}
        for key, request in fenced.items():
            try:
                await self.registry.set_desired_if_missing(request)
                if await self.registry.desired_request(key) is None or await self.registry.is_agent_running(key):
                    continue
                await self.create_agent(request)
            except AgentAlreadyExistsError:
                continue
            except RusticK8sError as exc:
                log.warning("could not take back fenced agent %s: %s; queued for any host", key, exc)
                with contextlib.suppress(RegistryUnavailableError):
                    await self.registry.push_orphans([key])

    # -- helpers ---------------------------------------------------------------------------

    def _running_pids(self) -> list[tuple[AgentKey, int]]:
        return [(p.key, p.pid) for p in self.processes.list()]

    async def _over_memory_limit(self, key: AgentKey, pid: int, rss: int) -> None:
        """The watchdog found an agent over RUSTIC_AGENT_HOST_AGENT_MEMORY_MB: kill it as a crash."""
        agent, proc = self._agents.get(key), self.processes.get(key)
        if agent is None or proc is None or proc.pid != pid or agent.record.state != AgentState.RUNNING:
            return  # exited, stopping or replaced since the sample
        agent.kill_reason = (f"memory limit exceeded: {rss / MIB:.0f} MB > {self.settings.agent_memory_mb} MB")
        with agent_log_fields(key.guild_id, key.agent_id, pid):
            log.warning("agent %s on %s: %s; killing it", key, self.address, agent.kill_reason)
        self.processes.kill(key)  # its exit reaches _on_unexpected_exit, with kill_reason

    def _metrics_view(self) -> HostView:
        agents = [AgentView(a.record.guild_id, a.record.agent_id, str(a.record.state),
                            p.pid if (p := self.processes.get(k)) is not None else 0)
                  for k, a in self._agents.items()]
        agents += [AgentView(r.guild_id, r.agent_id, str(r.state)) for r in self._finished.values()]
        last_ok = self.heartbeat.last_ok
        return HostView(agents=agents, capacity=self.settings.capacity, draining=self.state == HostState.DRAINING,
                        heartbeat_lag_s=None if last_ok is None else time.monotonic() - last_ok,
                        memory_limit_bytes=self.settings.agent_memory_mb * MIB)

    def _new_process_manager(self, env: dict[str, str] | None = None) -> AgentProcessManager:
        # Agents enforce the same module allow-list as the host (base/allowlist.py).
        env = {ALLOWED_MODULES_ENV: self.allowlist.to_env(), **(env or {})}
        return AgentProcessManager(
            capacity=self.settings.capacity,
            launch_timeout_s=self.settings.launch_timeout_s,
            stop_grace_s=self.settings.stop_grace_s,
            output_lines=self.settings.output_lines,
            on_exit=self._on_unexpected_exit,
            launch_mode=self.settings.launch_mode,
            preload=tuple(self.settings.preload),
            env=env,
        )

    def _remember_finished(self, record: AgentRecord) -> None:
        self._finished[record.key] = record
        self._finished.move_to_end(record.key)
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)

    @staticmethod
    def _snapshot(record: AgentRecord, proc: AgentProcess | None) -> AgentRecord:
        snap = dataclasses.replace(record, output=list(record.output))
        if proc is not None:
            snap.pid = proc.pid
        return snap


class _ExitedBeforeReady:
    """Stands for a restart attempt that never became a process, so it counts as a crash."""

    def __init__(self, key: AgentKey, request: LaunchRequest, exc: Exception) -> None:
        from ..process import OutputBuffer

        self.key = key
        self.request = request
        self.exit_code = None
        self.output = OutputBuffer(50)
        self.output.append(f"restart failed: {type(exc).__name__}: {exc}")
