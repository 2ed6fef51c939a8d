"""How an agent process comes to exist: the ``Launcher`` interface and the cold launcher.

A launcher turns a ``LaunchRequest`` into a running child and hands back a
``SpawnedProcess``: its pid, a reader for its merged stdout/stderr, a reader for its
control pipe (see ``control.py``), an awaitable exit code and a way to signal it. What
the manager does with a process (waiting for ready, stopping, watching for crashes) is the
same whichever launcher made it, so launchers are interchangeable by a setting:

* ``ColdLauncher`` (``launch_mode="cold"``) starts a fresh interpreter per agent:
  ``python -m rustic_ai.k8s.process.child``. Simple and fully isolated, but every agent
  pays for importing rusticai-core again (about a second of CPU).
* ``ForkServerLauncher`` (``launch_mode="warm"``, in ``warm.py``) forks agents from a
  fork server that imported everything once.

Process groups: every agent is started in a process group of its own. A terminal's
Ctrl-C then reaches only the host, which drains in order (registry first, then agents)
instead of every agent dying at once underneath it, and the SIGKILL that ends a stop that
ran out of grace goes to the whole group, so helper processes an agent started die with
it. That a child never outlives its host is not a matter of groups: each agent arms
PR_SET_PDEATHSIG(SIGKILL) against the process that started it (``control.py``).

Signals are sent through a pidfd, which names one process for good: a signal can never
reach an unrelated process that was given a recycled pid.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
from collections.abc import Mapping
from typing import Any

from ..base.errors import ConfigError
from ..base.models import LaunchRequest
from .control import CONTROL_FD_ENV, LEASE_FD_ENV, PARENT_PID_ENV, encode_deadline

log = logging.getLogger(__name__)

CHILD_MODULE = "rustic_ai.k8s.process.child"
CONTROL_LINE_LIMIT = 1 << 16  # bytes of one control line; the child keeps its messages far shorter
LAUNCH_MODES = ("warm", "cold")


class PidHandle:
    """A pidfd and what it is good for: signalling one exact process, and asking if it exited."""

    def __init__(self, pid: int, pidfd: int | None) -> None:
        self.pid = pid
        self.fd = pidfd

    @classmethod
    def open(cls, pid: int) -> PidHandle:
        try:
            return cls(pid, os.pidfd_open(pid))
        except ProcessLookupError:  # already exited and reaped: there is nothing left to signal
            return cls(pid, None)

    def exited(self) -> bool:
        """True once the process has exited (a pidfd polls readable from then on)."""
        if self.fd is None:
            return True
        readable, _, _ = select.select([self.fd], [], [], 0)
        return bool(readable)

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signals the process (and its process group); a process that is gone is not an error."""
        if self.fd is None:
            return
        if group and not self.exited():
            # The leader has not exited, so its pid, which is the group id, cannot have been
            # recycled: the group we signal is the agent's.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, sig)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def lease_pipe(deadline: tuple[float, float]) -> tuple[int, int]:
    """(read end for the child, non-blocking write end for the host), the first deadline already in it.

    Written before the child exists, so the child's fence arms before it reads its request.
    """
    lease_r, lease_w = os.pipe()
    os.set_blocking(lease_w, False)
    os.write(lease_w, encode_deadline(*deadline))  # an empty pipe takes one short line
    return lease_r, lease_w


class SpawnedProcess(abc.ABC):
    """One child as a launcher started it; the manager owns it from here on."""

    pid: int
    output: asyncio.StreamReader  # stdout and stderr, merged
    control: asyncio.StreamReader  # the control pipe: one JSON line, then end of file
    info: dict[str, Any]  # launcher-specific facts, for logs and tests
    _lease_w: int | None = None  # the host's end of the lease pipe (fence.py)

    def send_deadline(self, stop_at: float, kill_at: float) -> None:
        """Extends the child's lease deadline; never blocks (a full pipe or a gone child drops the line).

        Dropping is the safe direction: the child keeps the older, earlier deadline.
        """
        if self._lease_w is None:
            return
        try:
            os.write(self._lease_w, encode_deadline(stop_at, kill_at))
        except BlockingIOError:
            pass
        except OSError:  # EPIPE: the child is gone
            self.close_lease()

    def close_lease(self) -> None:
        fd, self._lease_w = self._lease_w, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    @abc.abstractmethod
    async def wait(self) -> int:
        """The exit code once the process exited: negative for a signal (-9 = SIGKILL)."""

    @abc.abstractmethod
    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signals the process (with ``group``, its whole process group); no-op once it exited."""

    @abc.abstractmethod
    def close_control(self) -> None:
        """Releases the host's end of the control pipe (after the one line was read)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases every host-side resource; call after the process exited. Idempotent."""


