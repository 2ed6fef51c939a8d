"""A fenced agent's take-back (host/supervisor.py) when Redis lost its entry, against stand-ins the test controls.

The situation, from the seeded soak (seed 1): host h4 was cut off from Redis, its copy of s1
fenced itself and h1 adopted s1. Redis then restarted empty just after h4 was healed. The
wipe took h1's entry for s1 with it; h1 still ran s1 (held through the restart) and writes
the entry again at its first renewal. h4 renewed first, found no entry, and took s1 back at
once: two live copies until h1's renewal told it to stop its own.

Here the registry stand-in plays h1: once the take-back has read the missing entry, h1's
entry comes back 0.2 s later (a renewal interval is 0.4 s), and a claim made before that is
a second live copy. The supervisor must wait for it and then stay stopped.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rustic_ai.k8s.base.models import AgentKey, AgentRecord, AgentState
from rustic_ai.k8s.base.restart import RestartPolicy
from rustic_ai.k8s.base.settings import HostSettings
from rustic_ai.k8s.base.specs import launch_request_from_models
from rustic_ai.k8s.host.supervisor import AgentSupervisor, SupervisorContext
from rustic_ai.k8s.process.control import EXIT_FENCED
from rustic_ai.k8s.process.output import OutputBuffer
from rustic_ai.k8s.registry import ClaimResult
from support.eventually import eventually
from support.ledger_fleet import ledger_spec
from support.probe import guild_spec, redis_messaging

ME, ADOPTER = "h4:1", "h1:1"
ADOPTER_BACK_AFTER_S = 0.2  # h1's entry comes back this long after the take-back found it missing


class Lease:
    """The lease as the supervisor sees it: valid or fenced, and renewals the test makes."""

    def __init__(self) -> None:
        self.last_ok: float | None = time.monotonic()
        self.ok = True
        self._renewed: asyncio.Future[None] | None = None

    def valid(self, now: float | None = None) -> bool:
        return self.ok

    def deadline(self) -> tuple[float, float]:
        now = time.monotonic()
        return now + 60.0, now + 61.0

    def next_renewal(self) -> asyncio.Future[None]:
        if self._renewed is None or self._renewed.done():
            self._renewed = asyncio.get_running_loop().create_future()
        return self._renewed

    def renew(self) -> None:
        self.last_ok, self.ok = time.monotonic(), True
        if self._renewed is not None and not self._renewed.done():
            self._renewed.set_result(None)


class Registry:
    """Redis after an empty restart, with h1 about to write its entry for the agent again."""

    def __init__(self) -> None:
        self.wiped = False
        self.missing_read_at: float | None = None
        self.claims: list[tuple[str, bool]] = []  # (outcome, require_desired)

    def _adopter_back(self) -> bool:
        return self.missing_read_at is not None and time.monotonic() >= self.missing_read_at + ADOPTER_BACK_AFTER_S

    async def get_agent(self, key: AgentKey) -> AgentRecord | None:
        if not self.wiped:
            return None
        if self._adopter_back():
            return AgentRecord(key.guild_id, key.agent_id, host=ADOPTER, state=AgentState.RUNNING)
        if self.missing_read_at is None:
            self.missing_read_at = time.monotonic()
        return None

    async def claim_agent(self, record: AgentRecord, *, require_desired: bool = False, **_kw) -> ClaimResult:
        if self.wiped and self._adopter_back():
            self.claims.append(("conflict", require_desired))
            return ClaimResult(ok=False, owner=ADOPTER, reason="owned by another live host")
        self.claims.append(("ok", require_desired))
        return ClaimResult(ok=True)

    async def set_desired_if_missing(self, request) -> bool:
        return True

    async def update_agent(self, key, host, **fields) -> bool:
        return True

    async def remove_agent(self, key, host="", *, pid=0) -> bool:
        return True


class Proc:
    _pids = iter(range(1000, 2000))

    def __init__(self) -> None:
        self.pid = next(self._pids)
        self.started_at = time.time()
        self.exit_code: int | None = None
        self.output = OutputBuffer(10)
        self._exited = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def send_deadline(self, stop_at: float, kill_at: float) -> None:
        pass

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def exit(self, code: int) -> None:
        self.exit_code = code
        self._exited.set()

    async def stop(self, grace_s: float | None = None) -> int:
        if self.exit_code is None:
            self.exit(-9)
        return self.exit_code


class Processes:
    def __init__(self) -> None:
        self.launched: list[Proc] = []

    async def launch(self, request, deadline) -> Proc:
        self.launched.append(Proc())
        return self.launched[-1]


async def _started(registry: Registry):
    """A supervisor on stand-ins, its agent running; with what the tests look at."""
    settings = HostSettings.from_env({}, lease_s=3.0, lease_renew_s=0.4, fence_margin_s=0.6)
    lease, processes = Lease(), Processes()
    finished: list[AgentSupervisor] = []
    tasks: set[asyncio.Task] = set()

    def spawn(coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        return task

    ctx = SupervisorContext(settings=settings, registry=registry, processes=lambda: processes,  # type: ignore[arg-type]
                            lease=lease, address=lambda: ME, spawn=spawn,  # type: ignore[arg-type]
                            finished=finished.append, serving=lambda: True)
    request = launch_request_from_models(guild_spec("g-takeback"), ledger_spec("s1"), redis_messaging(6379))
    supervisor = AgentSupervisor(ctx, request, AgentRecord("g-takeback", "s1", host=ME, state=AgentState.STARTING),
                                 RestartPolicy())
    supervisor.start()
    await supervisor.wait_started()
    return supervisor, lease, processes, finished, tasks, settings


@pytest.mark.timeout(30)
async def test_a_fenced_agent_whose_entry_redis_lost_is_not_taken_back_while_its_adopter_rewrites_it():
    registry = Registry()
    supervisor, lease, processes, finished, tasks, _ = await _started(registry)
    [first] = processes.launched

    # Cut off: the lease cannot be proven, the agent fences itself, another host adopts it.
    lease.ok = False
    first.exit(EXIT_FENCED)
    # Healed, straight into Redis restarted empty: the next renewal succeeds, the entry is gone.
    registry.wiped = True
    await eventually(lambda: supervisor.record.reason.startswith("fenced"), timeout=10,
                     what="the take-back waiting for a renewal that started after the fence")
    lease.renew()

    # Decided either way: stopped (the adopter has it), or running a second copy here.
    await eventually(lambda: supervisor.done or len(processes.launched) > 1, timeout=10,
                     what="the take-back decided")
    final = await asyncio.wait_for(supervisor.stop("test over"), 10)
    assert len(processes.launched) == 1, (
        f"taken back while the adopter still ran it: claims {registry.claims}, processes {len(processes.launched)}")
    assert registry.claims[-1] == ("conflict", True)
    assert "another host" in final.reason
    assert finished == [supervisor]
    await asyncio.gather(*tasks, return_exceptions=True)


class NoAdopter(Registry):
    """Redis restarted empty and nobody else runs the agent: its entry never comes back."""

    def _adopter_back(self) -> bool:
        return False


async def _fenced_into_an_empty_redis(registry: Registry):
    supervisor, lease, processes, _, _, settings = await _started(registry)
    lease.ok = False
    processes.launched[0].exit(EXIT_FENCED)
    registry.wiped = True
    await eventually(lambda: supervisor.record.reason.startswith("fenced"), timeout=10, what="fenced")
    lease.renew()
    await eventually(lambda: registry.missing_read_at is not None, timeout=10, what="the missing entry read")
    return supervisor, processes, settings


@pytest.mark.timeout(30)
async def test_a_fenced_agent_nobody_else_runs_is_taken_back_after_the_wait():
    registry = NoAdopter()
    supervisor, processes, settings = await _fenced_into_an_empty_redis(registry)
    await eventually(lambda: len(processes.launched) == 2, timeout=15, what="taken back")
    assert time.monotonic() - registry.missing_read_at >= settings.lease_s
    assert registry.claims[-1] == ("ok", False)
    await asyncio.wait_for(supervisor.stop("test over"), 10)


@pytest.mark.timeout(30)
async def test_a_stop_during_the_wait_leaves_nothing_claimed_or_running():
    registry = NoAdopter()
    supervisor, processes, _ = await _fenced_into_an_empty_redis(registry)
    final = await asyncio.wait_for(supervisor.stop("engine stop"), 10)
    assert registry.claims == [("ok", False)]  # only the first launch's claim
    assert len(processes.launched) == 1 and supervisor.done
    assert final.state is AgentState.STOPPED
