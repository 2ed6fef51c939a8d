"""The host's lease: one task that renews it and does nothing else, and the deadline agents enforce.

The lease is the host's right to run its agents. Renewal is one Redis round trip (the
heartbeat script, which also refreshes agent TTLs every ``agents_every_s``), bounded by
``renew_s`` per attempt. Nothing else runs in this task: what the answer asks for —
re-registering vanished entries, stopping copies another host owns, a drain request — is
handed to the host's repair worker through ``on_result`` (a plain call that queues, never
awaits), so no repair, stop or relaunch can delay the next renewal.

After every renewal that succeeded, the *deadline* moves: agents must be gone by
``kill_at = attempt start + lease_s - fence_margin_s`` and start stopping cleanly
``grace_s`` before it (``stop_at``). ``on_deadline`` pushes both to every agent process,
which enforces them itself (process/fence.py). A host that stalls, is paused, or cannot
reach Redis stops extending, and its agents stop on their own before the lease can lapse.

Holding through an outage everyone shares. If no host can reach Redis, nobody can adopt,
and stopping agents would only lose work. So while renewals fail, the host asks every peer
it last saw alive (``ask_peers``): a peer that cannot reach Redis either *grants a hold* —
it promises not to reap this host for ``grant_s`` seconds from the moment it answered.
With a grant from every peer the deadline moves on to ``asked_at + min(grant) - margin``.
A peer that reaches Redis refuses (this host is the one cut off: it must fence, the
others adopt). Holds never reach past ``last_ok + hold_max_s`` — hosts that join later
and never heard of this host will not reap it sooner than that (registry REAP_HOSTS).
The timing argument is in docs/architecture.md, "Fencing".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from ..base.errors import RegistryUnavailableError
from ..base.models import AgentKey, HostRecord
from ..registry import HeartbeatResult, LocationRegistry

log = logging.getLogger(__name__)


class Lease:
    def __init__(
        self,
        registry: LocationRegistry,
        *,
        lease_s: float,
        renew_s: float,
        fence_margin_s: float,
        grace_s: float,
        hold_max_s: float,
        agents_every_s: float,
        host_record: Callable[[], HostRecord],
        agents: Callable[[], Iterable[AgentKey]],
        ask_peers: Callable[[list[str]], Awaitable[list[float]]],
        on_result: Callable[[HeartbeatResult], None],
        on_deadline: Callable[[float, float], None],
    ) -> None:
        self._registry = registry
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.margin_s = fence_margin_s
        self.grace_s = grace_s
        self.hold_max_s = hold_max_s
        self._agents_every_s = agents_every_s
        self._host_record = host_record
        self._agents = agents
        self._ask_peers = ask_peers
        self._on_result = on_result
        self._on_deadline = on_deadline
        self._wake = asyncio.Event()
        self._refresh_agents = True
        self._agents_at = 0.0
        self._hold_task: asyncio.Task[None] | None = None
        self._outage_logged = False
        self._lapsed = False  # the deadline passed since the last renewal: agents stopped themselves
        self.last_ok: float | None = None  # monotonic start of the last renewal that succeeded
        self.valid_until = 0.0  # kill_at earned by our own renewals
        self.hold_until = 0.0  # kill_at earned by peers' grants
        self.peers: list[str] = []  # live peers, as of the last renewal
        self.redis_ms = 0  # Redis's clock at the last renewal, and our monotonic clock when its answer came
        self.redis_seen_at = 0.0
        self.beats = 0
        self._renewed: asyncio.Future[None] | None = None

    # -- what the host asks ------------------------------------------------------------

    @property
    def kill_at(self) -> float:
        return max(self.valid_until, self.hold_until)

    @property
    def stop_at(self) -> float:
        return self.kill_at - self.grace_s

    def deadline(self) -> tuple[float, float]:
        return self.stop_at, self.kill_at

    def valid(self, now: float | None = None) -> bool:
        """True while agents may run (and be started): the clean-stop instant has not come."""
        return (time.monotonic() if now is None else now) < self.stop_at

    @property
    def fenced(self) -> bool:
        return self.last_ok is not None and not self.valid()

    def redis_now_ms(self) -> int:
        """A lower bound of Redis's clock now, from the last renewal (for requests that must not run late)."""
        return self.redis_ms + int((time.monotonic() - self.redis_seen_at) * 1000)

    def expires_ms(self) -> int:
        """When Redis lets our host entry expire, on Redis's clock (the heartbeat sets it to the
        script's own time + lease_s); 0 before the first renewal. A renewal whose answer was lost
        only makes the real instant later."""
        return self.redis_ms + int(self.lease_s * 1000) if self.beats else 0

    def next_renewal(self) -> asyncio.Future[None]:
        """A future that resolves at the next renewal that succeeds (shared by every waiter)."""
        if self._renewed is None or self._renewed.done():
            self._renewed = asyncio.get_running_loop().create_future()
        return self._renewed

    def beat_now(self, *, agents: bool = False) -> None:
        """Asks for a renewal without waiting for the interval (an agent was added or re-registered)."""
        self._refresh_agents = self._refresh_agents or agents
        self._wake.set()

    # -- renewal -------------------------------------------------------------------------

    async def renew(self, include_agents: bool = True) -> HeartbeatResult | None:
        """One renewal; None when Redis could not be reached in time. Moves the deadline on success."""
        started = time.monotonic()
        agents = list(self._agents()) if include_agents else []
        try:
            async with asyncio.timeout(self.renew_s):
                result = await self._registry.heartbeat(self._host_record(), agents, hold_max_s=self.hold_max_s,
                                                        fresh=self.beats == 0)
        except (RegistryUnavailableError, TimeoutError) as exc:
            if not self._outage_logged:
                log.warning("lease renewal failed: %s", exc or "timed out")
                self._outage_logged = True
            return None
        if self._outage_logged:
            log.info("lease renewed again after %.1f s", started - (self.last_ok or started))
            self._outage_logged = False
        self.last_ok = started
        self.valid_until = started + self.lease_s - self.margin_s
        # A renewal ends any hold. A hold is safe only while the renewal before the outage is
        # this host's last: its peers (as of that renewal) promised not to reap it, and hosts
        # that registered later are kept from reaping it until hold_max_s + lease_s past *that*
        # renewal (REAP_HOSTS). This renewal replaces it, in Redis and in every peer's view:
        # from now on any peer may reap this host lease_s after its last renewal, so the
        # agents' deadline comes back to the lease's. (Kept, a hold outlived the outage: a host
        # that had re-registered first after an empty restart — no peers, so a hold of
        # hold_max_s — carried it into agents it adopted later, which ran on through a 7 s
        # pause of the host while a peer adopted them: two live copies, in the seeded soak.)
        self.hold_until = 0.0
        self.peers = list(result.peers)
        self.redis_ms, self.redis_seen_at = result.redis_ms, time.monotonic()
        self.beats += 1
        if include_agents:
            self._agents_at = started
        if self._renewed is not None and not self._renewed.done():
            self._renewed.set_result(None)
        return result

    async def run(self) -> None:
        """Renews until cancelled. Nothing that goes wrong in one round ends the loop: the lease is
        what keeps every agent of this host alive."""
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in a callback must not stop the renewals
                log.exception("lease round failed; renewing again")
                await asyncio.sleep(self.renew_s)  # pacing, not a synchronisation

    async def _round(self) -> None:
        now = time.monotonic()
        due = self._refresh_agents or now - self._agents_at >= self._agents_every_s
        self._refresh_agents = False
        result = await self.renew(include_agents=due)
        if result is not None and result.host_was_missing and not due:
            result = await self.renew(include_agents=True)  # Redis lost us: report every agent at once
        if result is not None:
            self._on_result(result)
        elif self._hold_task is None or self._hold_task.done():
            self._hold_task = asyncio.create_task(self._ask_for_hold(), name="lease-hold")
        self._publish(renewed=result is not None)
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.renew_s)
        except TimeoutError:
            pass

    def _publish(self, renewed: bool) -> None:
        now = time.monotonic()
        if self.last_ok is None:
            return
        if self._lapsed and renewed:
            self._lapsed = False
            log.warning("lease renewed again after fencing; fenced agents are taken back unless another host has them")
        if not self.valid(now):
            if not self._lapsed:
                self._lapsed = True
                log.error("lease not proven for %.1f s: this host's agents have stopped themselves (fenced); "
                          "they start again once the lease is renewed and nobody else took them",
                          now - self.last_ok)
            return
        if not self._lapsed:
            self._on_deadline(*self.deadline())

    async def _ask_for_hold(self) -> None:
        """Renewals are failing: ask every live peer whether it cannot reach Redis either."""
        if self.last_ok is None:
            return
        asked_at = time.monotonic()
        basis = self.last_ok  # the renewal whose peer list is asked
        peers = list(self.peers)
        try:
            grants = await self._ask_peers(peers) if peers else []
        except Exception:  # noqa: BLE001 - no hold is the safe answer to anything unexpected
            log.exception("asking peers for a hold failed")
            return
        if self.last_ok != basis:
            return  # a renewal succeeded meanwhile: it ended the outage, and the hold with it (see renew)
        if len(grants) != len(peers) or any(g <= 0 for g in grants):
            return  # somebody reaches Redis (or did not answer): we are the one cut off
        cap = self.last_ok + self.hold_max_s - self.margin_s
        granted = min(grants, default=self.hold_max_s)
        until = min(asked_at + granted - self.margin_s, cap)
        if until > self.hold_until:
            if self.hold_until < self.valid_until:
                log.warning("Redis unreachable from every host (%d peers agree): agents keep running (hold up to "
                            "%.0f s after the last renewal)", len(peers), self.hold_max_s)
            self.hold_until = until
            self._publish(renewed=False)
