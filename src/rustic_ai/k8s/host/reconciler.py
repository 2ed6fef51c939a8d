"""Re-placing agents whose host is gone: dead hosts are reaped, orphans adopted.

Every host runs this loop. A tick (1) reaps hosts whose lease expired — one atomic
script moves their agents onto the fleet's orphan queue, so exactly one reaper takes
each dead host's agents — and (2) pops as many orphans as this host has room for and
launches them here through the normal create path. Draining hosts push their agents
onto the same queue (stop first, then start elsewhere: never two live copies).

An orphan is only launched if the engine still wants it (its desired state exists)
and it is not running elsewhere; the exclusive claim in ``create_agent`` settles any
race between two adopters. Because hosts do this, failover needs no engine running.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from ..base.errors import AgentAlreadyExistsError, PermanentError, RegistryUnavailableError, TemporaryError
from ..base.models import AgentKey, LaunchRequest
from ..registry import LocationRegistry

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        registry: LocationRegistry,
        *,
        address: Callable[[], str],
        interval_s: float,
        free_slots: Callable[[], int],
        adopt: Callable[[LaunchRequest], Awaitable[object]],
        batch: int = 8,
    ) -> None:
        self._registry = registry
        self._address = address
        self._interval_s = interval_s
        self._free_slots = free_slots
        self._adopt = adopt
        self._batch = batch
        self.adopted = 0

    async def run(self) -> None:
        # A random phase keeps the hosts of a fleet from ticking in lock step.
        await asyncio.sleep(random.uniform(0, self._interval_s))
        while True:
            try:
                await self.tick()
            except RegistryUnavailableError as exc:
                log.debug("reconcile skipped, registry unreachable: %s", exc)
            await asyncio.sleep(self._interval_s)

    async def tick(self) -> int:
        reaped = await self._registry.reap_dead_hosts(self._address())
        for address in reaped:
            log.warning("host %s lost its lease; its agents are queued for placement", address)
        keys = await self._registry.pop_orphans(min(self._free_slots(), self._batch))
        if not keys:
            return 0
        results = await asyncio.gather(*(self._adopt_one(k) for k in keys))
        return sum(results)

    async def _adopt_one(self, key: AgentKey) -> int:
        try:
            request = await self._registry.desired_request(key)
            if request is None:
                log.info("orphan %s is no longer wanted (stopped meanwhile); dropped", key)
                return 0
            if await self._registry.is_agent_running(key):
                return 0  # already live elsewhere
            await self._adopt(request)
        except AgentAlreadyExistsError:
            return 0
        except TemporaryError as exc:
            log.warning("could not adopt %s now (%s); queued again", key, exc)
            try:
                await self._registry.push_orphans([key])
            except RegistryUnavailableError:
                log.error("orphan %s lost: registry unreachable while re-queueing", key)
            return 0
        except PermanentError as exc:
            log.error("orphan %s cannot be launched and is dropped: %s", key, exc)
            return 0
        self.adopted += 1
        log.info("adopted orphan %s", key)
        return 1
