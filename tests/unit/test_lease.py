"""The host lease (host/lease.py) against a registry stand-in whose answers the test controls.

What matters to users: the deadline agents enforce moves only after a renewal that
succeeded, measured from when that renewal *started*; a renewal that hangs is cut off at
``renew_s``; a hold extends the deadline only when every live peer grants one, never past
``hold_max_s`` after the last renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from rustic_ai.k8s.base.errors import RegistryUnavailableError
from rustic_ai.k8s.base.models import HostRecord, HostState
from rustic_ai.k8s.host.lease import Lease
from rustic_ai.k8s.registry import HeartbeatResult

LEASE_S, RENEW_S, MARGIN_S, GRACE_S = 2.0, 0.05, 0.5, 0.3


class FakeRegistry:
    def __init__(self) -> None:
        self.mode = "ok"  # ok | down | hang
        self.peers: tuple[str, ...] = ()
        self.calls = 0

    async def heartbeat(self, host, agents, *, hold_max_s=0.0, fresh=False) -> HeartbeatResult:
        self.calls += 1
        if self.mode == "down":
            raise RegistryUnavailableError("Redis unreachable (test)")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return HeartbeatResult(missing=[], lost=[], host_was_missing=False, peers=self.peers,
                               redis_ms=int(time.time() * 1000))


def make_lease(registry: FakeRegistry, grants: list[float] | None = None, hold_max_s: float = 10.0,
               gate: asyncio.Event | None = None):
    """``gate``: hold requests are answered only once it is set."""
    deadlines: list[tuple[float, float]] = []
    asked: list[list[str]] = []

    async def ask_peers(peers: list[str]) -> list[float]:
        asked.append(peers)
        if gate is not None:
            await gate.wait()
        return list(grants if grants is not None else [])

    lease = Lease(
        registry,  # type: ignore[arg-type]
        lease_s=LEASE_S, renew_s=RENEW_S, fence_margin_s=MARGIN_S, grace_s=GRACE_S, hold_max_s=hold_max_s,
        agents_every_s=1.0,
        host_record=lambda: HostRecord(address="h1:1", name="h1", capacity=1, agents=0, state=HostState.SERVING,
                                       version="t", started_at=0.0),
        agents=list, ask_peers=ask_peers, on_result=lambda _r: None,
        on_deadline=lambda stop_at, kill_at: deadlines.append((stop_at, kill_at)),
    )
    return lease, deadlines, asked


async def test_deadline_is_measured_from_the_start_of_the_renewal_that_succeeded():
    registry = FakeRegistry()
    lease, _, _ = make_lease(registry)
    before = time.monotonic()
    assert await lease.renew() is not None
    assert lease.last_ok is not None and before <= lease.last_ok <= time.monotonic()
    assert lease.kill_at == pytest.approx(lease.last_ok + LEASE_S - MARGIN_S)
    assert lease.stop_at == pytest.approx(lease.kill_at - GRACE_S)
    assert lease.valid()


async def test_a_failed_or_hanging_renewal_does_not_move_the_deadline_and_is_cut_off():
    registry = FakeRegistry()
    lease, _, _ = make_lease(registry)
    await lease.renew()
    kill_at = lease.kill_at
    registry.mode = "down"
    assert await lease.renew() is None
    registry.mode = "hang"
    began = time.monotonic()
    assert await lease.renew() is None
    assert time.monotonic() - began < RENEW_S + 0.5  # bounded by renew_s, not by the registry
    assert lease.kill_at == kill_at


async def test_the_loop_pushes_deadlines_to_agents_only_while_renewals_succeed():
    registry = FakeRegistry()
    lease, deadlines, _ = make_lease(registry, grants=[0.0])
    registry.peers = ("h2:1",)
    async with running(lease):
        await _until(lambda: len(deadlines) >= 3)
        registry.mode = "down"
        await asyncio.sleep(4 * RENEW_S)  # let failed renewals happen: what is pushed must not move
        pushed = len(deadlines)
        last = deadlines[-1]
        await asyncio.sleep(4 * RENEW_S)
        assert len(deadlines) == pushed or deadlines[-1] == last
        assert lease.hold_until == 0.0  # the peer refused: we are the one cut off
        registry.mode = "ok"
        await _until(lambda: deadlines[-1][1] > last[1])


async def test_a_hold_needs_every_peer_and_never_passes_hold_max():
    registry = FakeRegistry()
    registry.peers = ("h2:1", "h3:1")
    lease, _, asked = make_lease(registry, grants=[LEASE_S, LEASE_S], hold_max_s=2.2)
    await lease.renew()
    registry.mode = "down"
    async with running(lease):
        await _until(lambda: lease.hold_until > 0)
        assert asked and asked[-1] == ["h2:1", "h3:1"]
        assert lease.kill_at > lease.valid_until
        await asyncio.sleep(0.4)  # keep asking: the hold grows, but only up to the cap
        assert lease.kill_at == pytest.approx(lease.last_ok + 2.2 - MARGIN_S)


async def test_one_refusing_peer_means_no_hold():
    registry = FakeRegistry()
    registry.peers = ("h2:1", "h3:1")
    lease, _, asked = make_lease(registry, grants=[LEASE_S, 0.0])
    await lease.renew()
    registry.mode = "down"
    async with running(lease):
        await _until(lambda: len(asked) >= 2)
        assert lease.hold_until == 0.0


async def test_a_renewal_ends_a_hold_so_the_agents_deadline_comes_back_to_the_lease():
    """The first host to register after an empty restart has no peers, so in an outage it holds for
    hold_max_s (nobody who registered after its last renewal may reap it sooner). Once a renewal
    succeeds with peers in view, any of them may reap it lease_s later: the deadline its agents
    get must be the lease's again, not what is left of the hold. (Seeded soak, before the fix: the
    hold outlived the outage and agents adopted later ran through a pause of their host while a
    peer adopted them: two live copies.)"""
    registry = FakeRegistry()  # no peers at the last renewal before the outage
    lease, deadlines, _ = make_lease(registry, grants=[], hold_max_s=10.0)
    await lease.renew()
    registry.mode = "down"
    async with running(lease):
        await _until(lambda: lease.hold_until > 0)
        assert lease.kill_at == pytest.approx(lease.last_ok + 10.0 - MARGIN_S)
        registry.peers = ("h2:1",)
        registry.mode = "ok"
        renewals = registry.calls
        await _until(lambda: registry.calls > renewals + 2)  # renewed again, pushed to agents
        assert lease.hold_until == 0.0
        assert lease.kill_at == pytest.approx(lease.last_ok + LEASE_S - MARGIN_S)
        assert deadlines[-1][1] < lease.last_ok + LEASE_S  # what the agents enforce now


async def test_a_hold_granted_after_a_renewal_succeeded_meanwhile_is_not_taken():
    """Peers answer a hold request slowly; meanwhile Redis comes back and a renewal succeeds. The
    grants were for the peer list of the renewal before: the host must not count itself held
    (a stale grant cannot reach past the new lease's deadline, so the visible effect is the
    host's own view: no hold, and no "Redis unreachable from every host" report)."""
    registry = FakeRegistry()
    registry.peers = ("h2:1",)
    gate = asyncio.Event()
    lease, _, asked = make_lease(registry, grants=[LEASE_S], gate=gate)
    await lease.renew()
    registry.mode = "down"
    hold = asyncio.create_task(lease._ask_for_hold())
    await _until(lambda: len(asked) == 1)  # asked, not answered yet
    registry.mode = "ok"
    assert await lease.renew() is not None
    gate.set()
    await hold
    assert lease.hold_until == 0.0
    assert lease.kill_at == pytest.approx(lease.last_ok + LEASE_S - MARGIN_S)


async def test_next_renewal_resolves_on_success_only():
    registry = FakeRegistry()
    lease, _, _ = make_lease(registry)
    registry.mode = "down"
    waiter = lease.next_renewal()
    await lease.renew()
    assert not waiter.done()
    registry.mode = "ok"
    await lease.renew()
    assert waiter.done()


@contextlib.asynccontextmanager
async def running(lease: Lease):
    """The lease's renewal loop, for the body of a ``with``; cancelled after it."""
    task = asyncio.create_task(lease.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
