"""One AsyncK8sEngine per process and settings, shared by every synchronous facade.

rusticai-core builds a new ExecutionEngine for every Guild (a GuildManagerAgent builds one
per guild it runs), so a facade owning its own AsyncK8sEngine paid, on each guild's first
launch, for new Redis connections, a new gRPC channel (TCP and HTTP/2 set-up) to the host
and a Health probe of it: most of what Guild.launch_agent cost beyond the async API. Here
every `K8sExecutionEngine` of the process with the same settings and organization uses one
engine on the background loop. Each facade still stops only the agents it launched
(sync_engine.py); the shared engine's connections stay open until the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading

from ..base.settings import EngineSettings
from .engine import AsyncK8sEngine
from .loop import background_loop, run_sync

_lock = threading.Lock()
# (settings, organization) -> (the loop it runs on, the engine)
_engines: dict[tuple[EngineSettings, str], tuple[asyncio.AbstractEventLoop, AsyncK8sEngine]] = {}
_CLOSE_AT_EXIT_S = 5.0


def shared_engine(settings: EngineSettings, organization_id: str, start_timeout_s: float) -> AsyncK8sEngine:
    """The process's started engine for these settings, created on first use."""
    loop = background_loop()
    key = (settings, organization_id)
    with _lock:  # held through start(): a second caller waits for the first one's engine
        entry = _engines.get(key)
        if entry is not None and entry[0] is loop:
            return entry[1]
        # None yet, or one bound to a loop that is gone (this process was forked from one
        # that had it: its connections belong to the parent); never close that one here.
        engine = AsyncK8sEngine(settings, organization_id=organization_id, stop_agents_on_shutdown=False)
        run_sync(engine.start(), start_timeout_s)
        _engines[key] = (loop, engine)
        return engine


def _close_at_exit() -> None:
    with _lock:
        entries = list(_engines.values())
        _engines.clear()
    for loop, engine in entries:
        if loop.is_closed() or not loop.is_running():
            continue
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(_CLOSE_AT_EXIT_S)


# Registered after loop.py's handler (imported above), so it runs first: atexit is last-in first-out.
atexit.register(_close_at_exit)
