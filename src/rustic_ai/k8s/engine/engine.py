"""The async engine: run, find and stop a guild's agents on a fleet of agent hosts.

Reads (is_agent_running, get_agents_in_guild, find_agents_by_name) are answered by the
registry in one Redis round trip each; they never fan out to hosts. Launches go through
placement: the strategy orders the live hosts, the engine tries them in turn and moves
on when a host is full or unavailable, and the first host to answer "ready" wins. Every
gRPC call has a deadline. Before a launch the engine records the request as the guild's
desired state in Redis, so agents can be placed again later (after a host is lost)
by any engine, including one that restarted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, Self

from opentelemetry import trace
from prometheus_client import CollectorRegistry
from rustic_ai.core.guild.builders import GuildHelper
from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.messaging import Client, MessagingConfig, SimpleClient
from rustic_ai.core.utils.basic_class_utils import get_qualified_class_name

from ..base.errors import (
    AgentAlreadyExistsError,
    AgentNotFoundError,
    HostFullError,
    HostUnavailableError,
    InsufficientResourcesError,
    InvalidSpecError,
    LaunchTimeoutError,
    NoHostAvailableError,
    RusticK8sError,
)
from ..base.models import AgentKey, AgentRecord, HostRecord, LaunchRequest
from ..base.resources import Allocation, PlacementPolicy, ResourceRequest, parse_labels, resolve_policy
from ..base.restart import RestartPolicy
from ..base.settings import EngineSettings
from ..base.specs import launch_request_from_models
from ..placement import (
    CachedHosts,
    Discovery,
    PlacementStrategy,
    RegistryDiscovery,
    explain_no_fit,
    merge_with_registry,
    strategy_named,
    with_affinity,
)
from ..placement.factory import discovery_from_settings
from ..protocol import ChannelPool
from ..protocol.tls import ReloadingChannelCredentials
from ..registry import LocationRegistry
from .keeper import Keeper
from .metrics import EngineMetrics

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("rustic_ai.k8s.engine")

_FRESH_S = 2.0  # a host that answered within this long is not probed before a launch
manager_agent_id = GuildHelper.get_manager_agent_id  # rusticai-core's id of a bootstrapped guild's manager
_CAPACITY_POLL_S = 0.5  # how often a launch waiting for capacity (capacity_wait_s) looks again


class AsyncK8sEngine:
    """Awaitable counterpart of rusticai-core's ExecutionEngine.

    Use it as ``async with AsyncK8sEngine(settings) as engine:``. On exit it stops the
    agents it launched (as rusticai-core's engines do on shutdown) unless
    ``stop_agents_on_shutdown=False``. A guild manager it launched (``GuildBuilder.bootstrap``)
    stops with its whole guild: the manager launched the rest through an engine of its own.
    """

    def __init__(
        self,
        settings: EngineSettings | None = None,
        *,
        organization_id: str = "",
        discovery: Discovery | None = None,
        placement: PlacementStrategy | None = None,
        stop_agents_on_shutdown: bool = True,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """``metrics_registry``: where the engine's Prometheus series go (default: a registry of its own,
        ``engine.metrics.registry``)."""
        self.settings = settings or EngineSettings.from_env()
        self.metrics = EngineMetrics(metrics_registry)
        self.organization_id = organization_id
        self.registry = LocationRegistry.from_settings(self.settings)
        self.discovery = discovery or discovery_from_settings(self.settings, self.registry)
        self.placement = placement or strategy_named(self.settings.placement)
        self.pool = ChannelPool(
            call_timeout_s=self.settings.call_timeout_s,
            launch_timeout_s=self.settings.launch_timeout_s,
            max_message_bytes=self.settings.max_message_bytes,
            # Mutual TLS when configured: the client certificate is the engine's credential, re-read
            # when its files change (a long-lived engine outlives its certificate).
            credentials=(ReloadingChannelCredentials(self.settings.tls_cert_file, self.settings.tls_key_file,
                                                     self.settings.tls_ca_file) if self.settings.tls else None),
            server_name=self.settings.tls_server_name,
            observer=self.metrics.observe_call,
        )
        self.stop_agents_on_shutdown = stop_agents_on_shutdown
        self._hosts = CachedHosts(self.settings.discovery_refresh_s)
        self._in_flight: collections.Counter[str] = collections.Counter()  # launches under way per host
        self._in_flight_guild: collections.Counter[tuple[str, str]] = collections.Counter()  # (guild, host)
        self.default_placement = PlacementPolicy(
            selector=parse_labels(self.settings.selector, "RUSTIC_K8S_SELECTOR"), affinity=self.settings.affinity)
        self._owned: dict[AgentKey, str] = {}  # agents this engine launched -> host
        self._requests: dict[AgentKey, LaunchRequest] = {}  # ... and what it asked for (the keeper's copy)
        self.keeper = Keeper(self.registry, interval_s=self.settings.keeper_interval_s, owned=self._kept,
                             wanted=self._owned.__contains__, moved=self._owned.__setitem__,
                             gone=self._forget, on_action=lambda action: self.metrics.kept.labels(action).inc())
        self._keeper_task: asyncio.Task[None] | None = None
        self._heard_from: dict[str, float] = {}  # host -> monotonic time of its last good answer
        self._probes: dict[str, asyncio.Future] = {}  # host -> the Health probe under way
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.registry.start()
        await self.discovery.start()
        if self.settings.keeper_interval_s > 0:
            self._keeper_task = asyncio.create_task(self.keeper.run(), name="rk8s-engine-keeper")

    async def shutdown(self) -> None:
        """Stops owned agents (if configured), then closes channels and clients. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._started and self.stop_agents_on_shutdown and self._owned:
            owned = list(self._owned)
            await self.stop_all(owned)
            # Managers first (above), so none launches more while the rest of its guild stops.
            for guild_id in sorted({k.guild_id for k in owned if k.agent_id == manager_agent_id(k.guild_id)}):
                await self.stop_rest_of_guild(guild_id)
        await self._close_clients()

    async def close(self) -> None:
        """Closes channels and clients and leaves every agent running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._close_clients()

    async def _close_clients(self) -> None:
        task, self._keeper_task = self._keeper_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()
        await self.discovery.close()
        await self.registry.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- launching ---------------------------------------------------------------------------

    async def run_agent(
        self,
        guild_spec: GuildSpec,
        agent_spec: AgentSpec,
        messaging_config: MessagingConfig,
        machine_id: int = 0,
        client_type: type[Client] | str = SimpleClient,
        client_properties: dict[str, Any] | None = None,
        default_topic: str = "default_topic",
        restart: RestartPolicy | None = None,
        placement: PlacementPolicy | None = None,
    ) -> AgentRecord:
        """Starts the agent on one host; returns once it is subscribed, with host and pid.

        ``restart`` overrides how a crashed agent is restarted (else ``AgentSpec.qos.retry_count``
        as the restart limit, else RUSTIC_K8S_MAX_RESTARTS, else the host's default).
        ``placement`` (selector, affinity, wait for capacity) wins over the guild's property
        ``rustic_k8s_placement`` and the engine's settings (docs/resources.md). The agent goes
        only to a host that fits ``agent_spec.resources``.
        """
        request = self.build_request(
            guild_spec, agent_spec, messaging_config, machine_id, client_type, client_properties, default_topic,
            restart=restart, placement=placement,
        )
        return await self.launch(request)

    def build_request(
        self,
        guild_spec: GuildSpec,
        agent_spec: AgentSpec,
        messaging_config: MessagingConfig,
        machine_id: int = 0,
        client_type: type[Client] | str = SimpleClient,
        client_properties: dict[str, Any] | None = None,
        default_topic: str = "default_topic",
        restart: RestartPolicy | None = None,
        placement: PlacementPolicy | None = None,
    ) -> LaunchRequest:
        if not isinstance(agent_spec, AgentSpec):
            raise InvalidSpecError(
                f"run_agent needs an AgentSpec, got {type(agent_spec).__name__}: agents cannot be sent to a host"
            )
        client_name = client_type if isinstance(client_type, str) else get_qualified_class_name(client_type)
        try:
            request = launch_request_from_models(
                guild_spec, agent_spec, messaging_config, machine_id=machine_id, client_type=client_name,
                client_properties=client_properties, organization_id=self.organization_id,
                default_topic=default_topic,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidSpecError(f"launch request cannot be sent as JSON: {exc}") from None
        if restart is None and self.settings.max_restarts >= 0 and agent_spec.qos.retry_count is None:
            restart = RestartPolicy(max_restarts=self.settings.max_restarts)
        if restart is not None:
            request = request.model_copy(update={"restart": restart.model_dump()})
        ResourceRequest.from_agent_spec(request.agent_spec)  # a bad request fails here, before anything is placed
        policy = resolve_policy(request.guild_spec, request.agent_spec, placement, self.default_placement)
        if policy.to_dict():
            request = request.model_copy(update={"placement": policy.to_dict()})
        return request

    async def launch(self, request: LaunchRequest) -> AgentRecord:
        """Places one prepared request, trying hosts in placement order."""
        self._check_open()
        key = request.key
        began = time.monotonic()
        # One span per launch (a no-op unless the application configured OpenTelemetry); its
        # context rides every call below to the host and on into the agent process.
        with _tracer.start_as_current_span("rk8s.engine.launch", attributes={
                "rk8s.guild_id": key.guild_id, "rk8s.agent_id": key.agent_id}):
            try:
                await self.registry.set_desired(request)
                try:
                    record = await self._place(request)
                except AgentAlreadyExistsError:
                    raise  # it runs: keep it desired
                except BaseException:
                    await asyncio.shield(self._forget_desired(key))
                    raise
            except Exception as exc:
                self.metrics.launches.labels(type(exc).__name__).inc()
                raise
        self.metrics.launches.labels("ok").inc()
        self.metrics.launch_seconds.observe(time.monotonic() - began)
        self._owned[key] = record.host
        self._requests[key] = request
        return record

    async def launch_many(self, requests: Sequence[LaunchRequest]) -> list[AgentRecord | BaseException]:
        """Launches many agents at once (e.g. a whole guild); one result or error per request."""
        return await asyncio.gather(*(self.launch(r) for r in requests), return_exceptions=True)

    async def _place(self, request: LaunchRequest) -> AgentRecord:
        """Places the request; when no host fits it (or every host is full), waits for capacity up to
        the policy's (or the engine's) ``wait_s``, looking again every half second, then raises
        InsufficientResourcesError (or NoHostAvailableError)."""
        policy = PlacementPolicy.from_dict(request.placement)
        wait_s = self.settings.capacity_wait_s if policy.wait_s is None else policy.wait_s
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await self._place_once(request, policy)
            except NoHostAvailableError:  # nothing fits, or every host is full: a scale-up may come
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.info("no host fits %s yet; waiting up to %.1f s more for capacity", request.key, left)
            await asyncio.sleep(min(_CAPACITY_POLL_S, left))  # polling for a scale-up, not a synchronisation

    async def _place_once(self, request: LaunchRequest, policy: PlacementPolicy) -> AgentRecord:
        refusals: list[str] = []
        short: list[str] = []  # refusals for resources or labels
        tried: set[str] = set()
        hosts: list[HostRecord] = []
        guild_id = request.key.guild_id
        for attempt in range(2):  # the second pass re-reads discovery after refusals
            hosts = await self._live_hosts(fresh=attempt > 0)
            order = [h for h in await self._order(hosts, request, policy) if h.address not in tried]
            for host in order:
                tried.add(host.address)
                self._in_flight[host.address] += 1
                self._in_flight_guild[(guild_id, host.address)] += 1
                try:
                    client = self.pool.client(host.address)
                    await self._probe(host.address)
                    record = await client.create_agent(request)
                    self.note_placed(host.address, record.allocation)
                    self._heard_from[host.address] = time.monotonic()
                    self.metrics.placements.labels(host.address).inc()
                    return record
                except (HostFullError, HostUnavailableError, LaunchTimeoutError) as exc:
                    # LaunchTimeoutError here is the probe's deadline (nothing was launched) or a
                    # launch that timed out; another host may still claim the agent: the
                    # exclusive claim refuses it if the first attempt did start it.
                    # Full or draining or gone: the request did not run there; next host.
                    refusals.append(str(exc))
                    if isinstance(exc, InsufficientResourcesError):
                        short.append(str(exc))
                    self.metrics.retries.labels(type(exc).__name__).inc()
                    self._hosts.invalidate()
                finally:
                    self._in_flight[host.address] -= 1
                    self._in_flight_guild[(guild_id, host.address)] -= 1
                    if self._in_flight_guild[(guild_id, host.address)] <= 0:
                        del self._in_flight_guild[(guild_id, host.address)]
            if not order and attempt == 0:
                continue
        if short and len(short) == len(refusals):
            raise InsufficientResourcesError(f"no host fits agent {request.key}: " + "; ".join(short))
        if not refusals and any(h.accepts_agents for h in hosts):
            # Hosts with room exist, but none fits the resources, selector or affinity.
            why = explain_no_fit(hosts, request)
            if policy.affinity.startswith("strict_") and not why.startswith("needs"):
                why = f"affinity {policy.affinity} leaves no host; {why}"
            raise InsufficientResourcesError(f"no host fits agent {request.key}: {why}")
        if refusals:
            detail = "; ".join(refusals)
        elif hosts:
            detail = "every host is full or draining: " + ", ".join(
                f"{h.address} {h.state} {h.agents}/{h.capacity or '?'}" for h in hosts
            )
        else:
            detail = f"no live host found by {self.settings.discovery} discovery"
        raise NoHostAvailableError(f"no host accepted agent {request.key}: {detail}")

    def note_placed(self, address: str, allocation: str) -> None:
        """Counts a placement into the cached host listing until it is read again, so the next
        launches see it (least-loaded spreads, bin-packing fills) instead of the last listing's loads."""
        granted = Allocation.from_json(allocation)
        self._hosts.adjust(address, lambda h: dataclasses.replace(h, agents=h.agents + 1, usage=h.usage.plus(granted)))

    async def _probe(self, address: str) -> None:
        """A cheap Health call before launching on a host not heard from lately, so a frozen
        or cut-off host costs probe_timeout_s instead of the whole launch deadline.

        Single-flight per host: a burst of launches shares one probe rather than sending a
        hundred to a host that is busy starting agents (which would then miss the deadline).
        """
        if time.monotonic() - self._heard_from.get(address, 0.0) <= _FRESH_S:
            return
        probe = self._probes.get(address)
        if probe is None:
            probe = asyncio.ensure_future(self.pool.client(address).health(timeout=self.settings.probe_timeout_s))
            self._probes[address] = probe
            probe.add_done_callback(lambda _f: self._probes.pop(address, None))
        await asyncio.shield(probe)
        self._heard_from[address] = time.monotonic()

    async def _order(self, hosts: list[HostRecord], request: LaunchRequest,
                     policy: PlacementPolicy) -> list[HostRecord]:
        # Count launches under way so a burst spreads before hosts report the new load.
        in_flight = self._in_flight
        adjusted = [dataclasses.replace(h, agents=h.agents + in_flight[h.address]) if in_flight.get(h.address) else h
                    for h in hosts]
        order = self.placement.order(adjusted, request)
        if policy.affinity == "none" or not order:
            return order
        guild_id = request.key.guild_id
        guild_load: collections.Counter[str] = collections.Counter(
            r.host for r in await self.registry.list_guild(guild_id)
            if r.is_live and r.agent_id != request.key.agent_id)
        for (g, address), n in self._in_flight_guild.items():
            if g == guild_id:
                guild_load[address] += n
        return with_affinity(order, policy.affinity, guild_load)

    async def _live_hosts(self, fresh: bool = False) -> list[HostRecord]:
        changed = getattr(self.discovery, "changed", None)  # watch-based sources signal changes
        if isinstance(changed, asyncio.Event) and changed.is_set():
            changed.clear()
            fresh = True
        cached = None if fresh else self._hosts.get()
        if cached is not None:
            return cached
        found = await self.discovery.hosts()
        if not isinstance(self.discovery, RegistryDiscovery):
            found = merge_with_registry(found, await self.registry.list_hosts())
        self._hosts.put(found)
        await self.pool.retain(h.address for h in found)  # channels of vanished hosts close
        return found

    async def hosts(self) -> list[HostRecord]:
        """The hosts placement would consider, with their load and state."""
        return await self._live_hosts(fresh=True)

    # -- stopping ------------------------------------------------------------------------

    async def stop_agent(self, guild_id: str, agent_id: str) -> None:
        """Stops the agent wherever it runs. Stopping an agent that is not running is a no-op."""
        self._check_open()
        await self._stop(AgentKey(guild_id, agent_id))

    async def _stop(self, key: AgentKey) -> None:
        # Desired state goes first, and must go: adopters claim with require_desired, so once
        # it is cleared no host can start the agent again, whatever it read before. Stopping
        # the copy while it stays desired would let a host that adopts it later resurrect it,
        # so a failure here fails the stop (RegistryUnavailableError: retry) before anything
        # is stopped.
        # The keeper forgets it even before that: a keeper round under way that writes the
        # entry back (Redis lost it) then sees it is not kept any more and clears it again.
        host, request = self._owned.pop(key, None), self._requests.pop(key, None)
        try:
            await self.registry.clear_desired(key)
        except BaseException:
            if host is not None and request is not None:  # the stop failed: still ours to keep
                self._owned.setdefault(key, host)
                self._requests.setdefault(key, request)
            raise
        record = await self.registry.get_agent(key)
        if record is None or not record.host:
            log.info("stop_agent: %s is not registered; nothing to stop", key)
            return
        try:
            self.metrics.stops.inc()
            await self.pool.client(record.host).stop_agent(key)
        except AgentNotFoundError:
            # The host no longer has it (exited, or host restarted): drop the stale entry.
            await self.registry.remove_agent(key, record.host)
        except HostUnavailableError:
            live = {h.address for h in await self.registry.list_hosts()}
            if record.host in live:
                raise
            # Its host is gone and its processes with it; only the entry is left.
            await self.registry.remove_agent(key, record.host)

    async def stop_all(self, keys: list[AgentKey]) -> None:
        results = await asyncio.gather(*(self._stop(key) for key in keys), return_exceptions=True)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Exception):
                log.warning("could not stop %s during shutdown: %s", key, result)

    async def stop_rest_of_guild(self, guild_id: str, passes: int = 3) -> None:
        """Stops every agent of a bootstrapped guild whose manager this engine stopped.

        The manager launched them through the engine in its own agent process, so this
        engine does not own them; left running they would have no manager, and a stopped
        manager's guild is over. Everything the registry lists or still desires goes; a
        launch the manager had sent just before it stopped may land after a pass, hence
        a few passes.
        """
        for _ in range(passes):
            try:
                keys = {AgentKey(guild_id, a) for a in await self.registry.desired(guild_id)}
                keys |= {r.key for r in await self.registry.list_guild(guild_id)}
            except RusticK8sError as exc:
                log.warning("could not list guild %s to stop it: %s", guild_id, exc)
                return
            if not keys:
                return
            await self.stop_all(sorted(keys, key=str))

    def _kept(self) -> list[tuple[LaunchRequest, str]]:
        return [(self._requests[k], host) for k, host in self._owned.items() if k in self._requests]

    def _forget(self, key: AgentKey) -> None:
        self._owned.pop(key, None)
        self._requests.pop(key, None)

    async def _forget_desired(self, key: AgentKey) -> None:
        try:
            await self.registry.clear_desired(key)
        except RusticK8sError as exc:
            log.warning("could not clear desired state of %s: %s", key, exc)

    # -- reads -------------------------------------------------------------------------------

    async def is_agent_running(self, guild_id: str, agent_id: str) -> bool:
        return await self.registry.is_agent_running(AgentKey(guild_id, agent_id))

    async def list_agents(self, guild_id: str) -> list[AgentRecord]:
        """Live agents of a guild with host, pid and state."""
        return [r for r in await self.registry.list_guild(guild_id) if r.is_live]

    async def get_agents_in_guild(self, guild_id: str) -> dict[str, AgentSpec]:
        return {r.agent_id: _spec_of(r) for r in await self.list_agents(guild_id)}

    async def find_agents_by_name(self, guild_id: str, agent_name: str) -> list[AgentSpec]:
        return [_spec_of(r) for r in await self.list_agents(guild_id) if r.name == agent_name]

    async def agent_info(self, guild_id: str, agent_id: str, output_lines: int = 0) -> AgentRecord:
        """The host's own view of one agent, with the tail of its output."""
        key = AgentKey(guild_id, agent_id)
        record = await self.registry.get_agent(key)
        if record is None or not record.host:
            raise AgentNotFoundError(f"agent {key} is not registered")
        return await self.pool.client(record.host).agent_info(key, output_lines)

    def _check_open(self) -> None:
        if self._closed:
            raise HostUnavailableError("engine is shut down")
        if not self._started:
            raise RuntimeError("AsyncK8sEngine used before start() (use `async with`)")


@functools.lru_cache(maxsize=4096)
def _parse_spec(spec_json: str) -> AgentSpec:
    return AgentSpec.model_validate_json(spec_json)


def _spec_of(record: AgentRecord) -> AgentSpec:
    # Parsing 100 specs is most of get_agents_in_guild's time, and a stored spec's text
    # only changes with a new launch: cache by the text, hand out copies (callers may
    # modify what they get).
    return _parse_spec(record.spec_json).model_copy()


