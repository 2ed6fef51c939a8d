"""The host side of warm launches: ``ForkServerLauncher`` and the processes it forks.

The launcher starts the fork server (``forkserver.py``) as an asyncio subprocess and
talks to it over a socketpair. Per launch it makes the child's three pipes itself (stdin
for the request, output, control), sends the child's ends with the fork request, and
closes its copies once the server answered; the server forks and sends back the child's
pid and a pidfd. From then on the child is watched from here, on the event loop:

* the pidfd polls readable the instant the child exits, whether or not the server's exit
  report has arrived yet (``loop.add_reader``);
* the exit code comes from the server's report, since only the parent (the server) can
  reap a child. If the server died, its children died with it (PR_SET_PDEATHSIG), so
  their code is -9 (SIGKILL);
* signals go through the pidfd, so they reach the agent even after the server is gone.

If the fork server dies, the next ``spawn()`` starts a new one. A server restart is the
only thing spawns wait for together; forks themselves run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..base.errors import AgentLaunchError
from ..base.models import LaunchRequest
from .control import (
    FDS_PER_FORK,
    FORKSERVER_FD_ENV,
    FORKSERVER_MAX_MESSAGE,
    FORKSERVER_MODULE,
    PARENT_PID_ENV,
    PRELOAD_ENV,
)
from .launcher import Launcher, PidHandle, SpawnedProcess, child_environment, lease_pipe, read_pipe
from .output import OutputBuffer

log = logging.getLogger(__name__)

EXIT_REPORT_TIMEOUT_S = 5.0  # how long an exit seen on the pidfd waits for the server's report
EXIT_UNKNOWN = 255  # the child exited but the (live) server never said how
KILLED_WITH_SERVER = -signal.SIGKILL  # PR_SET_PDEATHSIG of a child whose fork server died


class _ForkServer:
    """One fork server process, as the host sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.fd = sock.fileno()  # kept: fileno() reads -1 once the socket is closed
        self.hello: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.lost = asyncio.Event()
        self.learn_asked: set[str] = set()  # modules this server was asked to preload
        self.learned_ok: set[str] = set()  # and those it did
        self.learn_refused: dict[str, str] = {}  # module -> why the server would not preload it
        self.closing = False
        self.output = OutputBuffer(200)
        self._pending: dict[int, asyncio.Future[tuple[int, int | None]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._writable: set[asyncio.Future[None]] = set()  # sends waiting for room in the socket
        self._next_id = 0
        self._tasks = [
            asyncio.create_task(self._log_output(), name=f"fork-server-output:{self.pid}"),
            asyncio.create_task(self._watch(), name=f"fork-server-exit:{self.pid}"),
        ]
        self.loop.add_reader(self.fd, self._on_readable)

    # -- incoming ----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        while not self.lost.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, FORKSERVER_MAX_MESSAGE, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lose(f"socket error: {exc}")
                return
            if not msg:
                self._lose("closed its socket")
                return
            try:
                self._dispatch(json.loads(msg), fds)
            except Exception:
                log.exception("fork server %d: bad message %r", self.pid, msg[:200])
                for fd in fds:
                    os.close(fd)

    def _dispatch(self, event: dict[str, Any], fds: list[int]) -> None:
        kind = event.get("event")
        if kind == "forked":
            fut = self._pending.pop(event["id"], None)
            pidfd = fds[0] if fds else None
            if fut is None or fut.done():  # the launch was cancelled meanwhile; the child fails on its own
                if pidfd is not None:
                    os.close(pidfd)
                return
            # Registered now, in the same callback: the exit report may be the very next message.
            self._exits[event["pid"]] = self.loop.create_future()
            fut.set_result((event["pid"], pidfd))
        elif kind == "exit":
            exit_fut = self._exits.pop(event["pid"], None)
            if exit_fut is not None and not exit_fut.done():
                exit_fut.set_result(int(event["exit"]))
        elif kind == "fork_error":
            fut = self._pending.pop(event.get("id"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_exception(AgentLaunchError(f"fork server could not fork: {event.get('message')}"))
        elif kind == "hello":
            if not self.hello.done():
                self.hello.set_result(event)
        elif kind == "learned":
            module = str(event.get("module"))
            if event.get("ok"):
                self.learned_ok.add(module)
                log.info("fork server %d now preloads %s", self.pid, module)
            else:
                self.learn_refused[module] = str(event.get("reason"))
                log.info("fork server %d will not preload %s: %s", self.pid, module, event.get("reason"))
        for fd in fds[1:] if kind == "forked" else fds:
            os.close(fd)

    async def _log_output(self) -> None:
        assert self.proc.stdout is not None
        seen = 0
        while chunk := await self.proc.stdout.read(1 << 16):
            self.output.feed(chunk)
            new = self.output.total_lines - seen
            seen = self.output.total_lines
            for line in self.output.tail(new):
                log.info("fork server %d: %s", self.pid, line)

    async def _watch(self) -> None:
        code = await self.proc.wait()
        self._lose(f"exited with code {code}")

    def _lose(self, why: str) -> None:
        """The server is gone: fail what waits on it; its children died with it."""
        if self.lost.is_set():
            return
        self.lost.set()
        log.log(logging.INFO if self.closing else logging.WARNING, "fork server %d %s", self.pid, why)
        self._close_socket()
        error = AgentLaunchError(f"the fork server (pid {self.pid}) {why}" + self._tail())
        for waiter in self._writable:
            if not waiter.done():
                waiter.set_exception(error)
        if not self.hello.done():
            self.hello.set_exception(error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        for fut in self._exits.values():
            if not fut.done():
                fut.set_result(KILLED_WITH_SERVER)
        self._exits.clear()

    def _close_socket(self) -> None:
        # Once only: after close() the fd number may belong to someone else's file.
        if self.sock.fileno() != -1:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.sock.close()

    def _tail(self) -> str:
        lines = self.output.tail(20)
        return ("\n--- fork server output ---\n" + "\n".join(lines)) if lines else ""

    # -- outgoing ----------------------------------------------------------------------------

    async def fork(self, fds: list[int]) -> tuple[int, int | None, asyncio.Future[int]]:
        """Asks for one child holding ``fds``; returns its pid, pidfd and exit-code future."""
        if self.lost.is_set():
            raise AgentLaunchError(f"the fork server (pid {self.pid}) is gone")
        self._next_id += 1
        req_id = self._next_id
        fut: asyncio.Future[tuple[int, int | None]] = self.loop.create_future()
        self._pending[req_id] = fut
        try:
            await self._send({"op": "fork", "id": req_id}, fds)
            pid, pidfd = await fut
        finally:
            self._pending.pop(req_id, None)
        exit_fut = self._exits.get(pid)
        if exit_fut is None:  # lost between the answer and now
            exit_fut = self.loop.create_future()
            exit_fut.set_result(KILLED_WITH_SERVER)
        return pid, pidfd, exit_fut

    async def learn(self, module: str) -> None:
        """Asks the server to preload ``module`` for later forks (once per module and server)."""
        if module in self.learn_asked:
            return
        self.learn_asked.add(module)
        await self._send({"op": "learn", "module": module}, [])

    async def _send(self, event: dict[str, Any], fds: list[int]) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        while True:
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:  # the server is behind; wait until the socket drains (or it dies)
                ready: asyncio.Future[None] = self.loop.create_future()
                self._writable.add(ready)
                self.loop.add_writer(self.fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    self._writable.discard(ready)
                    if self.sock.fileno() != -1:
                        self.loop.remove_writer(self.fd)
            except OSError as exc:
                self._lose(f"cannot be written to: {exc}")
                raise AgentLaunchError(f"the fork server (pid {self.pid}) is gone: {exc}") from None

    async def close(self, timeout_s: float = 5.0) -> None:
        """Closes the socket (the server exits on end of file); kills it if it lingers."""
        self.closing = True
        self._close_socket()
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self._lose("was closed")
        await asyncio.gather(*self._tasks, return_exceptions=True)


class WarmProcess(SpawnedProcess):
    def __init__(self, pid: int, pidfd: int | None, exit_code: asyncio.Future[int], server_pid: int,
                 output: asyncio.StreamReader, control: asyncio.StreamReader,
                 transports: list[asyncio.BaseTransport], lease_w: int) -> None:
        self.pid = pid
        self._lease_w = lease_w
        self.output = output
        self.control = control
        self.info = {"mode": "warm", "forkserver_pid": server_pid}
        self._loop = asyncio.get_running_loop()
        self._pid = PidHandle(pid, pidfd)
        self._exit_code = exit_code
        self._output_transport, self._control_transport = transports
        self._exit_seen = asyncio.Event()
        self._code: int | None = None
        if pidfd is None:  # the server could not open one: the child was already gone
            self._exit_seen.set()
        else:
            self._loop.add_reader(pidfd, self._on_exit_seen)

    def _on_exit_seen(self) -> None:
        assert self._pid.fd is not None
        self._loop.remove_reader(self._pid.fd)
        self._exit_seen.set()

    async def wait(self) -> int:
        if self._code is None:
            await self._exit_seen.wait()
            try:
                code = await asyncio.wait_for(asyncio.shield(self._exit_code), EXIT_REPORT_TIMEOUT_S)
            except TimeoutError:
                log.warning("agent pid %d exited but the fork server did not report its exit code", self.pid)
                code = EXIT_UNKNOWN
            if self._code is None:
                self._code = code
        return self._code

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        self._pid.send_signal(sig, group=group)

    def close_control(self) -> None:
        self._control_transport.close()

    def close(self) -> None:
        self.close_control()
        self.close_lease()
        self._output_transport.close()
        if self._pid.fd is not None and not self._exit_seen.is_set():
            self._loop.remove_reader(self._pid.fd)
        self._pid.close()


class ForkServerLauncher(Launcher):
    """Forks agents from a pre-imported fork server, restarted on demand if it dies."""

    mode = "warm"

    def __init__(self, *, env: Mapping[str, str] | None = None, preload: tuple[str, ...] = (),
                 python: str = sys.executable, start_timeout_s: float = 120.0) -> None:
        self.env = dict(env or {})
        self.preload = tuple(preload)
        self.python = python
        self.start_timeout_s = start_timeout_s
        self.hello: dict[str, Any] = {}  # the current server's hello: pid, preloaded modules, threads
        self.starts = 0  # fork servers started so far (restarts show up here)
        self._server: _ForkServer | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._learn_tasks: set[asyncio.Task] = set()

    @property
    def learned(self) -> set[str]:
        """Modules the current fork server learned to preload (adaptive preload)."""
        server = self._server
        return set(server.learned_ok) if server is not None else set()

    @property
    def learn_refusals(self) -> dict[str, str]:
        """Modules the current fork server would not preload, with the reason."""
        server = self._server
        return dict(server.learn_refused) if server is not None else {}

    @property
    def server_pid(self) -> int | None:
        server = self._server
        return server.pid if server is not None and not server.lost.is_set() else None

    async def start(self) -> None:
        await self._ensure_server()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._learn_tasks):
            task.cancel()
        await asyncio.gather(*self._learn_tasks, return_exceptions=True)
        async with self._start_lock:
            server, self._server = self._server, None
        if server is not None:
            await server.close()

    async def _ensure_server(self) -> _ForkServer:
        if self._closed:
            raise AgentLaunchError("the launcher is closed")
        server = self._server
        if server is not None and not server.lost.is_set():
            return server
        # Held across the start on purpose: concurrent spawns after a crash share one restart.
        async with self._start_lock:
            if self._server is None or self._server.lost.is_set():
                self._server = await self._start_server()
            return self._server

    async def _start_server(self) -> _ForkServer:
        host_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = child_environment(self.env)
        env[FORKSERVER_FD_ENV] = str(server_sock.fileno())
        env[PARENT_PID_ENV] = str(os.getpid())
        if self.preload:
            env[PRELOAD_ENV] = ",".join(filter(None, [env.get(PRELOAD_ENV, ""), *self.preload]))
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", FORKSERVER_MODULE,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(server_sock.fileno(),),
                env=env,
                process_group=0,  # a terminal's Ctrl-C must not kill it (and all agents) under the host
            )
        except BaseException:
            host_sock.close()
            raise
        finally:
            server_sock.close()
        host_sock.setblocking(False)
        server = _ForkServer(proc, host_sock)
        try:
            hello = await asyncio.wait_for(asyncio.shield(server.hello), self.start_timeout_s)
        except BaseException:
            await server.close(timeout_s=0)
            raise
        self.hello = hello
        self.starts += 1
        if hello.get("threads", 1) != 1:
            log.error("fork server %d runs %s threads; forked agents may deadlock", server.pid, hello.get("threads"))
        log.info("fork server %d ready (%d modules preloaded in %.2f s)", server.pid,
                 len(hello.get("preloaded", [])), hello.get("preload_s", 0.0))
        return server

    async def spawn(self, request: LaunchRequest, deadline: tuple[float, float]) -> SpawnedProcess:
        data = request.model_dump_json().encode()
        server = await self._ensure_server()
        try:
            return await self._spawn_on(server, data, deadline)
        except AgentLaunchError:
            # A server that died a moment ago may not have been noticed yet when this launch
            # began; that is no fault of the request, so it gets one more try on a new server.
            if not server.lost.is_set() or self._closed:
                raise
            log.warning("fork server %d died during a launch; retrying on a new one", server.pid)
            return await self._spawn_on(await self._ensure_server(), data, deadline)

    def agent_ready(self, request: LaunchRequest) -> None:
        """The next fork of this agent class should not pay for importing its module again.

        Asked only once the agent is ready, so the trial import does not compete with the
        launch itself for the CPU."""
        server = self._server
        module = str(request.agent_spec.get("class_name", "")).rpartition(".")[0]
        if not module or server is None or server.lost.is_set() or module in server.learn_asked:
            return
        task = asyncio.get_running_loop().create_task(self._learn(server, module), name=f"learn:{module}")
        self._learn_tasks.add(task)
        task.add_done_callback(self._learn_tasks.discard)

    @staticmethod
    async def _learn(server: _ForkServer, module: str) -> None:
        with contextlib.suppress(OSError):
            await server.learn(module)

    async def _spawn_on(self, server: _ForkServer, data: bytes, deadline: tuple[float, float]) -> SpawnedProcess:
        loop = asyncio.get_running_loop()
        cleanup: list[Callable[[], None]] = []
        child_ends: list[int] = []
        try:
            stdin_r, stdin_w = os.pipe()
            child_ends.append(stdin_r)
            cleanup.append(lambda: os.close(stdin_w))
            out_r, out_w = os.pipe()
            child_ends.append(out_w)
            output, output_transport = await read_pipe(out_r)
            cleanup.append(output_transport.close)
            ctl_r, ctl_w = os.pipe()
            child_ends.append(ctl_w)
            control, control_transport = await read_pipe(ctl_r)
            cleanup.append(control_transport.close)
            lease_r, lease_w = lease_pipe(deadline)
            child_ends.append(lease_r)
            cleanup.append(lambda: os.close(lease_w))
            stdin_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(stdin_w, "wb", buffering=0))
            cleanup[0] = stdin_transport.close
            # Written before the fork, so the child finds its request waiting instead of waiting
            # for us to hear its pid first: the transport puts what fits in the pipe now and the
            # rest as the child reads, then end of file. No await.
            stdin_transport.write(data)  # type: ignore[attr-defined]
            stdin_transport.close()
            assert len(child_ends) == FDS_PER_FORK
            pid, pidfd, exit_code = await server.fork(child_ends)
        except BaseException:
            for undo in reversed(cleanup):
                with contextlib.suppress(OSError):
                    undo()
            raise
        finally:
            # The child (if any) has its copies; ours must go, or its death would never read as EOF.
            for fd in child_ends:
                os.close(fd)
        return WarmProcess(pid, pidfd, exit_code, server.pid, output, control, [output_transport, control_transport],
                           lease_w)
