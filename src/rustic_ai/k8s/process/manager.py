"""The process manager: the agents of one host, as child processes, and their whole lives.

``AgentProcessManager`` launches an agent (through a ``Launcher``) and returns only when
the agent reported ready, i.e. it is built and subscribed; it stops agents (SIGTERM, a
grace period, then SIGKILL to the agent's process group); and it notices at once when an
agent exits on its own, calling ``on_exit`` from the process's exit watcher rather than
at some later poll. Everything runs on the event loop: no threads and no blocking calls.

Each process has two tasks owned by the manager, cancelled by ``close()`` if still
running: a *pump* that drains its output into an ``OutputBuffer`` (so a child's pipe
never fills and blocks it) and a *watcher* that awaits its exit, records the exit code,
takes it out of the table and reports unexpected exits.

Bookkeeping rules: a key is reserved in ``_launching`` before the first await of a launch,
so two launches of one agent cannot both pass the duplicate check and a host cannot be
over-committed by launches in flight (they count towards capacity). No lock is held
across an await: launches run truly concurrently. A handle leaves the table the moment
its process exits; the caller keeps the handle with its exit code and output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self

from ..base.errors import (
    AgentAlreadyExistsError,
    AgentLaunchError,
    AgentNotFoundError,
    ForbiddenModuleError,
    HostFullError,
    HostUnavailableError,
    InvalidSpecError,
    LaunchTimeoutError,
)
from ..base.logfields import note_pid
from ..base.models import AgentKey, LaunchRequest
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
        self.stopping = False
        self.ready_info: dict[str, Any] = {}  # the child's ready report (pid, and launcher facts)
        self.launch_s = 0.0  # from launch() to ready, seconds
        self._spawned = spawned
        self._exited = asyncio.Event()
        # True once the launch succeeded, False if it failed: the watcher reports an exit
        # through on_exit only for agents a caller was told are running.
        self._launched: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.exit_code is None

    async def wait(self) -> int:
        """The exit code, once the process exited and its output was read to the end."""
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    def __repr__(self) -> str:
        return f"<AgentProcess {self.key} pid={self.pid} exit_code={self.exit_code}>"


class AgentProcessManager:
    def __init__(
        self,
        *,
        capacity: int,
        launch_timeout_s: float,
        stop_grace_s: float,
        output_lines: int,
        on_exit: Callable[[AgentProcess], Awaitable[None]] | None = None,
        launcher: Launcher | None = None,
        launch_mode: str = "warm",
        env: Mapping[str, str] | None = None,
        preload: tuple[str, ...] = (),
    ) -> None:
        """``launcher`` wins over ``launch_mode``/``env``/``preload``, which only build the default one.

        A launcher passed in is borrowed (the caller closes it); one built here is owned.
        """
        self.capacity = capacity
        self.launch_timeout_s = launch_timeout_s
        self.stop_grace_s = stop_grace_s
        self.output_lines = output_lines
        self._on_exit = on_exit
        self._owns_launcher = launcher is None
        self.launcher = launcher or make_launcher(launch_mode, env=env, preload=tuple(preload))
        self._procs: dict[AgentKey, AgentProcess] = {}
        self._launching: dict[AgentKey, AgentProcess | None] = {}  # reserved; the handle once spawned
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
        """Stops every agent concurrently, then releases the launcher. Idempotent; fine before start."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(), name="agent-processes:close")
        # Shielded: a caller cancelled mid-close must not leave half the agents running.
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = True
        running = list(self._procs.values())
        starting = [p for p in self._launching.values() if p is not None]
        if running or starting:
            log.info("stopping %d agent processes (%d still starting)", len(running) + len(starting), len(starting))
        await asyncio.gather(
            *(self._stop(p, self.stop_grace_s) for p in running),
            # Not serving yet, so nothing to shut down cleanly: their launches fail at once.
            *(self._kill(p) for p in starting),
            return_exceptions=True,
        )
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

    # -- queries -----------------------------------------------------------------------------

    def get(self, key: AgentKey) -> AgentProcess | None:
        """A running agent (launched and not exited); agents still starting are not listed."""
        return self._procs.get(key)

    def list(self) -> list[AgentProcess]:
        return list(self._procs.values())

    def __len__(self) -> int:
        """Agents this host is committed to: running plus still starting (what capacity limits)."""
        return len(self._procs) + len(self._launching)

    # -- launch ------------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> AgentProcess:
        """Starts an agent and returns once it is built and subscribed.

        Raises AgentAlreadyExistsError, HostFullError, InvalidSpecError, AgentLaunchError,
        LaunchTimeoutError (the child is killed first) or HostUnavailableError (closing).
        """
        key = request.key
        if not key.guild_id or not key.agent_id:
            raise InvalidSpecError("a launch request needs both a guild id and an agent id")
        if self._closing or not self._started:
            raise HostUnavailableError("the process manager is not running (not started, or closing)")
        if key in self._procs or key in self._launching:
            raise AgentAlreadyExistsError(f"agent {key} is already running or starting on this host")
        if len(self) >= self.capacity:
            raise HostFullError(f"this host is full ({self.capacity} agents)")
        # Reserved before the first await: a concurrent launch of the same key fails above.
        self._launching[key] = None
        self._no_launches.clear()
        try:
            return await self._launch(key, request)
        finally:
            self._launching.pop(key, None)
            if not self._launching:
                self._no_launches.set()

    async def _launch(self, key: AgentKey, request: LaunchRequest) -> AgentProcess:
        began = time.monotonic()
        proc: AgentProcess | None = None
        try:
            async with asyncio.timeout(self.launch_timeout_s):
                spawned = await self.launcher.spawn(request)
                proc = self._adopt(key, request, spawned)
                if self._closing:
                    raise HostUnavailableError(f"the host is shutting down; agent {key} was not started")
                proc.ready_info = await self._await_ready(proc)
                if proc.exit_code is not None:  # said ready, then died before we could hand it out
                    raise AgentLaunchError(self._failure(proc, f"exited with code {proc.exit_code} right after ready"))
        except TimeoutError:
            if proc is not None:
                proc._launched.set_result(False)
                await self._kill(proc)
            log.warning("agent %s did not report ready within %.1f s; killed", key, self.launch_timeout_s)
            which = f"agent {key}" + (f" (pid {proc.pid}, killed)" if proc is not None else "")
            raise LaunchTimeoutError(
                f"{which} did not report ready within {self.launch_timeout_s:.1f} s" + self._tail(proc)
            ) from None
        except BaseException as exc:
            if proc is not None:
                proc._launched.set_result(False)
                await self._kill(proc)
            if self._closing and isinstance(exc, AgentLaunchError):  # killed by close(), not by its own fault
                raise HostUnavailableError(f"the host is shutting down; agent {key} was not started") from exc
            raise
        # No await between here and the return: the table and the outcome change together.
        proc.launch_s = time.monotonic() - began
        self._procs[key] = proc
        proc._launched.set_result(True)
        self.launcher.agent_ready(request)
        log.info("agent %s ready, pid %d (%s, %.2f s)", key, proc.pid, proc._spawned.info.get("mode"), proc.launch_s)
        return proc

    def _adopt(self, key: AgentKey, request: LaunchRequest, spawned: SpawnedProcess) -> AgentProcess:
        note_pid(spawned.pid)  # log lines about this agent carry its pid from here on (base/logfields.py)
        proc = AgentProcess(key, request, spawned, OutputBuffer(self.output_lines))
        self._launching[key] = proc
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
        if self._procs.get(proc.key) is proc:
            del self._procs[proc.key]
        # The output pipe reaches end of file when the child is gone; wait briefly for the
        # last lines so a crash report carries them.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(pump), OUTPUT_DRAIN_S)
        spawned.close()
        proc._exited.set()
        launched = await proc._launched
        if not launched:
            return
        if proc.stopping:
            log.info("agent %s (pid %d) exited with code %d", proc.key, proc.pid, code)
            return
        log.warning("agent %s (pid %d) exited unexpectedly with code %d", proc.key, proc.pid, code)
        if self._on_exit is not None:
            try:
                await self._on_exit(proc)
            except Exception:
                log.exception("on_exit failed for agent %s", proc.key)

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, key: AgentKey, grace_s: float | None = None) -> AgentProcess:
        """SIGTERM, up to ``grace_s`` (default stop_grace_s) to exit, then SIGKILL; returns the exited handle."""
        proc = self._procs.get(key)
        if proc is None:
            raise AgentNotFoundError(f"agent {key} is not running on this host")
        await self._stop(proc, self.stop_grace_s if grace_s is None else grace_s)
        return proc

    def kill(self, key: AgentKey) -> AgentProcess:
        """SIGKILLs a running agent's process group *as a crash* (e.g. over its memory limit).

        Unlike ``stop()`` the agent is not marked as stopping, so its exit is reported
        through ``on_exit`` like any other unexpected exit (restarted or failed by policy).
        """
        proc = self._procs.get(key)
        if proc is None:
            raise AgentNotFoundError(f"agent {key} is not running on this host")
        proc._spawned.send_signal(signal.SIGKILL, group=True)
        return proc

    async def _stop(self, proc: AgentProcess, grace_s: float) -> None:
        proc.stopping = True
        if proc._stop_task is None:  # a second stop of the same agent joins the first
            proc._stop_task = asyncio.create_task(self._terminate(proc, grace_s), name=f"agent-stop:{proc.key}")
        await asyncio.shield(proc._stop_task)

    async def _terminate(self, proc: AgentProcess, grace_s: float) -> None:
        if proc._exited.is_set():
            return
        proc._spawned.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
            return
        except TimeoutError:
            log.warning("agent %s (pid %d) did not stop within %.1f s; sending SIGKILL", proc.key, proc.pid, grace_s)
        await self._kill(proc)

    async def _kill(self, proc: AgentProcess) -> None:
        proc.stopping = True
        proc._spawned.send_signal(signal.SIGKILL, group=True)
        # Shielded so that a cancelled launch still leaves no process behind when it re-raises.
        await asyncio.shield(proc.wait())
