"""The memory watchdog: an agent over its memory limit is killed before it hurts its neighbours.

Agents share their host's pod, and so its memory limit: one agent that grows without
bound would have the kernel's OOM killer pick a victim in the pod — possibly the host
itself, taking every agent with it. The watchdog is one asyncio task that samples each
running agent's RSS (``procstat.rss_bytes``) every ``interval_s`` and hands an agent over
``limit_bytes`` to ``on_over``, which kills it (SIGKILL to its process group) and
records why; the host then treats the exit as a crash: restarted with backoff while the
restart limit allows, else failed. The host and its other agents keep running.

Sampling, not a hard limit: an agent can overshoot between two samples (``interval_s``,
1 s by default). A kernel-enforced limit (RLIMIT_AS) was rejected: it caps address
space, not memory, and Python's allocator and thread stacks reserve far more address
space than they use, so any useful value would fail healthy agents.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from ..base.models import AgentKey
from .procstat import rss_bytes

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class MemoryWatchdog:
    def __init__(
        self,
        *,
        limit_bytes: int,
        interval_s: float,
        agents: Callable[[], Iterable[tuple[AgentKey, int]]],
        on_over: Callable[[AgentKey, int, int], Awaitable[None]],
    ) -> None:
        """``agents``: (key, pid) of the running agents; ``on_over(key, pid, rss)`` handles one over the limit."""
        self.limit_bytes = limit_bytes
        self.interval_s = interval_s
        self._agents = agents
        self._on_over = on_over

    async def check(self) -> list[AgentKey]:
        """One round: returns the agents found over the limit (and handed to on_over)."""
        over = []
        for key, pid in list(self._agents()):
            rss = rss_bytes(pid)
            if rss is not None and rss > self.limit_bytes:
                over.append(key)
                try:
                    await self._on_over(key, pid, rss)
                except Exception:  # one agent's trouble must not stop the watch over the others
                    log.exception("could not enforce the memory limit of agent %s", key)
        return over

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)  # the sampling period itself, not a synchronisation
