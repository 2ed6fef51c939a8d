"""The engine's keeper: agents it launched are not forgotten when Redis forgets them.

When Redis restarts empty, each host re-registers its agents (and their desired state) at
its next lease renewal. A host that dies after Redis came back and before that renewal
leaves nothing behind: its agents' records, their desired state and its own lease went with
the data, so no reaper has anything to reap and nothing is queued. Only the engine that
launched them still knows. Every ``interval_s`` this task sends what it launched (request
and last known host) through one script per batch (registry ``keep_agents``,
scripts.KEEP_AGENTS), which writes lost desired entries back and, once an agent has been
without a record, a queue entry and a host lease for longer than the hosts' lease, queues
it for adoption. The timing argument is in docs/architecture.md, "Engine".

It never blocks the engine: one task, each round bounded by ``round_timeout_s``, and a
round that fails (Redis down, a bug) is logged and the next one runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..base.errors import RegistryUnavailableError
from ..base.models import AgentKey, LaunchRequest
from ..registry import KeepRound, LocationRegistry

log = logging.getLogger(__name__)

BATCH = 200  # agents per script run: a big engine's round does not hold Redis for long
MARGIN_S = 0.5  # beyond the lease: clock-rate differences and the agents' own exit (they die before it anyway)
FALLBACK_LEASE_S = 5.0  # the hosts' default lease, for hosts that do not record theirs
# Queued this many times without ever being seen running again, an agent is not queued any
# more: adopters drop an orphan that cannot be launched (bad class, refused module), and
# queueing it every few seconds for ever would only repeat the failure.
MAX_PUSHES = 3


class Keeper:
    def __init__(
        self,
        registry: LocationRegistry,
        *,
        interval_s: float,
        owned: Callable[[], Iterable[tuple[LaunchRequest, str]]],
        wanted: Callable[[AgentKey], bool],
        moved: Callable[[AgentKey, str], None],
        gone: Callable[[AgentKey], None],
        on_action: Callable[[str], None] = lambda action: None,
    ) -> None:
        """``owned``: (request, host) of each agent the engine launched and has not stopped;
        ``wanted(key)``: still owned now (a stop forgets the agent before it clears its desired
        state); ``moved(key, host)``: the agent's record names another host now (it was adopted);
        ``gone(key)``: its desired state was cleared while Redis kept its data (stopped by
        someone else): the engine forgets it. ``on_action("restored" | "queued")``: for metrics."""
        self._registry = registry
        self.interval_s = interval_s
        self.round_timeout_s = max(2.0, 2 * interval_s)
        self._owned = owned
        self._wanted = wanted
        self._moved = moved
        self._gone = gone
        self._on_action = on_action
        self.epoch = ""  # Redis's data epoch as of the last round ("" before the first)
        self.queued = 0  # agents this keeper put on the orphan queue
        self.restored = 0  # desired entries it wrote back
        self._pushes: dict[AgentKey, int] = {}  # queued since last seen running

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.round_timeout_s):
                    await self.round()
            except asyncio.CancelledError:
                raise
            except (RegistryUnavailableError, TimeoutError) as exc:
                log.debug("keeper round skipped, registry unreachable: %s", exc)
            except Exception:  # a bad round must not end the keeping for good
                log.exception("keeper round failed")
            await asyncio.sleep(self.interval_s)  # pacing, not a synchronisation

    async def round(self) -> list[KeepRound]:
        wanted = list(self._owned())
        keys = {r.key for r, _ in wanted}
        self._pushes = {k: n for k, n in self._pushes.items() if k in keys}  # stopped agents' counts go
        epoch = self.epoch
        rounds = []
        # At least one call: with nothing to keep it still learns the epoch, so a wipe before
        # the first launch is noticed. Every batch compares with the same epoch.
        for i in range(0, max(len(wanted), 1), BATCH):
            batch = wanted[i:i + BATCH]
            spent = [r.key for r, _ in batch if self._pushes.get(r.key, 0) >= MAX_PUSHES]
            result = await self._registry.keep_agents(batch, epoch, fallback_lease_s=FALLBACK_LEASE_S,
                                                      margin_s=MARGIN_S, no_push=spent)
            rounds.append(result)
            await self._note(result, {r.key: h for r, h in batch})
        if epoch and rounds[0].epoch != epoch:
            log.warning("Redis lost its data (epoch %s -> %s); kept what this engine launched", epoch, rounds[0].epoch)
        self.epoch = rounds[-1].epoch
        return rounds

    async def _note(self, result: KeepRound, hosts: dict[AgentKey, str]) -> None:
        for kept in result.agents:
            if kept.restored:
                if not self._wanted(kept.key):
                    # Stopped while this round ran: the stop cleared the entry before the
                    # script wrote it back. Clear it again, or an adopter would resurrect it.
                    await self._registry.clear_desired(kept.key)
                    continue
                self.restored += 1
                self._on_action("restored")
                log.warning("desired state of %s was lost with Redis's data; written back", kept.key)
            if kept.status == "running":
                self._pushes.pop(kept.key, None)
                if kept.owner and kept.owner != hosts.get(kept.key):
                    self._moved(kept.key, kept.owner)
            elif kept.status == "gone":
                log.info("%s is no longer desired (stopped elsewhere); no longer kept", kept.key)
                self._pushes.pop(kept.key, None)
                self._gone(kept.key)
            elif kept.status == "pushed":
                self.queued += 1
                self._on_action("queued")
                n = self._pushes[kept.key] = self._pushes.get(kept.key, 0) + 1
                log.warning("%s has had no record nor a host for %.1f s (its host died while Redis had lost "
                            "its data); queued for adoption%s", kept.key, result.wait_s,
                            "" if n < MAX_PUSHES else f" (the last time: queued {n} times, never seen running)")
