"""The process manager: starts agent processes and ends them; it keeps no table of agents.

``AgentProcessManager.launch`` starts an agent (through a ``Launcher``) and returns an
``AgentProcess`` handle only when the agent reported ready, i.e. it is built and
subscribed. The handle is the agent's one owner's (the host's supervisor for that agent,
host/supervisor.py): it awaits the exit (``wait``), stops (``stop``: SIGTERM, grace,
SIGKILL to the process group), kills (``kill``) and extends the lease deadline the
process enforces on itself (``send_deadline``, see fence.py). Which agent runs where, and
whether two launches of one agent collide, is decided by that owner's table alone — the
manager does not keep a second one that could disagree with it.

What the manager does keep is the set of processes it started and that have not exited,
so that ``close()`` can end every one of them (the last resort of a host shutdown), and
two tasks per process, cancelled by ``close()`` if still running: a *pump* that drains its
output into an ``OutputBuffer`` (so a child's pipe never fills and blocks it) and a
*watcher* that awaits its exit and records the exit code. Everything runs on the event
loop: no threads and no blocking calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Self

from ..base.errors import (
    AgentLaunchError,
    ForbiddenModuleError,
    HostUnavailableError,
    InvalidSpecError,
    LaunchTimeoutError,
)
from ..base.logfields import note_pid
from ..base.models import AgentKey, LaunchRequest
from ..base.redact import Redactor, messaging_secrets
from .control import EVENT_ERROR, EVENT_READY, KIND_FORBIDDEN, KIND_INVALID_SPEC, decode_event
from .launcher import Launcher, SpawnedProcess, make_launcher
from .output import OutputBuffer

log = logging.getLogger(__name__)

ERROR_OUTPUT_LINES = 20  # lines of a failed child's output quoted in AgentLaunchError
OUTPUT_DRAIN_S = 1.0  # how long an exit waits for the last output (a grandchild may hold the pipe)


class AgentProcess:
    """The handle of one agent process; it outlives the process, for the exit code and output."""

    def __init__(self, key: AgentKey, request: LaunchRequest, spawned: SpawnedProcess, output: OutputBuffer) -> None:
        self.key = key
        self.request = request
        self.pid = spawned.pid
        self.started_at = time.time()
        self.output = output
        self.exit_code: int | None = None
        self.stopping = False  # the owner asked it to stop (its exit is not a crash)
        self.ready_info: dict[str, Any] = {}  # the child's ready report (pid, and launcher facts)
        self.launch_s = 0.0  # from launch() to ready, seconds
        self._spawned = spawned
        self._exited = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._grace_s = 10.0

    @property
    def running(self) -> bool:
        return self.exit_code is None

    async def wait(self) -> int:
        """The exit code, once the process exited and its output was read to the end."""
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def send_deadline(self, stop_at: float, kill_at: float) -> None:
        """Extends the lease deadline this process enforces on itself (never blocks)."""
        if self.exit_code is None:
            self._spawned.send_deadline(stop_at, kill_at)

    async def stop(self, grace_s: float | None = None) -> int:
        """SIGTERM, up to ``grace_s`` to exit, then SIGKILL to the group; returns the exit code.

        A second stop joins the first. Shielded: a cancelled caller still leaves the stop
        running to its end.
        """
        self.stopping = True
        if self._stop_task is None:
            grace = self._grace_s if grace_s is None else grace_s
            self._stop_task = asyncio.create_task(self._terminate(grace), name=f"agent-stop:{self.key}")
        await asyncio.shield(self._stop_task)
        return await self.wait()

    def kill(self) -> None:
        """SIGKILLs the process group without marking it stopping: its exit reads as a crash."""
        self._spawned.send_signal(signal.SIGKILL, group=True)

    async def _terminate(self, grace_s: float) -> None:
        if self._exited.is_set():
            return
        self._spawned.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace_s)
            return
        except TimeoutError:
            log.warning("agent %s (pid %d) did not stop within %.1f s; sending SIGKILL", self.key, self.pid, grace_s)
        await self._kill_and_wait()

    async def _kill_and_wait(self) -> None:
        self.stopping = True
        self._spawned.send_signal(signal.SIGKILL, group=True)
        # Shielded so that a cancelled launch still leaves no process behind when it re-raises.
        await asyncio.shield(self.wait())

    def __repr__(self) -> str:
        return f"<AgentProcess {self.key} pid={self.pid} exit_code={self.exit_code}>"


class AgentProcessManager:
    def __init__(
        self,
        *,
        launch_timeout_s: float,
        stop_grace_s: float,
        output_lines: int,
        launcher: Launcher | None = None,
        launch_mode: str = "warm",
        env: Mapping[str, str] | None = None,
        preload: tuple[str, ...] = (),
    ) -> None:
        """``launcher`` wins over ``launch_mode``/``env``/``preload``, which only build the default one.

        A launcher passed in is borrowed (the caller closes it); one built here is owned.
        """
        self.launch_timeout_s = launch_timeout_s
        self.stop_grace_s = stop_grace_s
        self.output_lines = output_lines
        self._owns_launcher = launcher is None
        self.launcher = launcher or make_launcher(launch_mode, env=env, preload=tuple(preload))
        self._live: set[AgentProcess] = set()  # started and not exited: what close() must end
        self._launches = 0
        self._no_launches = asyncio.Event()
        self._no_launches.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started or self._closing:
            return
        await self.launcher.start()
        self._started = True

    async def close(self) -> None:
        """Ends every process it started, concurrently, then releases the launcher. Idempotent; fine before start."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(), name="agent-processes:close")
        # Shielded: a caller cancelled mid-close must not leave half the agents running.
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = True
        live = list(self._live)
        if live:
            log.info("stopping %d agent processes", len(live))
        await asyncio.gather(*(p.stop(self.stop_grace_s) for p in live), return_exceptions=True)
        # Launches still inside spawn() see _closing when it returns and kill their child.
        await self._no_launches.wait()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=OUTPUT_DRAIN_S + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_launcher:
            await self.launcher.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def send_deadline(self, stop_at: float, kill_at: float) -> None:
        """Extends the lease deadline of every live process, those still starting included.

        Every agent of a host lives under the same host lease, so this is one broadcast, not
        a per-agent matter; an agent whose build takes longer than one renewal keeps being
        extended while it builds."""
        for proc in list(self._live):
            proc.send_deadline(stop_at, kill_at)

    def live(self) -> list[AgentProcess]:
        """Processes started here that have not exited (for the last-resort kill and for tests)."""
        return list(self._live)

    # -- launch ------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest, deadline: tuple[float, float]) -> AgentProcess:
        """Starts an agent and returns once it is built and subscribed.

        ``deadline`` is the first (stop_at, kill_at) the process enforces on itself (fence.py).
        Raises InvalidSpecError, ForbiddenModuleError, AgentLaunchError, LaunchTimeoutError (the
        child is killed first) or HostUnavailableError (closing). Cancellation kills the child.
        """
        key = request.key
        if not key.guild_id or not key.agent_id:
            raise InvalidSpecError("a launch request needs both a guild id and an agent id")
        if self._closing or not self._started:
            raise HostUnavailableError("the process manager is not running (not started, or closing)")
        self._launches += 1
        self._no_launches.clear()
        try:
            return await self._launch(key, request, deadline)
        finally:
            self._launches -= 1
            if not self._launches:
                self._no_launches.set()

    async def _launch(self, key: AgentKey, request: LaunchRequest, deadline: tuple[float, float]) -> AgentProcess:
        began = time.monotonic()
        proc: AgentProcess | None = None
        try:
            async with asyncio.timeout(self.launch_timeout_s):
                spawned = await self.launcher.spawn(request, deadline)
                proc = self._adopt(key, request, spawned)
                if self._closing:
                    raise HostUnavailableError(f"the host is shutting down; agent {key} was not started")
                proc.ready_info = await self._await_ready(proc)
                if proc.exit_code is not None:  # said ready, then died before we could hand it out
                    raise AgentLaunchError(self._failure(proc, f"exited with code {proc.exit_code} right after ready"))
        except TimeoutError:
            if proc is not None:
                await proc._kill_and_wait()
            log.warning("agent %s did not report ready within %.1f s; killed", key, self.launch_timeout_s)
            which = f"agent {key}" + (f" (pid {proc.pid}, killed)" if proc is not None else "")
            raise LaunchTimeoutError(
                f"{which} did not report ready within {self.launch_timeout_s:.1f} s" + self._tail(proc)
            ) from None
        except BaseException as exc:
            if proc is not None:
                await proc._kill_and_wait()
            if self._closing and isinstance(exc, AgentLaunchError):  # killed by close(), not by its own fault
                raise HostUnavailableError(f"the host is shutting down; agent {key} was not started") from exc
            raise
        proc.launch_s = time.monotonic() - began
        self.launcher.agent_ready(request)
        log.info("agent %s ready, pid %d (%s, %.2f s)", key, proc.pid, proc._spawned.info.get("mode"), proc.launch_s)
        return proc

    def _adopt(self, key: AgentKey, request: LaunchRequest, spawned: SpawnedProcess) -> AgentProcess:
        note_pid(spawned.pid)  # log lines about this agent carry its pid from here on (base/logfields.py)
        # Messaging passwords are masked in what the host keeps of the agent's output (base/redact.py).
        redactor = Redactor(messaging_secrets(request.messaging_config, request.guild_spec, os.environ))
        output = OutputBuffer(self.output_lines, redact=redactor if redactor else None)
        proc = AgentProcess(key, request, spawned, output)
        proc._grace_s = self.stop_grace_s
        self._live.add(proc)
        pump = self._spawn_task(proc.output.pump(spawned.output), f"agent-output:{key}")
        self._spawn_task(self._watch(proc, pump), f"agent-exit:{key}")
        return proc

    async def _await_ready(self, proc: AgentProcess) -> dict[str, Any]:
        spawned = proc._spawned
        try:
            line = await spawned.control.readline()
        except (ValueError, OSError) as exc:  # over-long line or a broken pipe
            line = b""
            log.warning("agent %s: unreadable control pipe: %s", proc.key, exc)
        finally:
            spawned.close_control()
        if not line:
            code = await proc.wait()
            raise AgentLaunchError(self._failure(proc, f"exited with code {code} before it was ready"))
        try:
            event = decode_event(line)
        except ValueError:
            raise AgentLaunchError(self._failure(proc, f"sent a garbled control message {line[:200]!r}")) from None
        if event["event"] == EVENT_READY:
            return event
        if event["event"] == EVENT_ERROR:
            message = str(event.get("message", ""))
            await proc.wait()  # the child exits right after reporting; its last output comes with it
            if event.get("kind") == KIND_INVALID_SPEC:
                raise InvalidSpecError(f"agent {proc.key}: {message}")
            if event.get("kind") == KIND_FORBIDDEN:
                raise ForbiddenModuleError(f"agent {proc.key}: {message}")
            raise AgentLaunchError(self._failure(proc, message))
        raise AgentLaunchError(self._failure(proc, f"sent an unknown control event {json.dumps(event)[:200]}"))

    def _failure(self, proc: AgentProcess, what: str) -> str:
        return f"agent {proc.key} (pid {proc.pid}) failed to start: {what}" + self._tail(proc)

    @staticmethod
    def _tail(proc: AgentProcess | None) -> str:
        lines = proc.output.tail(ERROR_OUTPUT_LINES) if proc is not None else []
        return ("\n--- last output ---\n" + "\n".join(lines)) if lines else ""

    # -- exit watching -----------------------------------------------------------------------

    def _spawn_task(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch(self, proc: AgentProcess, pump: asyncio.Task[None]) -> None:
        spawned = proc._spawned
        code = await spawned.wait()
        proc.exit_code = code
        self._live.discard(proc)
        # The output pipe reaches end of file when the child is gone; wait briefly for the
        # last lines so a crash report carries them.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(pump), OUTPUT_DRAIN_S)
        spawned.close()
        proc._exited.set()
        log.log(logging.INFO if proc.stopping else logging.WARNING, "agent %s (pid %d) exited with code %d%s",
                proc.key, proc.pid, code, "" if proc.stopping else " (not asked to)")
