"""Re-placing agents whose host is gone: dead hosts are reaped, orphans adopted.

Every host runs this, as two loops: (1) reaps hosts whose lease lapsed — one atomic script
moves their agents onto the fleet's orphan queue, so exactly one reaper takes each dead
host's agents — and (2) takes as many orphans as this host has room for into its own
in-progress list and launches them here through the normal create path; each is
acknowledged once handled, so neither a reply lost on the wire nor this host dying
mid-adoption loses one (a reaped host's in-progress list goes back on the queue).
Draining hosts hand their agents to the same queue (stop first, then start elsewhere:
never two live copies).

Reaping is the dangerous step, so it is fenced three ways (scripts.REAP_HOSTS):
* hosts this host promised a hold to (``spare``, see lease.py) are never reaped;
* a reap that reaches Redis late (it sat in a buffer while Redis was paused) does
  nothing: it carries a lower bound of Redis's clock at sending and a validity;
* a host that joined after the dead one last renewed — so the dead one may never have
  heard of it, nor asked it for a hold — waits the dead host's whole hold limit.

An orphan is only launched if the engine still wants it; the claim checks that in the
same atomic step as it takes the agent, so a stop racing the adoption wins.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from ..base.errors import (
    AgentAlreadyExistsError,
    InsufficientResourcesError,
    PermanentError,
    RegistryUnavailableError,
    TemporaryError,
)
from ..base.models import AgentKey, LaunchRequest
from ..registry import LocationRegistry
from .lease import Lease

log = logging.getLogger(__name__)

REAP_VALIDITY_S = 1.0  # a reap that reaches Redis later than this after it was sent is refused


class Reconciler:
    def __init__(
        self,
        registry: LocationRegistry,
        *,
        address: Callable[[], str],
        interval_s: float,
        free_slots: Callable[[], int],
        adopt: Callable[[LaunchRequest], Awaitable[object]],
        lease: Lease,
        spare: Callable[[], list[str]],
        batch: int = 8,
    ) -> None:
        self._registry = registry
        self._address = address
        self._interval_s = interval_s
        self._free_slots = free_slots
        self._adopt = adopt
        self._lease = lease
        self._spare = spare
        self._batch = batch
        self._reap_sent_at: float | None = None  # monotonic, while a reap request is unanswered
        self._reap_sent_ms = 0  # its sent_ms (a lower bound of Redis's clock when sent)
        self._reap_done = asyncio.Event()
        self._reap_done.set()
        self.adopted = 0
        self._reported: set[AgentKey] = set()  # orphans this host said it cannot fit (logged once each)

    async def run(self) -> None:
        """Two loops: reaping must go on while an adoption waits for a slow agent to start."""
        # A random phase keeps the hosts of a fleet from ticking in lock step.
        await asyncio.sleep(random.uniform(0, self._interval_s))
        await asyncio.gather(self._loop(self._reap_round, "reap"), self._loop(self.adopt_round, "adopt"))

    async def _loop(self, round_, what: str) -> None:
        while True:
            try:
                await round_()
            except (RegistryUnavailableError, TimeoutError) as exc:
                log.debug("%s skipped, registry unreachable: %s", what, exc)
            except Exception:  # noqa: BLE001 - one bad round must not end failover for good
                log.exception("%s round failed", what)
            await asyncio.sleep(self._interval_s)

    async def _reap_round(self) -> None:
        if self._lease.valid() and self._lease.beats:
            async with asyncio.timeout(max(5.0, 4 * self._interval_s)):
                await self._reap()

    async def wait_no_reap_in_flight(self, harmless_before_ms: int = 0) -> bool:
        """Returns once no reap of ours can still take effect (answered, or too late to run), or at
        once if the one in flight must run before ``harmless_before_ms`` (Redis's clock): it is
        refused later than sent + validity, so it runs, if at all, while that host's lease is
        still current, and a current lease is never reaped."""
        sent = self._reap_sent_at
        if sent is None:
            return True
        if harmless_before_ms and self._reap_sent_ms + int(REAP_VALIDITY_S * 1000) < harmless_before_ms:
            return True
        left = sent + REAP_VALIDITY_S + 0.1 - time.monotonic()
        if left > 0:
            try:
                await asyncio.wait_for(self._reap_done.wait(), left)
            except TimeoutError:
                pass
        return True

    async def adopt_round(self) -> int:
        """Takes orphans into this host's in-progress list and adopts them; each is settled (acked,
        or queued again) only once its launch has an outcome, however long the launch takes."""
        room = min(self._free_slots(), self._batch)
        # With no room, asking for 0 gives back anything still in our in-progress list.
        keys = await self._registry.pop_orphans(max(room, 0), self._address())
        if not keys:
            return 0
        results = await asyncio.gather(*(self._adopt_one(k) for k in keys))
        return sum(results)

    async def _reap(self) -> None:
        self._reap_sent_at = time.monotonic()
        self._reap_sent_ms = self._lease.redis_now_ms()
        self._reap_done.clear()
        try:
            reaped = await self._registry.reap_dead_hosts(
                self._address(), spare=self._spare(), sent_ms=self._reap_sent_ms,
                validity_ms=int(REAP_VALIDITY_S * 1000),
            )
        finally:
            self._reap_sent_at = None
            self._reap_done.set()
        for address in reaped:
            log.warning("host %s lost its lease; its agents are queued for placement", address)

    async def _adopt_one(self, key: AgentKey) -> int:
        """Adopts one orphan, then settles it in our in-progress list: acked, or back on the queue."""
        adopted = 0
        try:
            request = await self._registry.desired_request(key)
            if request is None:
                log.info("orphan %s is no longer wanted (stopped meanwhile); dropped", key)
            elif not await self._registry.is_agent_running(key):
                await self._adopt(request)
                adopted = 1
                self.adopted += 1
                self._reported.discard(key)
                log.info("adopted orphan %s", key)
        except AgentAlreadyExistsError:
            pass  # running elsewhere, or no longer wanted (the claim checks both atomically)
        except InsufficientResourcesError as exc:
            # Adopted only where it fits; meanwhile it stays queued for the others, and is
            # reported (registry p:unplaced, `rustic-k8s unplaced`) rather than dropped.
            if key not in self._reported:
                self._reported.add(key)
                log.warning("cannot adopt %s here (%s); queued for other hosts", key, exc)
            try:
                await self._registry.report_unplaced(key, str(exc), self._address())
                await self._registry.push_orphans([key])
            except RegistryUnavailableError:
                return 0
        except TemporaryError as exc:
            log.warning("could not adopt %s now (%s); queued again", key, exc)
            try:
                # Pushed, not moved back: our in-progress list may have given it back while the
                # launch ran (a smaller pop). Queued twice is harmless (the claim settles it).
                await self._registry.push_orphans([key])
            except RegistryUnavailableError:
                return 0  # still in our in-progress list (or the queue): the next round sees it

        except PermanentError as exc:
            log.error("orphan %s cannot be launched and is dropped: %s", key, exc)
        try:
            await self._registry.ack_orphans([key], self._address())
        except RegistryUnavailableError:
            pass  # handled; the next tick sees it again and finds it running or unwanted
        return adopted
