"""The agent host: runs agents as OS processes and keeps the registry true about them.

`AgentHost` implements the protocol's `HostApi`; the grpc adapter in front of it turns
its errors into status codes. It owns, in start order: the registry client, the process
manager, the gRPC server and the heartbeat task. `shutdown()` drains in fixed phases:
state DRAINING (health NOT_SERVING, registry says draining, new agents refused) → stop
every agent (SIGTERM, grace, SIGKILL) → remove them and the host from the registry
(shielded from cancellation) → stop the server → close clients. It is safe to call twice
or before start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
from typing import Self

from ..base.errors import (
    AgentAlreadyExistsError,
    AgentNotFoundError,
    HostFullError,
    HostUnavailableError,
    RegistryUnavailableError,
)
from ..base.models import AgentKey, AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from ..base.settings import HostSettings
from ..base.specs import parse_launch
from ..base.version import VERSION
from ..process import AgentProcess, AgentProcessManager
from ..protocol import GrpcHostServer
from ..registry import LocationRegistry
from .address import advertised_address
from .heartbeat import Heartbeat

log = logging.getLogger(__name__)

_FINISHED_KEPT = 1000  # exited agents remembered for GetAgentInfo/ListAgents


class AgentHost:
    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.name = settings.name or os.environ.get("HOSTNAME") or socket.gethostname()
        self.state = HostState.STARTING
        self.address = ""
        self.started_at = time.time()
        self.registry = LocationRegistry(
            settings.redis_url,
            settings.key_prefix,
            agent_ttl_s=settings.agent_ttl_s,
            host_ttl_s=settings.host_ttl_s,
        )
        # Rebuilt in start() once the advertised address is known (agents get it in
        # their environment); this one only answers health() and listings before that.
        self.processes = self._new_process_manager()
        self.server = GrpcHostServer(self, settings.listen, max_message_bytes=settings.max_message_bytes)
        self.heartbeat = Heartbeat(
            self.registry,
            interval_s=settings.heartbeat_s,
            host_record=self.health,
            agents=lambda: [p.key for p in self.processes.list()],
            on_missing=self._reregister,
            on_lost=self._stop_lost,
        )
        self._records: dict[AgentKey, AgentRecord] = {}  # agents this host launched and still runs
        self._finished: collections.OrderedDict[AgentKey, AgentRecord] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._stopped = asyncio.Event()
        self._shutdown_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.registry.start()
        port = await self.server.start()  # create_agent refuses until state is SERVING
        self.address = await advertised_address(self.settings.listen, port, self.settings.advertise)
        self.processes = self._new_process_manager({"RUSTIC_AGENT_HOST_ADDRESS": self.address})
        await self.processes.start()
        self.state = HostState.SERVING
        await self.heartbeat.beat()  # register at once; a Redis outage here is retried by the loop
        self._spawn(self.heartbeat.run(), "heartbeat")
        log.info("agent host %s serving on %s (capacity %d, version %s)", self.name, self.address,
                 self.settings.capacity, VERSION)

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Drains and stops; returns when every agent process has exited."""
        async with self._shutdown_lock:
            if not self._started or self._stopped.is_set():
                self._stopped.set()
                return
            log.info("agent host %s draining (%s): %d agents", self.name, reason, len(self.processes))
            self.state = HostState.DRAINING
            await self.server.set_serving(False)
            with contextlib.suppress(RegistryUnavailableError):
                await self.registry.set_host_state(self.address, HostState.DRAINING)
            keys = [p.key for p in self.processes.list()]
            await asyncio.gather(*(self._stop_one(k, reason) for k in keys), return_exceptions=True)
            await self.processes.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Deregistration must finish even if our caller is being cancelled.
            with contextlib.suppress(RegistryUnavailableError, asyncio.CancelledError):
                await asyncio.shield(self._deregister_all(keys))
            await self.server.stop(grace_s=1.0)
            await self.registry.close()
            self._stopped.set()
            log.info("agent host %s stopped", self.name)

    async def _deregister_all(self, keys: list[AgentKey]) -> None:
        for key in keys:
            await self.registry.remove_agent(key, self.address)
        await self.registry.remove_host(self.address)

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
        if self.state != HostState.SERVING:
            raise HostUnavailableError(f"host {self.address} is {self.state}; place the agent elsewhere")
        parsed = parse_launch(request)
        key = AgentKey(parsed.guild_spec.id, parsed.agent_spec.id)
        if self.processes.get(key) is not None or key in self._records:
            raise AgentAlreadyExistsError(f"agent {key} is already running on host {self.address}")
        if len(self.processes) >= self.settings.capacity:
            raise HostFullError(f"host {self.address} is full ({self.settings.capacity} agents)")
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
        # Claim before launching: a concurrent launch of the same agent on another host
        # loses here instead of producing a second live copy.
        claim = await self.registry.claim_agent(record)
        if not claim.ok:
            raise AgentAlreadyExistsError(f"agent {key} is already running on host {claim.owner}")
        self._records[key] = record
        try:
            proc = await self.processes.launch(request)
        except BaseException:
            self._records.pop(key, None)
            with contextlib.suppress(RegistryUnavailableError):
                await asyncio.shield(self.registry.remove_agent(key, self.address))
            raise
        record.pid = proc.pid
        record.state = AgentState.RUNNING
        record.started_at = proc.started_at
        with contextlib.suppress(RegistryUnavailableError):  # the next heartbeat repairs it
            await self.registry.update_agent(key, self.address, state=AgentState.RUNNING, pid=proc.pid,
                                             started_at=repr(proc.started_at))
        log.info("agent %s (%s) running on %s, pid %d", key, record.class_name, self.address, proc.pid)
        return self._snapshot(record, proc)

    async def stop_agent(self, key: AgentKey) -> AgentRecord:
        if self.processes.get(key) is not None:
            return await self._stop_one(key, "stopped on request")
        finished = self._finished.pop(key, None)
        if finished is None:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.remove_agent(key, self.address)
        return finished

    async def _stop_one(self, key: AgentKey, reason: str) -> AgentRecord:
        record = self._records.get(key)
        if record is not None:
            record.state = AgentState.STOPPING
            with contextlib.suppress(RegistryUnavailableError):
                await self.registry.update_agent(key, self.address, state=AgentState.STOPPING)
        proc = await self.processes.stop(key)
        record = self._records.pop(key, None) or self._record_of(proc)
        record.state = AgentState.STOPPED
        record.exit_code = proc.exit_code
        record.reason = reason
        with contextlib.suppress(RegistryUnavailableError):
            await self.registry.remove_agent(key, self.address)
        log.info("agent %s stopped (%s), exit code %s", key, reason, proc.exit_code)
        return self._snapshot(record, proc)

    async def agent_info(self, key: AgentKey, output_lines: int) -> AgentRecord:
        proc = self.processes.get(key)
        record = self._records.get(key) if proc is not None else self._finished.get(key)
        if record is None:
            raise AgentNotFoundError(f"agent {key} is not on host {self.address}")
        snap = self._snapshot(record, proc)
        if output_lines > 0:
            snap.output = record.output[-output_lines:] if proc is None else proc.output.tail(output_lines)
        else:
            snap.output = []
        return snap

    async def list_agents(self, guild_id: str) -> list[AgentRecord]:
        records = [self._snapshot(r, self.processes.get(k)) for k, r in self._records.items()]
        records += list(self._finished.values())
        out = [r for r in records if not guild_id or r.guild_id == guild_id]
        for r in out:
            r.output = []
        return sorted(out, key=lambda r: (r.guild_id, r.agent_id))

    def health(self) -> HostRecord:
        return HostRecord(
            address=self.address,
            name=self.name,
            capacity=self.settings.capacity,
            agents=len(self.processes),
            state=self.state,
            version=VERSION,
            started_at=self.started_at,
        )

    # -- reactions -------------------------------------------------------------------------

    async def _on_unexpected_exit(self, proc: AgentProcess) -> None:
        """An agent process exited without being asked: record it at once, not at the next beat."""
        key = proc.key
        record = self._records.pop(key, None) or self._record_of(proc)
        record.state = AgentState.FAILED
        record.exit_code = proc.exit_code
        record.reason = f"process exited unexpectedly with code {proc.exit_code}"
        record.output = proc.output.tail(self.settings.output_lines)
        self._remember_finished(record)
        log.warning("agent %s on %s exited with code %s", key, self.address, proc.exit_code)
        try:
            await self.registry.update_agent(key, self.address, state=AgentState.FAILED,
                                             exit_code=proc.exit_code, reason=record.reason)
        except RegistryUnavailableError as exc:
            log.warning("could not record the exit of %s: %s", key, exc)

    async def _reregister(self, keys: list[AgentKey], host_was_missing: bool) -> None:
        for key in keys:
            record = self._records.get(key)
            if record is None:
                continue
            claim = await self.registry.claim_agent(record)
            if not claim.ok:
                await self._stop_lost([key])

    async def _stop_lost(self, keys: list[AgentKey]) -> None:
        for key in keys:
            if self.processes.get(key) is not None:
                with contextlib.suppress(AgentNotFoundError):
                    proc = await self.processes.stop(key)
                    record = self._records.pop(key, None) or self._record_of(proc)
                    record.state = AgentState.STOPPED
                    record.reason = "another host owns this agent now"
                    record.exit_code = proc.exit_code
                    self._remember_finished(record)

    # -- helpers ---------------------------------------------------------------------------

    def _new_process_manager(self, env: dict[str, str] | None = None) -> AgentProcessManager:
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

    def _record_of(self, proc: AgentProcess) -> AgentRecord:
        spec = proc.request.agent_spec
        return AgentRecord(
            guild_id=proc.key.guild_id, agent_id=proc.key.agent_id, name=str(spec.get("name", "")),
            class_name=str(spec.get("class_name", "")), host=self.address, pid=proc.pid, started_at=proc.started_at,
        )

    @staticmethod
    def _snapshot(record: AgentRecord, proc: AgentProcess | None) -> AgentRecord:
        import dataclasses

        snap = dataclasses.replace(record, output=list(record.output))
        if proc is not None:
            snap.pid = proc.pid
        return snap
