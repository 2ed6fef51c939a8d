"""The agent host: runs agents as OS processes, one supervisor each, and keeps the registry true about them.

`AgentHost` implements the protocol's `HostApi`; the grpc adapter in front of it turns
its errors into status codes. Layout (one owner per concern):

* ``agents`` — the host's one table of what runs here: agent key -> ``AgentSupervisor``
  (supervisor.py), the sole owner of that agent's process, restart policy and registry
  record. Every path that acts on an agent (gRPC, lease repairs, reconciler, drain,
  memory watchdog) asks its supervisor. The duplicate check and the insert are one
  synchronous step, so two launches of one agent can never both pass.
* ``lease`` (lease.py) — a task that renews the host lease and does nothing else; after
  each renewal it extends the deadline every agent process enforces on itself
  (process/fence.py). Repairs its answers call for are handed to the supervisors.
* ``reconciler`` (reconciler.py) — reaps hosts whose lease lapsed and adopts orphans.
* the process manager (process/manager.py) — starts processes; keeps no table of agents.

``shutdown()`` drains in fixed phases: state DRAINING (health NOT_SERVING, registry says
draining, new agents refused with UNAVAILABLE) → every supervisor stops its agent
(SIGTERM, grace, SIGKILL) and hands it to the fleet's orphan queue in the same atomic
step as removing it (stop first, then start elsewhere: never two live copies, never
lost) → host removed from the registry (shielded from cancellation) → server stopped →
clients closed. Safe to call twice or before start.
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

from ..base.allowlist import ALLOWED_MODULES_ENV, ModuleAllowList
from ..base.authz import PolicyFile, describe_rules
from ..base.envrefs import check_references
from ..base.errors import (
    AgentAlreadyExistsError,
    AgentNotFoundError,
    HostFullError,
    HostUnavailableError,
    InsufficientResourcesError,
    RegistryUnavailableError,
)
from ..base.logfields import agent_log_fields, set_host_field
from ..base.models import AgentKey, AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from ..base.resources import Allocation, HostInventory, PlacementPolicy, selector_matches, total_usage
from ..base.restart import RestartPolicy
from ..base.settings import HostSettings
from ..base.specs import summarize_launch
from ..base.version import VERSION
from ..process import AgentProcessManager
from ..protocol import ChannelPool, GrpcHostServer
from ..protocol.tls import ReloadingChannelCredentials, server_credentials
from ..registry import HeartbeatResult, LocationRegistry
from .address import advertised_address
from .inventory import read_inventory
from .lease import Lease
from .metrics import AgentView, HostMetrics, HostView, MetricsServer
from .reconciler import Reconciler
from .supervisor import AgentSupervisor, SupervisorContext
from .watchdog import MIB, MemoryWatchdog

log = logging.getLogger(__name__)

_FINISHED_KEPT = 1000  # ended agents remembered for GetAgentInfo/ListAgents
GRANT_PING_S = 0.5  # how long a hold request waits to find out whether this host reaches Redis


class AgentHost:
    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.name = settings.name or os.environ.get("HOSTNAME") or socket.gethostname()
        self.state = HostState.STARTING
        self.address = ""
        self.started_at = time.time()
        self.inventory = HostInventory()  # read in start() (inventory.py)
        self.labels = settings.label_map()
        self.registry = LocationRegistry.from_settings(
            settings,
            agent_ttl_s=settings.agent_ttl_s,
            lease_s=settings.lease_s,
        )
        # Checked before a request is even summarised; agents check it again.
        self.allowlist = ModuleAllowList(settings.allowed_modules)
        self.metrics = HostMetrics()
        self.metrics.view = self._metrics_view
        self.metrics_server = MetricsServer(self.metrics, settings.metrics_listen) if settings.metrics_listen else None
        # Rebuilt in start() once the advertised address is known (agents get it in their environment).
        self.processes = self._new_process_manager()
        credentials = (
            server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls else None
        )
        # What each client identity may do; a bad file is a ConfigError here, before anything starts.
        self.policy = PolicyFile(settings.authz_policy_file) if settings.authz_policy_file else None
        self.server = GrpcHostServer(self, settings.listen, max_message_bytes=settings.max_message_bytes,
                                     credentials=credentials, health_listen=settings.health_listen,
                                     observer=self.metrics.observe_call, policy=self.policy)
        # Peers, asked for a hold when this host cannot renew its lease (lease.py).
        self.peers = ChannelPool(
            call_timeout_s=settings.lease_renew_s,
            credentials=(ReloadingChannelCredentials(settings.tls_cert_file, settings.tls_key_file,
                                                     settings.tls_client_ca_file) if settings.tls else None),
        )
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
        self.lease = Lease(
            self.registry,
            lease_s=settings.lease_s,
            renew_s=settings.lease_renew_s,
            fence_margin_s=settings.fence_margin_s,
            grace_s=settings.agent_grace_s,
            hold_max_s=settings.hold_max_s,
            agents_every_s=settings.heartbeat_s,
            host_record=self.health,
            agents=lambda: [k for k, s in self.agents.items() if s.claimed and not s.settling],
            ask_peers=self._ask_peers,
            on_result=self._on_renewal,
            on_deadline=self._extend_agents,
        )
        self.reconciler = Reconciler(
            self.registry,
            address=lambda: self.address,
            interval_s=settings.lease_renew_s,
            free_slots=self._free_slots,
            adopt=lambda request: self.create_agent(request, adopting=True),
            lease=self.lease,
            spare=self._granted_hosts,
        )
        self._ctx = SupervisorContext(
            settings=settings,
            registry=self.registry,
            processes=lambda: self.processes,
            lease=self.lease,
            address=lambda: self.address,
            spawn=self._spawn,
            finished=self._finished_supervisor,
            serving=lambda: self.state == HostState.SERVING,
            on_event=self._count,
            inventory=lambda: self.inventory,
        )
        self.agents: dict[AgentKey, AgentSupervisor] = {}  # THE table of what runs here
        self._finished: collections.OrderedDict[AgentKey, AgentRecord] = collections.OrderedDict()
        self._granted: dict[str, float] = {}  # peer address -> monotonic time until which we promised not to reap it
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
        elif self.policy is None:
            log.info("no authorization policy (RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE): any client certificate from "
                     "the client CA may launch, stop and read every agent")
        else:
            log.info("authorization policy %s: %s", self.policy.path, describe_rules(self.policy.current().rules))
        self.inventory = await read_inventory(self.settings)
        await self.registry.start()
        if self.metrics_server is not None:
            await self.metrics_server.start()
        # NOT_SERVING until registered: a probe must not route work here before that.
        port = await self.server.start(serving=False)
        self.address = await advertised_address(self.settings.listen, port, self.settings.advertise)
        set_host_field(self.address)
        self.processes = self._new_process_manager({
            "RUSTIC_AGENT_HOST_ADDRESS": self.address,
            "RUSTIC_AGENT_HOST_LEARN_PRELOAD": "1" if self.settings.learn_preload else "0",  # read by the fork server
        })
        await self.processes.start()
        self.state = HostState.SERVING
        await self.lease.renew()  # register at once; a Redis outage here is retried by the loop
        self._spawn(self.lease.run(), "lease")
        self._spawn(self.reconciler.run(), "reconciler")
        if self.watchdog is not None:
            self._spawn(self.watchdog.run(), "memory-watchdog")
        await self.server.set_serving(True)
        log.info("agent host %s serving on %s (capacity %d, %s launches, version %s)", self.name, self.address,
                 self.settings.capacity, self.settings.launch_mode, VERSION)

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Drains and stops; returns when every agent process has exited."""
        async with self._shutdown_lock:
            if not self._started or self._stopped.is_set():
                self._stopped.set()
                return
            log.info("agent host %s draining (%s): %d agents", self.name, reason, len(self.agents))
            self.state = HostState.DRAINING
            await self.server.set_serving(False)
            with contextlib.suppress(RegistryUnavailableError, TimeoutError):
                await asyncio.wait_for(self.registry.set_host_state(self.address, HostState.DRAINING),
                                       self.settings.lease_renew_s)
            try:
                async with asyncio.timeout(self.settings.drain_timeout_s):
                    # The lease keeps renewing meanwhile, so no agent fences itself mid-drain.
                    await asyncio.gather(*(s.stop(f"host draining ({reason})", hand_off=True)
                                           for s in list(self.agents.values())), return_exceptions=True)
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
            await self.peers.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self.registry.close()
            self._stopped.set()
            log.info("agent host %s stopped", self.name)

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

    async def create_agent(self, request: LaunchRequest, *, adopting: bool = False) -> AgentRecord:
        began = time.monotonic()
        with agent_log_fields(request.key.guild_id, request.key.agent_id):
            try:
                supervisor = self._new_supervisor(request, adopting)
                record = await supervisor.wait_started()
            except Exception as exc:
                self.metrics.launched(exc, time.monotonic() - began)
                raise
        self.metrics.launched(None, time.monotonic() - began)
        return record

    def _new_supervisor(self, request: LaunchRequest, adopting: bool) -> AgentSupervisor:
        """Checks and inserts in one synchronous step: no await between the duplicate check and the insert."""
        if self.state != HostState.SERVING:
            raise HostUnavailableError(f"host {self.address} is {self.state}; place the agent elsewhere")
        if not self.lease.valid():
            raise HostUnavailableError(f"host {self.address} cannot prove its lease; place the agent elsewhere")
        self.allowlist.check_launch(request)
        summary = summarize_launch(request)  # imports nothing: agent classes are imported by the agent process
        check_references(request.messaging_config, os.environ)  # ${env:RUSTIC_SECRET_*} the agent will resolve
        key = AgentKey(summary.guild_id, summary.agent_id)
        if key in self.agents:
            raise AgentAlreadyExistsError(f"agent {key} is already running on host {self.address}")
        if len(self.agents) >= self.settings.capacity:
            raise HostFullError(f"host {self.address} is full ({self.settings.capacity} agents)")
        # The selector travels with the request (and its desired state): adopters honour it too.
        # Resources are the registry claim's to decide (supervisor.py), atomically.
        selector = PlacementPolicy.from_dict(request.placement).selector
        if not selector_matches(selector, self.labels):
            raise InsufficientResourcesError(
                f"host {self.address} cannot fit agent {key}: its labels {self.labels or '{}'} do not match the "
                f"selector {dict(selector)}")
        record = AgentRecord(
            guild_id=key.guild_id,
            agent_id=key.agent_id,
            name=summary.name,
            class_name=summary.class_name,
            spec_json=summary.spec_json,
            host=self.address,
            state=AgentState.STARTING,
            started_at=time.time(),
        )
        policy = RestartPolicy.for_request(request.restart, request.agent_spec, self.default_restart)
        supervisor = AgentSupervisor(self._ctx, request, record, policy, adopting=adopting)
        self.agents[key] = supervisor
        self._finished.pop(key, None)
        supervisor.start()
        self.lease.beat_now(agents=True)
        return supervisor

    async def stop_agent(self, key: AgentKey) -> AgentRecord:
        supervisor = self.agents.get(key)
        if supervisor is not None:
            return await supervisor.stop("stopped on request")
        finished = self._finished.pop(key, None)
        if finished is None:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        with contextlib.suppress(RegistryUnavailableError):  # a failed agent's record stays until asked
            await self.registry.remove_agent(key, self.address)
        return finished

    async def agent_info(self, key: AgentKey, output_lines: int) -> AgentRecord:
        supervisor = self.agents.get(key)
        if supervisor is not None:
            snap = supervisor.snapshot()
            proc = supervisor.proc
        elif key in self._finished:
            snap, proc = dataclasses.replace(self._finished[key]), None
        else:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        if output_lines <= 0:
            snap.output = []
        elif proc is not None:
            snap.output = proc.output.tail(output_lines)
        else:
            snap.output = snap.output[-output_lines:]
        return snap

    async def list_agents(self, guild_id: str) -> list[AgentRecord]:
        records = [s.snapshot() for s in self.agents.values()]
        records += [dataclasses.replace(r) for k, r in self._finished.items() if k not in self.agents]
        out = [r for r in records if not guild_id or r.guild_id == guild_id]
        for r in out:
            r.output = []
        return sorted(out, key=lambda r: (r.guild_id, r.agent_id))

    def health(self) -> HostRecord:
        return HostRecord(
            address=self.address,
            name=self.name,
            capacity=self.settings.capacity,
            agents=len(self.agents),
            state=self.state,
            version=VERSION,
            started_at=self.started_at,
            inventory=self.inventory,
            usage=total_usage([Allocation.from_json(s.allocation) for s in self.agents.values() if s.allocation]),
            labels=dict(self.labels),
        )

    async def grant_hold(self, requester: str, lease_expires_ms: int = 0) -> float:
        """A peer cannot renew its lease. If we cannot reach Redis either, nobody can adopt its agents:
        promise not to reap it for lease_s and say so; if we can, refuse (it is the one cut off).
        ``lease_expires_ms``: when the peer's entry expires on Redis's clock (0: unknown)."""
        if self.state != HostState.SERVING or requester == self.address:
            return 0.0
        try:
            async with asyncio.timeout(min(GRANT_PING_S, self.settings.lease_renew_s / 2)):
                await self.registry.ping()
            return 0.0
        except (RegistryUnavailableError, TimeoutError):
            pass
        # A reap we sent before Redis went quiet may still run when it comes back: wait until
        # it either finished or can no longer run (the script refuses requests that arrive late)
        # — unless its last instant comes before the requester's lease ends, when it cannot
        # touch the requester. Waiting costs the requester most of its clean-stop margin.
        if not await self.reconciler.wait_no_reap_in_flight(harmless_before_ms=lease_expires_ms):
            return 0.0
        grant = self.settings.lease_s
        self._granted[requester] = max(self._granted.get(requester, 0.0), time.monotonic() + grant)
        return grant

    def _granted_hosts(self) -> list[str]:
        now = time.monotonic()
        for address in [a for a, until in self._granted.items() if until <= now]:
            del self._granted[address]
        return list(self._granted)

    # -- lease -----------------------------------------------------------------------------

    def _on_renewal(self, result: HeartbeatResult) -> None:
        """What a renewal's answer calls for, handed to the supervisors (never awaited here)."""
        if result.host_was_missing and self.lease.beats > 1:
            log.warning("host entry had vanished from Redis (restart or expiry); registering everything again")
        for key in result.missing:
            if (supervisor := self.agents.get(key)) is not None:
                supervisor.request_repair()
        if result.lost:
            log.warning("agents claimed by another host, stopping local copies: %s", [str(k) for k in result.lost])
        for key in result.lost:
            if (supervisor := self.agents.get(key)) is not None:
                supervisor.lose()
        if result.drain_requested and not self.drain_requested.is_set():
            log.warning("drain requested through the registry: %s", result.drain_requested)
            self.drain_reason = result.drain_requested
            self.drain_requested.set()

    def _extend_agents(self, stop_at: float, kill_at: float) -> None:
        self.processes.send_deadline(stop_at, kill_at)

    async def _ask_peers(self, peers: list[str]) -> list[float]:
        async def ask(address: str) -> float:
            try:
                return await self.peers.client(address).request_hold(
                    self.address, timeout=self.settings.lease_renew_s, lease_expires_ms=self.lease.expires_ms())
            except Exception as exc:  # noqa: BLE001 - unreachable peer: no grant
                log.debug("hold request to %s failed: %s", address, exc)
                return 0.0

        await self.peers.retain(peers)
        return list(await asyncio.gather(*(ask(a) for a in peers)))

    # -- supervisors' callbacks ------------------------------------------------------------------

    def _finished_supervisor(self, supervisor: AgentSupervisor) -> None:
        if self.agents.get(supervisor.key) is supervisor:
            del self.agents[supervisor.key]
        self._remember_finished(supervisor.record)

    def _count(self, what: str) -> None:
        if what == "stop":
            self.metrics.stops.inc()
        elif what == "restart":
            self.metrics.restarts.inc()
        elif what.startswith("crash:"):
            self.metrics.crashes.labels(what.partition(":")[2]).inc()
        elif what == "failed":
            self.metrics.failures.inc()

    def _free_slots(self) -> int:
        if self.state != HostState.SERVING or not self.lease.valid():
            return 0
        return max(0, self.settings.capacity - len(self.agents))

    # -- helpers ---------------------------------------------------------------------------

    def _running_pids(self) -> list[tuple[AgentKey, int]]:
        return [(k, s.proc.pid) for k, s in self.agents.items() if s.proc is not None and s.proc.running]

    async def _over_memory_limit(self, key: AgentKey, pid: int, rss: int) -> None:
        """The watchdog found an agent over RUSTIC_AGENT_HOST_AGENT_MEMORY_MB: kill it as a crash."""
        supervisor = self.agents.get(key)
        reason = f"memory limit exceeded: {rss / MIB:.0f} MB > {self.settings.agent_memory_mb} MB"
        if supervisor is not None and supervisor.kill_as_crash(reason, pid):
            with agent_log_fields(key.guild_id, key.agent_id, pid):
                log.warning("agent %s on %s: %s; killed", key, self.address, reason)

    def _metrics_view(self) -> HostView:
        agents = [AgentView(s.record.guild_id, s.record.agent_id, str(s.record.state),
                            s.proc.pid if s.proc is not None else 0)
                  for s in self.agents.values()]
        agents += [AgentView(r.guild_id, r.agent_id, str(r.state)) for k, r in self._finished.items()
                   if k not in self.agents]
        last_ok = self.lease.last_ok
        health = self.health()
        return HostView(agents=agents, capacity=self.settings.capacity, draining=self.state == HostState.DRAINING,
                        heartbeat_lag_s=None if last_ok is None else time.monotonic() - last_ok,
                        memory_limit_bytes=self.settings.agent_memory_mb * MIB,
                        inventory=health.inventory, usage=health.usage)

    def _new_process_manager(self, env: dict[str, str] | None = None) -> AgentProcessManager:
        # Agents enforce the same module allow-list as the host (base/allowlist.py).
        env = {ALLOWED_MODULES_ENV: self.allowlist.to_env(), **(env or {})}
        return AgentProcessManager(
            launch_timeout_s=self.settings.launch_timeout_s,
            stop_grace_s=self.settings.stop_grace_s,
            output_lines=self.settings.output_lines,
            launch_mode=self.settings.launch_mode,
            preload=tuple(self.settings.preload),
            env=env,
        )

    def _remember_finished(self, record: AgentRecord) -> None:
        self._finished[record.key] = record
        self._finished.move_to_end(record.key)
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)
