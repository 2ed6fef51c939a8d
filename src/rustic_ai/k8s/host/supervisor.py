"""One supervisor per agent: the only owner of its process, its restart policy and its registry record.

Erlang/OTP's rule, at the size of one host: each agent has exactly one supervisor, which
starts it, watches it, restarts it by policy, and is the only thing that may stop it or
write its registry record. The host's table *is* the set of supervisors
(``AgentHost.agents``); gRPC handlers, the lease's repairs, the reconciler, drain and the
memory watchdog never touch a process or a record themselves — they send the supervisor a
request and, if they want the outcome, await it.

All work happens in the supervisor's own task. A caller awaits a shielded future, so a
caller that is cancelled (a 2 ms deadline, a client that disconnects, an agent stopping its
own guild through the host) never leaves a transition half done: the stop it asked for
runs to its end and the record is removed, whoever is still listening.

States (``AgentState``, as the registry and the wire show them)::

    starting ──ready──► running ──exit──► restarting ──backoff──► starting ...
       │                   │  ╲                 ╲ (limit reached) ──► failed
       │                   │   ╲ fenced exit ──► restarting (fenced: waits for the lease,
       │                   │                      takes the agent back if nobody else did)
       └──── stop ─────────┴──────► stopping ──► stopped

A fenced exit is one the agent chose because the host could not prove its lease in time
(process/fence.py); it does not count against the restart limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from opentelemetry import propagate, trace

from ..base.errors import (
    AgentAlreadyExistsError,
    GuildLimitError,
    HostUnavailableError,
    InsufficientResourcesError,
    RegistryUnavailableError,
    RusticK8sError,
)
from ..base.logfields import agent_log_fields
from ..base.models import AgentKey, AgentRecord, AgentState, LaunchRequest
from ..base.resources import Allocation, HostInventory, ResourceRequest, describe_short, device_env
from ..base.restart import RestartPolicy, RestartTracker
from ..base.settings import HostSettings
from ..process import AgentProcess, AgentProcessManager
from ..process.control import EXIT_FENCED
from ..registry import ClaimResult, LocationRegistry
from .lease import Lease

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("rustic_ai.k8s.host")

FENCED_EXITS = (EXIT_FENCED, -signal.SIGALRM)  # a clean self-fence, and the kernel timer's backstop
REGISTRY_STEP_S = 5.0  # bound of one registry write made by a supervisor
RECORD_WAIT_MARGIN_S = 0.5  # beyond a lease: a fenced agent's vanished entry may still be rewritten by its adopter


@dataclasses.dataclass
class SupervisorContext:
    """What a supervisor uses of its host; nothing else of the host is reachable from here."""

    settings: HostSettings
    registry: LocationRegistry
    processes: Callable[[], AgentProcessManager]
    lease: Lease
    address: Callable[[], str]
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task]
    finished: Callable[[AgentSupervisor], None]  # leaves the host's table (called once, by the supervisor)
    serving: Callable[[], bool]
    on_event: Callable[[str], None] = lambda _what: None  # metrics: "stop", "restart", "crash:exit", ...
    inventory: Callable[[], HostInventory] = HostInventory  # what the host offers (device ids for the env)


class _Stop:
    def __init__(self, reason: str, grace_s: float | None, hand_off: bool, lost: bool) -> None:
        self.reason, self.grace_s, self.hand_off, self.lost = reason, grace_s, hand_off, lost


class AgentSupervisor:
    def __init__(self, ctx: SupervisorContext, request: LaunchRequest, record: AgentRecord, policy: RestartPolicy,
                 *, adopting: bool = False) -> None:
        self.ctx = ctx
        self.key = record.key
        self.request = request
        self.record = record
        self.tracker = RestartTracker(policy)
        self.adopting = adopting  # launched from the orphan queue or a fence: only if still desired
        # What the agent asks for, and what the registry's claim granted it here (kept for every
        # later claim of this supervisor: a restart or a re-registration keeps the same devices).
        self.need = ResourceRequest.from_agent_spec(request.agent_spec).to_json()
        self.allocation = ""
        self.proc: AgentProcess | None = None
        self.claimed = False  # its record is in Redis under this host (the lease renews its TTL)
        self.settling = False  # ended; removing or handing off its record (the lease no longer renews it)
        self.kill_reason = ""  # why the host killed the process itself (memory limit): its exit is a crash
        self._stop: _Stop | None = None
        self._stop_requested = asyncio.Event()
        self._repair = asyncio.Event()
        self._delay = 0.0  # the restart delay the policy chose
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[AgentRecord] = loop.create_future()
        self._done: asyncio.Future[AgentRecord] = loop.create_future()
        self._task: asyncio.Task | None = None

    # -- requests (any caller; none of them does the work itself) --------------------------------

    def start(self) -> None:
        self._task = self.ctx.spawn(self._run(), f"agent:{self.key}")

    async def wait_started(self) -> AgentRecord:
        """The record once the agent runs; raises what stopped its first launch. Cancelling the caller
        does not cancel the launch."""
        return await asyncio.shield(self._started)

    async def stop(self, reason: str, grace_s: float | None = None, *, hand_off: bool = False) -> AgentRecord:
        """Stops the agent (SIGTERM, grace, SIGKILL) and removes its record — or, with ``hand_off``,
        queues it for other hosts in the same atomic step. Returns the final record."""
        self.request_stop(reason, grace_s, hand_off=hand_off)
        return await asyncio.shield(self._done)

    def request_stop(self, reason: str, grace_s: float | None = None, *, hand_off: bool = False,
                     lost: bool = False) -> None:
        if self._stop is None:
            self._stop = _Stop(reason, grace_s, hand_off, lost)
            self._stop_requested.set()

    def lose(self) -> None:
        """Another host owns the agent now: stop our copy, leave the record (it is theirs)."""
        self.request_stop("another host owns this agent now", 0.0, lost=True)

    def request_repair(self) -> None:
        """The record vanished from Redis (restarted empty, TTL lapsed): write it again."""
        self._repair.set()

    def kill_as_crash(self, reason: str, pid: int) -> bool:
        """Kills the process as a crash (memory limit); False if it is not the running one any more."""
        proc = self.proc
        if proc is None or proc.pid != pid or not proc.running or self.record.state != AgentState.RUNNING:
            return False
        self.kill_reason = reason
        proc.kill()
        return True

    @property
    def done(self) -> bool:
        return self._done.done()

    def snapshot(self) -> AgentRecord:
        snap = dataclasses.replace(self.record, output=list(self.record.output))
        if self.proc is not None and self.proc.running:
            snap.pid = self.proc.pid
        return snap

    # -- the supervisor's own task ------------------------------------------------------------------

    async def _run(self) -> None:
        outcome: AgentState = AgentState.STOPPED
        try:
            with agent_log_fields(self.key.guild_id, self.key.agent_id):
                outcome = await self._supervise()
        except asyncio.CancelledError:
            outcome = AgentState.STOPPED  # host shutdown cancelled us: the process manager ends the process
            self.record.reason = self.record.reason or "host shut down"
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not leave a half-owned agent behind
            log.exception("supervisor of %s failed", self.key)
            if not self._started.done():
                self._started.set_exception(exc)
            outcome = AgentState.FAILED
            self.record.reason = f"supervisor error: {type(exc).__name__}: {exc}"
        finally:
            await asyncio.shield(self._finish(outcome))

    async def _supervise(self) -> AgentState:
        first = True
        while True:
            proc = await self._launch(first)
            if proc is None:
                if first or self._stop is not None:  # the first launch failed, or a stop came first
                    return AgentState.STOPPED
                if not self.ctx.lease.valid():  # a restart that came due while fenced
                    if not await self._take_back():
                        return AgentState.STOPPED
                    continue
                if self._crashed(None) is AgentState.FAILED:  # a restart that did not start
                    return AgentState.FAILED
                if not await self._backoff():
                    return AgentState.STOPPED
                continue
            first = False
            ended = await self._watch(proc)
            if ended == "stopped":
                return AgentState.STOPPED
            if ended == "fenced":
                if not await self._take_back():
                    return AgentState.STOPPED
                continue
            state = self._crashed(proc)
            if state is AgentState.FAILED:
                return state
            if not await self._backoff():
                return AgentState.STOPPED

    async def _launch(self, first: bool) -> AgentProcess | None:
        """Claims (first time) and starts the process; None if a stop came first or the launch failed."""
        if self._stop is not None:
            return None
        if first:
            try:
                await self._claim()
            except Exception as exc:
                self._started.set_exception(exc)
                return None
        if not self.ctx.lease.valid():
            exc = HostUnavailableError(f"host {self.ctx.address()} cannot prove its lease; place the agent elsewhere")
            if first:
                self._started.set_exception(exc)
            return None
        if not first and not await self._claim_again():
            return None
        self.record.state = AgentState.STARTING
        launch = asyncio.create_task(self._start_process(), name=f"agent-launch:{self.key}")
        try:
            while True:
                await self._until_request(launch)
                if launch.done() or self._stop is not None:
                    break
                # Redis lost our entry while the agent starts (restarted empty): write it back now, not
                # once the launch is over. A fenced host that finds the entry missing waits only a lease
                # for us to (host supervisor's take-back), and a launch can take longer than that; the
                # agent is already subscribed and handling messages while it builds.
                self._repair.clear()
                await self._reregister()
        except BaseException:
            # This task cancelled (host shutdown) while waiting or re-registering: the launch is
            # not ours to leave running — nobody would watch, stop or record the process it starts.
            if not launch.done():
                launch.cancel()
                with contextlib.suppress(BaseException):
                    await launch
            raise
        if not launch.done():  # a stop came first: the launch is cancellation-safe (the child is killed)
            launch.cancel()
            with contextlib.suppress(BaseException):
                await launch
            return None
        try:
            proc = launch.result()
        except Exception as exc:
            log.warning("launch of %s failed: %s", self.key, exc)
            if first:
                self._started.set_exception(exc)
            else:
                self.record.output = [f"restart failed: {type(exc).__name__}: {exc}"]
            return None
        self.proc = proc
        # The deadline may have moved on while the agent was starting.
        proc.send_deadline(*self.ctx.lease.deadline())
        record = self.record
        record.pid, record.state, record.started_at = proc.pid, AgentState.RUNNING, proc.started_at
        record.exit_code = None
        if not first:
            record.restarts += 1
        await self._write(state=AgentState.RUNNING, pid=proc.pid, started_at=repr(proc.started_at),
                          restarts=record.restarts, reason=record.reason, exit_code=None)
        if first:
            self._started.set_result(self.snapshot())
            log.info("agent %s (%s) running on %s, pid %d", self.key, record.class_name, self.ctx.address(), proc.pid)
        else:
            self.ctx.on_event("restart")
            log.info("agent %s restarted on %s, pid %d (restart %d)", self.key, self.ctx.address(), proc.pid,
                     record.restarts)
        return proc

    async def _start_process(self) -> AgentProcess:
        # The launch is a span under the caller's (traceparent from the engine's call); the
        # agent process gets this span's context and builds under it.
        request = self.request
        parent = propagate.extract(request.trace_context) if request.trace_context else None
        with _tracer.start_as_current_span("rk8s.host.create_agent", context=parent,
                                           attributes={"rk8s.guild_id": self.key.guild_id,
                                                       "rk8s.agent_id": self.key.agent_id}):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            with agent_log_fields(self.key.guild_id, self.key.agent_id):
                # The agent sees the GPUs it was granted, and none when it asked for none.
                env = device_env(Allocation.from_json(self.allocation), self.ctx.inventory())
                return await self.ctx.processes().launch(
                    request.model_copy(update={"trace_context": carrier, "device_env": env}),
                    self.ctx.lease.deadline())

    async def _claim(self) -> None:
        settings = self.ctx.settings
        limit = settings.max_agents_per_guild
        if limit and await self.ctx.registry.guild_size(self.key.guild_id, exclude_agent=self.key.agent_id) >= limit:
            # Read, then claimed below: launches racing on several hosts can overshoot by as
            # many as are in flight at once. A quota, not a lock.
            raise GuildLimitError(f"guild {self.key.guild_id} already has {limit} live agents, the most allowed")
        # Claim before launching: a concurrent launch of the same agent on another host loses
        # here instead of producing a second live copy. An adoption also needs the engine to
        # still want the agent, checked in the same atomic step (a stop racing it wins).
        # Resources are deducted in the same step (two engines cannot overcommit this host).
        claim = await self.ctx.registry.claim_agent(self.record, require_desired=self.adopting, need=self.need)
        if not claim.ok:
            if claim.short is not None:
                raise InsufficientResourcesError(
                    f"host {self.ctx.address()} cannot fit agent {self.key}: {describe_short(*claim.short)}")
            if claim.owner:
                raise AgentAlreadyExistsError(f"agent {self.key} is already running on host {claim.owner}")
            raise AgentAlreadyExistsError(f"agent {self.key} is no longer wanted (stopped meanwhile)")
        self._granted(claim.allocation)
        self.claimed = True

    def _granted(self, allocation: str) -> None:
        self.allocation = allocation
        self.record.allocation = allocation

    def _claim_kw(self, *, force: bool = False) -> dict[str, Any]:
        """A later claim of the same agent here: what it asks for, and what it held (kept if it
        still fits; ``force``: as it is, for a process that runs with it)."""
        return {"need": self.need, "previous": self.allocation, "force": force}

    def _no_room(self, claim: ClaimResult) -> bool:
        """A restart or take-back here that no longer fits: queue the agent for a host that fits."""
        if claim.short is None:
            return False
        why = describe_short(*claim.short)
        log.warning("agent %s no longer fits host %s (%s); queued for other hosts", self.key, self.ctx.address(), why)
        if self._stop is None:  # a stop asked for meanwhile stands (the agent is no longer wanted)
            self._stop = _Stop(f"no longer fits this host ({why}); queued for any host", 0.0, hand_off=True,
                               lost=False)
            self._stop_requested.set()
        return True

    async def _claim_again(self) -> bool:
        """Before a restart: the agent may have been reaped and adopted while it waited out its
        backoff (this host paused or cut off meanwhile). Only an exclusive claim says it is ours."""
        record = dataclasses.replace(self.snapshot(), state=AgentState.STARTING)
        try:
            claim = await asyncio.wait_for(self.ctx.registry.claim_agent(record, **self._claim_kw()), REGISTRY_STEP_S)
        except (RegistryUnavailableError, TimeoutError) as exc:
            self.record.output = [f"restart failed: cannot claim the agent: {exc}"]
            return False
        if not claim.ok:
            if self._no_room(claim):
                return False
            log.info("not restarting %s: %s owns it now", self.key, claim.owner)
            self.request_stop(f"another host ({claim.owner}) owns this agent now", 0.0, lost=True)
            return False
        self._granted(claim.allocation)
        return True

    async def _until_request(self, work: asyncio.Future) -> None:
        """Until ``work`` is done, a stop is asked for or a repair is due, whichever comes first."""
        stop = asyncio.create_task(self._stop_requested.wait())
        repair = asyncio.create_task(self._repair.wait())
        try:
            await asyncio.wait({work, stop, repair}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            repair.cancel()

    async def _watch(self, proc: AgentProcess) -> str:
        """Until the process ends or a stop is asked for; repairs the record meanwhile."""
        exited = asyncio.create_task(proc.wait())
        while True:
            await self._until_request(exited)
            if self._stop is not None:
                exited.cancel()
                return await self._stop_process(proc)
            if exited.done():
                break
            self._repair.clear()
            await self._reregister()
        record = self.record
        record.exit_code = proc.exit_code
        record.output = proc.output.tail(self.ctx.settings.output_lines)
        self.proc = None
        if proc.exit_code in FENCED_EXITS or not self.ctx.lease.valid():
            return "fenced"
        return "crashed"

    async def _stop_process(self, proc: AgentProcess) -> str:
        stop = self._stop
        assert stop is not None
        self.record.state = AgentState.STOPPING
        if not stop.lost:
            await self._write(state=AgentState.STOPPING)
        code = await proc.stop(stop.grace_s)
        self.record.exit_code = code
        self.record.output = proc.output.tail(self.ctx.settings.output_lines)
        self.proc = None
        return "stopped"

    def _crashed(self, proc: AgentProcess | None) -> AgentState:
        """Decides restart or failed after an unexpected exit (or a restart that did not start)."""
        record = self.record
        if proc is not None:
            cause = self.kill_reason or f"exited with code {proc.exit_code}"
            ran_for = max(0.0, time.time() - proc.started_at)
        else:
            cause = record.output[-1] if record.output else "restart failed"
            ran_for = 0.0  # a restart that never ran: the backoff keeps growing
        self.kill_reason = ""
        self.ctx.on_event("crash:memory" if cause.startswith("memory") else "crash:exit")
        delay = self.tracker.on_exit(time.monotonic(), ran_for_s=ran_for)
        if delay is None or not self.ctx.serving():
            limit = self.tracker.policy.max_restarts
            record.state = AgentState.FAILED
            record.reason = (f"{cause}; "
                             + ("not restarted (restarts disabled)" if limit == 0 else
                                f"gave up after {self.tracker.total - (0 if delay is None else 1)} restarts "
                                f"(limit {limit} in {self.tracker.policy.window_s:.0f} s)"))
            log.warning("agent %s on %s failed: %s", self.key, self.ctx.address(), record.reason)
            self.ctx.on_event("failed")
            return AgentState.FAILED
        record.state = AgentState.RESTARTING
        record.reason = f"{cause}; restart {self.tracker.total} in {delay:.1f} s"
        self._delay = delay
        log.warning("agent %s on %s %s", self.key, self.ctx.address(), record.reason)
        return AgentState.RESTARTING

    async def _backoff(self) -> bool:
        """Waits out the restart delay; False if a stop came meanwhile."""
        await self._write(state=AgentState.RESTARTING, exit_code=self.record.exit_code, reason=self.record.reason)
        try:
            await asyncio.wait_for(self._stop_requested.wait(), self._delay)  # the backoff itself
        except TimeoutError:
            return True
        return False

    async def _take_back(self) -> bool:
        """After a fenced exit: wait for the lease, then run the agent again here unless another host has it."""
        record = self.record
        record.state = AgentState.RESTARTING
        record.reason = "fenced: the host could not prove its lease; waiting for it"
        log.warning("agent %s fenced (exit %s); waiting for the lease", self.key, record.exit_code)
        fenced_at = time.monotonic()
        lease = self.ctx.lease
        # A renewal that *started* after the fence, so the lease it proves is a new one.
        while not (lease.last_ok is not None and lease.last_ok > fenced_at and lease.valid()):
            renewed = lease.next_renewal()
            stop = asyncio.create_task(self._stop_requested.wait())
            try:
                await asyncio.wait({renewed, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if self._stop is not None:
                return False
        try:
            existing = await asyncio.wait_for(self.ctx.registry.get_agent(self.key), REGISTRY_STEP_S)
            if existing is None:
                # Redis lost the entry (restarted empty, or the outage outlived its TTL). Our copy
                # was fenced, so nothing runs here — but another host may have adopted the agent
                # before the wipe and still run it (held through the outage). That host writes the
                # entry again at its first renewal that finds its own entry gone; a host that
                # cannot renew has its copies dead within a lease, as holds need every one of its
                # peers to be cut off too (the corner the keeper leaves open as well, see
                # docs/architecture.md, "Engine"). So wait a lease for the entry before claiming.
                # (Without the wait, a host cut off, then healed into an empty restart, took its
                # agent back 9 ms before the adopter re-registered it: two live copies, seed 1.)
                until = time.monotonic() + self.ctx.settings.lease_s + RECORD_WAIT_MARGIN_S
                while existing is None and time.monotonic() < until:
                    with contextlib.suppress(TimeoutError):  # the pace of the look-ups
                        await asyncio.wait_for(self._stop_requested.wait(), self.ctx.settings.lease_renew_s)
                    if self._stop is not None:
                        return False
                    existing = await asyncio.wait_for(self.ctx.registry.get_agent(self.key), REGISTRY_STEP_S)
            if existing is None:
                # Still no entry: nobody else runs it. Restore what the engine wanted (without
                # overwriting) and take it back.
                await self.ctx.registry.set_desired_if_missing(self.request)
            record.state = AgentState.STARTING
            claim = await asyncio.wait_for(
                self.ctx.registry.claim_agent(record, require_desired=existing is not None, **self._claim_kw()),
                REGISTRY_STEP_S)
        except (RegistryUnavailableError, TimeoutError) as exc:
            log.warning("could not take %s back after fencing: %s; queued for any host", self.key, exc)
            self._stop = _Stop("fenced; queued for any host", 0.0, hand_off=True, lost=False)
            return False
        if not claim.ok and self._no_room(claim):
            return False
        if not claim.ok:
            why = f"another host ({claim.owner}) owns it now" if claim.owner else "no longer wanted"
            log.info("not taking %s back after fencing: %s", self.key, why)
            # Another owner's record is theirs; an unwanted agent's record is ours to remove.
            self._stop = _Stop(f"fenced; {why}", 0.0, hand_off=False, lost=bool(claim.owner))
            return False
        self._granted(claim.allocation)
        self.claimed = True
        return True

    async def _reregister(self) -> None:
        try:
            claim = await asyncio.wait_for(
                self.ctx.registry.claim_agent(self.snapshot(), **self._claim_kw(force=True)), REGISTRY_STEP_S)
            if not claim.ok:
                self.lose()
                return
            await asyncio.wait_for(self.ctx.registry.set_desired_if_missing(self.request), REGISTRY_STEP_S)
        except (RegistryUnavailableError, TimeoutError) as exc:  # the next renewal asks again
            log.warning("could not register %s again: %s", self.key, exc)

    async def _write(self, **fields: Any) -> None:
        """One bounded update of our own record; a failure is repaired from our state later."""
        if not self.claimed:
            return
        try:
            await asyncio.wait_for(self.ctx.registry.update_agent(self.key, self.ctx.address(), **fields),
                                   REGISTRY_STEP_S)
        except (RegistryUnavailableError, TimeoutError) as exc:
            log.warning("could not record %s of %s: %s", fields.get("state"), self.key, exc)

    async def _finish(self, outcome: AgentState) -> None:
        """Leaves the table, settles the record, answers every waiter. Runs once, shielded."""
        record = self.record
        stop = self._stop
        if self.proc is not None and self.proc.running:  # cancelled mid-run: never leave the process behind
            with contextlib.suppress(Exception):
                await self.proc.stop(0.0)
            record.exit_code = self.proc.exit_code
        self.proc = None
        if outcome is AgentState.FAILED:
            record.state = AgentState.FAILED
        else:
            record.state = AgentState.STOPPED
            if stop is not None:
                record.reason = stop.reason
        if not self._started.done():
            self._started.set_exception(HostUnavailableError(f"agent {self.key} stopped before it started"))
        # Settled while still in the table: a new launch of the same agent waits (ALREADY_EXISTS)
        # instead of racing this clean-up, which could otherwise remove or queue its record.
        self.settling = True
        if self.claimed:
            await self._settle_record(outcome, stop)
        self.ctx.finished(self)
        if stop is not None:
            self.ctx.on_event("stop")
        log.info("agent %s %s (%s), exit code %s", self.key, record.state, record.reason, record.exit_code)
        self._done.set_result(self.snapshot())

    async def _settle_record(self, outcome: AgentState, stop: _Stop | None) -> None:
        """Removes (or hands off, or marks failed) our registry record, retrying briefly through an outage.

        Guarded by pid and host: a later launch of the same agent, here or elsewhere, is never touched.
        """
        registry, address, record = self.ctx.registry, self.ctx.address(), self.record
        deadline = time.monotonic() + 2 * self.ctx.settings.lease_s
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(REGISTRY_STEP_S):
                    if stop is not None and stop.lost:
                        return
                    if outcome is AgentState.FAILED:
                        await registry.update_agent(self.key, address, state=AgentState.FAILED,
                                                    exit_code=record.exit_code, reason=record.reason)
                    elif stop is not None and stop.hand_off:
                        await registry.hand_off_agent(self.key, address)
                    else:
                        await registry.remove_agent(self.key, address, pid=record.pid)
                return
            except (RegistryUnavailableError, TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    log.error("could not settle the registry record of %s (%s); it expires by its TTL", self.key, exc)
                    return
            await asyncio.sleep(delay)  # retry backoff, not a synchronisation
            delay = min(delay * 2, 2.0)
