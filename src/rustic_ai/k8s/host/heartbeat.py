"""The host's heartbeat: one asyncio task that renews the host lease and every agent TTL.

Each beat is one Redis round trip (registry.heartbeat). Its answer drives repair: agents
whose entries vanished (Redis restarted empty, or a TTL lapsed during an outage) are
registered again from the host's own table, which is the source of truth for what runs
here; agents another host has claimed meanwhile are reported through ``on_lost`` so the
host stops its copy. A Redis outage is logged once and retried on the next beat; the
agents keep running.
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
        interval_s: float,
        host_record: Callable[[], HostRecord],
        agents: Callable[[], Iterable[AgentKey]],
        on_missing: Callable[[list[AgentKey], bool], Awaitable[None]],
        on_lost: Callable[[list[AgentKey]], Awaitable[None]],
        retry_s: float = 1.0,
    ) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._retry_s = min(retry_s, interval_s)
        self._host_record = host_record
        self._agents = agents
        self._on_missing = on_missing
        self._on_lost = on_lost
        self._wake = asyncio.Event()
        self.last_ok: float = 0.0  # monotonic time of the last successful beat
        self.beats = 0
        self._outage_logged = False

    def beat_now(self) -> None:
        """Asks for a beat without waiting for the interval (state changed, agent added)."""
        self._wake.set()

    async def beat(self) -> HeartbeatResult | None:
        """One beat and its repairs; None when Redis could not be reached."""
        try:
            result = await self._registry.heartbeat(self._host_record(), self._agents())
        except RegistryUnavailableError as exc:
            if not self._outage_logged:
                log.warning("heartbeat failed, agents keep running; retrying: %s", exc)
                self._outage_logged = True
            return None
        if self._outage_logged:
            log.info("registry reachable again")
            self._outage_logged = False
        self.last_ok = time.monotonic()
        self.beats += 1
        if result.host_was_missing and self.beats > 1:
            log.warning("host entry had vanished from Redis (restart or expiry); registering again")
        if result.missing:
            await self._on_missing(result.missing, result.host_was_missing)
        if result.lost:
            log.warning("agents claimed by another host, stopping local copies: %s", [str(k) for k in result.lost])
            await self._on_lost(result.lost)
        return result

    async def run(self) -> None:
        """Beats until cancelled; after a failed beat, retries sooner than the interval."""
        while True:
            ok = await self.beat() is not None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s if ok else self._retry_s)
            except TimeoutError:
                pass