class Launcher(abc.ABC):
    """Starts agent processes. ``start``/``close`` bracket its life; both are idempotent."""

    mode: str

    async def start(self) -> None:
        """Prepares to launch (a warm launcher starts its fork server here)."""

    async def close(self) -> None:
        """Releases the launcher. Processes it started are the manager's to stop, before this."""

    def agent_ready(self, request: LaunchRequest) -> None:  # noqa: B027 - an optional hook
        """Called (without awaiting) when an agent this launcher started reported ready."""

    @abc.abstractmethod
    async def spawn(self, request: LaunchRequest, deadline: tuple[float, float]) -> SpawnedProcess:
        """Starts one child for ``request`` and returns once it exists (not once it is ready).

        ``deadline`` is the first (stop_at, kill_at) for the child's lease fence (fence.py).
        Cancellation-safe: if cancelled after the child exists, the child is killed.
        """


def child_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    return env


async def read_pipe(fd: int, limit: int = CONTROL_LINE_LIMIT) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """Wraps the read end of a pipe in a StreamReader driven by the event loop (takes ownership of ``fd``)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    except BaseException:
        pipe.close()
        raise
    return reader, transport


class ColdProcess(SpawnedProcess):
    def __init__(self, proc: asyncio.subprocess.Process, control: asyncio.StreamReader,
                 control_transport: asyncio.BaseTransport, lease_w: int) -> None:
        assert proc.stdout is not None
        self._lease_w = lease_w
        self.pid = proc.pid
        self.output = proc.stdout
        self.control = control
        self.info = {"mode": "cold"}
        self._proc = proc
        self._control_transport = control_transport
        self._pid = PidHandle.open(proc.pid)

    async def wait(self) -> int:
        return await self._proc.wait()

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        self._pid.send_signal(sig, group=group)

    def close_control(self) -> None:
        self._control_transport.close()

    def close(self) -> None:
        self.close_control()
        self.close_lease()
        self._pid.close()


class ColdLauncher(Launcher):
    """A fresh ``python -m rustic_ai.k8s.process.child`` per agent."""

    mode = "cold"

    def __init__(self, *, env: Mapping[str, str] | None = None, python: str = sys.executable) -> None:
        self.env = dict(env or {})
        self.python = python

    async def spawn(self, request: LaunchRequest, deadline: tuple[float, float]) -> SpawnedProcess:
        data = request.model_dump_json().encode()
        control_r, control_w = os.pipe()  # all non-inheritable; pass_fds opens the child's ends to it only
        lease_r, lease_w = lease_pipe(deadline)
        try:
            control, control_transport = await read_pipe(control_r)
        except BaseException:
            for fd in (control_w, lease_r, lease_w):
                os.close(fd)
            raise
        env = child_environment(self.env)
        env[CONTROL_FD_ENV] = str(control_w)
        env[LEASE_FD_ENV] = str(lease_r)
        env[PARENT_PID_ENV] = str(os.getpid())
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", CHILD_MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(control_w, lease_r),
                env=env,
                process_group=0,
            )
        except BaseException:
            control_transport.close()
            os.close(lease_w)
            raise
        finally:
            # Only the child may hold these ends: its death must read as end of file here.
            os.close(control_w)
            os.close(lease_r)
        assert proc.stdin is not None
        # Buffered by the transport and flushed as the child reads; closing sends the end of
        # file that ends the request. Nothing is awaited, so there is no cancellation window
        # in which the child exists but nobody holds it.
        proc.stdin.write(data)
        proc.stdin.close()
        return ColdProcess(proc, control, control_transport, lease_w)


def make_launcher(mode: str, *, env: Mapping[str, str] | None = None, preload: tuple[str, ...] = ()) -> Launcher:
    """The launcher for a ``launch_mode`` setting: "warm" (fork server) or "cold"."""
    if mode == "cold":
        return ColdLauncher(env=env)
    if mode == "warm":
        from .warm import ForkServerLauncher

        return ForkServerLauncher(env=env, preload=preload)
    raise ConfigError(f"launch_mode={mode!r}: must be one of {', '.join(LAUNCH_MODES)}")
