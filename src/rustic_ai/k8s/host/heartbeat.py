"""The host's heartbeat: renews the host lease often and every agent TTL less often.

One asyncio task. Each beat is one Redis round trip (registry.heartbeat), bounded in
time so a partition cannot stall it. The answer drives repair: entries that vanished
(Redis restarted empty, a TTL lapsed during an outage) are registered again from the
host's own table, the source of truth for what runs here; agents another host has
claimed meanwhile are reported through ``on_lost``.

Self-fencing: the lease is the host's right to run its agents. When the host has not
renewed it for ``lease_s - fence_margin_s``, ``on_fence`` stops the agents before the
lease can expire and another host take them over, so an agent never runs twice even
when this host is cut off from Redis. ``on_recover`` runs when renewals succeed again.
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


class Heartbeat:
    def __init__(
        self,
        registry: LocationRegistry,
        *,
        lease_s: float,
        renew_s: float,
        fence_margin_s: float,
        agents_every_s: float,
        host_record: Callable[[], HostRecord],
        agents: Callable[[], Iterable[AgentKey]],
        on_missing: Callable[[list[AgentKey], bool], Awaitable[None]],
        on_lost: Callable[[list[AgentKey]], Awaitable[None]],
        on_fence: Callable[[], Awaitable[None]],
        on_recover: Callable[[], Awaitable[None]],
        on_drain_requested: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self._registry = registry
        self._lease_s = lease_s
        self._renew_s = renew_s
        self._fence_after_s = lease_s - fence_margin_s
        self._agents_every_s = agents_every_s
        self._host_record = host_record
        self._agents = agents
        self._on_missing = on_missing
        self._on_lost = on_lost
        self._on_fence = on_fence
        self._on_recover = on_recover
        self._on_drain_requested = on_drain_requested
        self._wake = asyncio.Event()
        self._refresh_agents = True
        self._agents_at = 0.0
        self.last_ok: float | None = None  # monotonic start time of the last renewal that succeeded
        self.fenced = False
        self.beats = 0
        self._outage_logged = False

    def beat_now(self, *, agents: bool = False) -> None:
        """Asks for a beat without waiting for the interval (state changed, agent added)."""
        self._refresh_agents = self._refresh_agents or agents
        self._wake.set()

    async def beat(self, include_agents: bool = True) -> HeartbeatResult | None:
        """One beat and its repairs; None when Redis could not be reached in time."""
        started = time.monotonic()
        agents = list(self._agents()) if include_agents else []
        try:
            async with asyncio.timeout(self._renew_s):
                result = await self._registry.heartbeat(self._host_record(), agents)
        except (RegistryUnavailableError, TimeoutError) as exc:
            if not self._outage_logged:
                log.warning("lease renewal failed, agents keep running for now: %s", exc or "timed out")
                self._outage_logged = True
            return None
        if self._outage_logged:
            log.info("registry reachable again")
            self._outage_logged = False
        self.last_ok = started
        self.beats += 1
        if include_agents:
            self._agents_at = started
        if result.host_was_missing and self.beats > 1:
            log.warning("host entry had vanished from Redis (restart or expiry); registering everything again")
        if result.missing:
            await self._on_missing(result.missing, result.host_was_missing)
        if result.lost:
            log.warning("agents claimed by another host, stopping local copies: %s", [str(k) for k in result.lost])
            await self._on_lost(result.lost)
        if result.drain_requested:
            self._on_drain_requested(result.drain_requested)
        return result

    async def run(self) -> None:
        """Beats until cancelled."""
        while True:
            now = time.monotonic()
            due = self._refresh_agents or now - self._agents_at >= self._agents_every_s
            self._refresh_agents = False
            result = await self.beat(include_agents=due)
            if result is not None and result.host_was_missing and not due:
                result = await self.beat(include_agents=True)  # Redis lost us: re-register at once
            await self._check_fence(result is not None)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._renew_s)
            except TimeoutError:
                pass

    async def _check_fence(self, renewed: bool) -> None:
        if renewed:
            if self.fenced:
                self.fenced = False
                log.warning("lease renewed again after fencing; recovering fenced agents")
                await self._on_recover()
            return
        if self.fenced or self.last_ok is None:
            return
        if time.monotonic() - self.last_ok >= self._fence_after_s:
            self.fenced = True
            log.error("could not renew the host lease for %.1f s: fencing (stopping local agents) before it "
                      "expires", time.monotonic() - self.last_ok)
            await self._on_fence()
