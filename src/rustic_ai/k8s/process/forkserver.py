"""The fork server ("zygote"): a pre-imported interpreter that forks agent processes.

Starting an agent cold costs a new interpreter and about a second of CPU importing
rusticai-core, pydantic and the messaging backend before any agent code runs. The fork
server pays that once: ``python -m rustic_ai.k8s.process.forkserver`` imports those
modules (plus any listed in ``RUSTIC_AGENT_HOST_PRELOAD``, comma-separated), freezes the
garbage collector's view of them (so children do not dirty the shared pages by merely
scanning them), and then forks one child per request. A forked child starts with
everything already imported and shares those pages copy-on-write with its siblings.

Protocol, over a SOCK_SEQPACKET Unix socket the host passes in (fd number in
``RUSTIC_K8S_FORKSERVER_FD``); every message is one JSON object, nothing is pickled:

    server -> host  {"event": "hello", "pid": P, "preloaded": [...], "threads": 1, ...}
    host -> server  {"op": "fork", "id": N}   + fds [stdin read end, output write end, control write end,
                                                   lease read end]
    server -> host  {"event": "forked", "id": N, "pid": C}   + fds [pidfd of C]
    server -> host  {"event": "fork_error", "id": N, "message": "..."}
    server -> host  {"event": "exit", "pid": C, "exit": code}   (after reaping C; negative = signal)
    host -> server  {"op": "learn", "module": "pkg.agents"}   (no fds)
    server -> host  {"event": "learned", "module": "pkg.agents", "ok": true|false, "reason": "..."}

Learning (adaptive preload): the first launch of an agent class pays for importing the
class's module in the child. After it the host asks the server to learn that module, so
later forks of the class start with it imported. An import runs arbitrary top-level code,
and a module that starts a thread would make every later fork unsafe, so the server
first imports it in a throwaway forked child that reports, through its exit code, whether
the import worked and left the process single-threaded; only then does the server import
it itself. ``RUSTIC_AGENT_HOST_LEARN_PRELOAD=0`` turns learning off.

The host creates all three pipes, so it holds the other ends and the request itself goes
down the child's stdin exactly as for a cold start; the server never sees it. The pidfd
is opened by the server right after fork, before it can possibly reap the child, so it
names that child even if its pid is recycled later. End of file on the socket (the host
closed it or died) ends the server.

A spare: forking the server and setting the child up (its process group, the parent-death
signal, dropping the server's descriptors) was a few milliseconds of every launch. So the
server keeps one child forked ahead that waits, already set up, on a socket of its own; a
fork request hands the request's fds to it and answers with its pid at once, and the next
spare is forked once the server has had nothing to do for SPARE_DELAY_S (a burst of
requests is served first, by plain forks). A learned module makes the spare stale: it is
replaced, so every child has what the server preloads. An unused spare dies with the
server like any child.

Life and death: the server arms PR_SET_PDEATHSIG(SIGKILL) against the host and each child
arms it against the server, so the chain host -> server -> agent never leaves an agent
behind a dead host. The price: if the fork server dies, the agents it forked die with it
(the host sees each exit at once through its pidfd and reports it like any crash).

Threads: forking a process that runs threads can leave a child with a lock held forever,
so this process must stay single-threaded. rusticai-core's imports start no threads
(checked at startup and reported as ``threads`` in the hello; more than one is logged as
an error). The server is a plain ``selectors`` loop, not asyncio, and reaps children on
SIGCHLD through ``signal.set_wakeup_fd``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from rustic_ai.k8s.base.allowlist import ModuleAllowList
from rustic_ai.k8s.process.control import (
    EXIT_ORPHANED,
    FDS_PER_FORK,
    FORKSERVER_FD_ENV,
    FORKSERVER_MAX_MESSAGE,
    FORKSERVER_MODULE,
    PARENT_PID_ENV,
    PRELOAD_ENV,
    set_parent_death_signal,
)

CORE_PRELOAD = (
    "rustic_ai.core.guild.agent",
    "rustic_ai.core.guild.dsl",
    "rustic_ai.core.messaging",
    "rustic_ai.core.guild.execution.agent_wrapper",
    "rustic_ai.core.guild.execution.utils",
    "rustic_ai.k8s.process.child",
)
OPTIONAL_PRELOAD = ("rustic_ai.redis.messaging.backend",)

# Under ``-m`` this module is __main__; name the logger after the module all the same.
log = logging.getLogger(FORKSERVER_MODULE)

PRELOADED: list[str] = []  # what this server imported ahead; forked children report it


def preload(extra: list[str]) -> list[str]:
    """Imports the modules agents need; returns those that imported. Failures are logged, not fatal."""
    done = []
    for name in (*CORE_PRELOAD, *OPTIONAL_PRELOAD, *extra):
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as exc:  # a child then imports (or fails on) it itself, as a cold start would
            level = logging.DEBUG if name in OPTIONAL_PRELOAD else logging.WARNING
            log.log(level, "preload of %s failed: %s: %s", name, type(exc).__name__, exc)
    _read_redis_version_once()
    return done


def _read_redis_version_once() -> None:
    """redis-py reads its own version from the installed package's metadata (a file read and a
    header parse, 1-2 ms) each time it builds a client, and every agent builds one while it
    launches. It cannot change while the process lives: read it here, once, for every fork."""
    try:
        # By name, like the preloads above: a library of the agents' (their messaging
        # clients), not a registry connection of the process machinery's own.
        redis_utils = importlib.import_module("redis.utils")
    except ImportError:
        return
    if not hasattr(redis_utils.get_lib_version, "cache_info"):
        redis_utils.get_lib_version = functools.cache(redis_utils.get_lib_version)
    redis_utils.get_lib_version()


def os_thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


LEARN_ENV = "RUSTIC_AGENT_HOST_LEARN_PRELOAD"
SLOW_IMPORT_S = 1.0  # a module whose trial import takes longer is not preloaded
_TRIAL_OK, _TRIAL_IMPORT_FAILED, _TRIAL_THREADS = 0, 1, 2


def _module_name_ok(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) < 256 and all(p.isidentifier() for p in name.split("."))


SPARE_DELAY_S = 0.01  # idle time before the next spare child is forked


class _Spare:
    """A child forked ahead, set up, blocked until the server sends it a launch's fds."""

    def __init__(self, pid: int, pidfd: int | None, sock: socket.socket) -> None:
        self.pid, self.pidfd, self.sock = pid, pidfd, sock

    def close(self) -> None:
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ForkServer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = os.pipe()
        self.learning = os.environ.get(LEARN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self._trials: dict[int, tuple[str, float]] = {}  # pid of a trial-import child -> (module, started)
        self._spare: _Spare | None = None
        self._spare_sock: socket.socket | None = None  # in a spare: where its fds come from
        self._dropped: set[int] = set()  # spares killed unused: their exits are no agent's
        self._no_spare_until = 0.0  # after a failed spare fork, leave it for a while

    def serve(self, hello: dict[str, Any]) -> int:
        os.set_blocking(self.wakeup_w, False)
        os.set_blocking(self.wakeup_r, False)
        # SIGCHLD needs a Python handler for the wakeup fd to be written; the handler itself
        # does nothing, the loop reaps when the wakeup fd turns readable.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self.sock, selectors.EVENT_READ, "sock")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")
        self._send(hello)
        while True:
            # Without a spare, wait at most SPARE_DELAY_S: quiet that long, fork the next one.
            events = self.selector.select(None if self._spare is not None else SPARE_DELAY_S)
            if not events:
                if self._spare is None and time.monotonic() >= self._no_spare_until:
                    self._fork_spare()
                continue
            for key, _ in events:
                if key.data == "wakeup":
                    self._drain_wakeup()
                    self._reap()
                    continue
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, FORKSERVER_MAX_MESSAGE, FDS_PER_FORK,
                                                          socket.MSG_CMSG_CLOEXEC)
                if not msg:
                    log.info("fork server %d: host closed the socket; exiting", self.pid)
                    return 0
                self._handle(msg, fds)

    def _handle(self, msg: bytes, fds: list[int]) -> None:
        try:
            request = json.loads(msg)
            if isinstance(request, dict) and request.get("op") == "learn" and not fds:
                self._learn(request.get("module"))
                return
            req_id = request["id"]
            if request.get("op") != "fork" or len(fds) != FDS_PER_FORK:
                raise ValueError(f"bad request {msg[:200]!r} with {len(fds)} fds")
        except (ValueError, KeyError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            log.error("fork server: %s", exc)
            self._send({"event": "fork_error", "id": None, "message": str(exc)})
            return
        try:
            spare = self._hand_to_spare(fds)
            if spare is not None:
                pid, pidfd = spare.pid, spare.pidfd
                spare.pidfd = None
                spare.close()
            else:
                pid = self._fork(fds)
                try:
                    pidfd = os.pidfd_open(pid)  # before the next _reap(): it names this very child
                except OSError:
                    pidfd = None
        except OSError as exc:
            self._send({"event": "fork_error", "id": req_id, "message": f"fork failed: {exc}"})
            return
        finally:
            for fd in fds:  # the child has its copies; ours must go or the pipes never see EOF
                os.close(fd)
        try:
            self._send({"event": "forked", "id": req_id, "pid": pid}, [pidfd] if pidfd is not None else [])
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _hand_to_spare(self, fds: list[int]) -> _Spare | None:
        """The waiting spare, now holding ``fds``; None when there is none that is alive."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            socket.send_fds(spare.sock, [b"go"], fds)
        except OSError:  # it died (its end is closed): fork one instead; _reap() collects it
            spare.close()
            return None
        return spare

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            self._no_spare_until = time.monotonic() + 5.0
            log.warning("fork server: cannot fork a spare child: %s", exc)
            return
        if pid == 0:
            ours.close()
            self._spare_sock = theirs
            become_agent(self)
        theirs.close()
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        self._spare = _Spare(pid, pidfd, ours)

    def _drop_spare(self) -> None:
        """The spare lacks something the server has since imported: the next one will have it."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.pid, signal.SIGKILL)
            self._dropped.add(spare.pid)
            spare.close()

    def _fork(self, fds: list[int]) -> int:
        for stream in (sys.stdout, sys.stderr):  # or buffered server output would repeat in the child
            stream.flush()
        pid = os.fork()
        if pid == 0:
            become_agent(self, fds)
        try:
            os.setpgid(pid, pid)  # also done by the child; whichever runs first wins the race
        except OSError:
            pass
        return pid

    def _learn(self, module: object) -> None:
        if not _module_name_ok(module):
            self._send({"event": "learned", "module": str(module)[:200], "ok": False, "reason": "bad module name"})
            return
        assert isinstance(module, str)
        if not self.learning:
            self._send({"event": "learned", "module": module, "ok": False, "reason": "learning is off"})
            return
        if not ModuleAllowList.from_env().allows(module):
            # The module comes from a launch request that no child has validated yet: this
            # import would bypass the allow-list the agent process enforces (base/allowlist.py).
            self._send({"event": "learned", "module": module, "ok": False, "reason": "outside the module allow-list"})
            return
        if module in sys.modules or module in (m for m, _ in self._trials.values()):
            self._send({"event": "learned", "module": module, "ok": module in sys.modules, "reason": "known"})
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the trial: import, count threads, report through the exit code
            code = _TRIAL_IMPORT_FAILED
            try:
                self.release_in_child()
                importlib.import_module(module)
                code = _TRIAL_OK if os_thread_count() == 1 else _TRIAL_THREADS
            finally:
                os._exit(code)
        self._trials[pid] = (module, time.monotonic())

    def _trial_done(self, module: str, code: int, took_s: float) -> None:
        if code == _TRIAL_OK and took_s > SLOW_IMPORT_S:
            # This server forks every agent of the host: an import that takes seconds here
            # would hold every launch up meanwhile. Such a module keeps being imported in
            # each agent process instead, where it only delays that agent.
            reason = f"importing it took {took_s:.1f} s (over {SLOW_IMPORT_S:.0f} s); not worth stalling forks"
        elif code == _TRIAL_THREADS:
            reason = "importing it starts threads; forking after that would be unsafe"
        elif code != _TRIAL_OK:
            reason = f"trial import failed (exit {code})"
        else:
            try:
                importlib.import_module(module)
                gc.collect()
                gc.freeze()
            except Exception as exc:  # noqa: BLE001 - the trial passed; report, do not die
                reason = f"{type(exc).__name__}: {exc}"
            else:
                PRELOADED.append(module)
                self._drop_spare()
                self._send({"event": "learned", "module": module, "ok": True, "reason": ""})
                return
        log.info("fork server: not preloading %s: %s", module, reason)
        self._send({"event": "learned", "module": module, "ok": False, "reason": reason})

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._trials:
                module, started = self._trials.pop(pid)
                self._trial_done(module, os.waitstatus_to_exitcode(status), time.monotonic() - started)
                continue
            if pid in self._dropped:
                self._dropped.discard(pid)
                continue
            if self._spare is not None and pid == self._spare.pid:  # died unused: no agent to report
                log.warning("fork server: spare child %d exited unused (%s)", pid, os.waitstatus_to_exitcode(status))
                self._spare.close()
                self._spare = None
                continue
            self._send({"event": "exit", "pid": pid, "exit": os.waitstatus_to_exitcode(status)})

    def _send(self, event: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def release_in_child(self) -> None:
        """Drops everything of the server's a forked child must not keep (the socket above all:
        held by children it would hide the server's death from the host)."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        self.sock.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self._spare is not None:  # a sibling's socket: not ours to hold
            self._spare.close()
            self._spare = None


def become_agent(server: ForkServer, fds: list[int] | None = None) -> NoReturn:
    """Runs in the forked child: becomes an agent process, never returns into the server loop.

    ``fds`` are the launch's (stdin, output, control, lease); a spare has none yet and waits
    for them on its socket, set up meanwhile."""
    code = 1
    try:
        from rustic_ai.k8s.process import child

        forked_at = time.monotonic()
        if not set_parent_death_signal(server.pid):
            os._exit(EXIT_ORPHANED)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        spare_sock = server._spare_sock
        server.release_in_child()
        if fds is None:
            assert spare_sock is not None
            msg, fds, _flags, _addr = socket.recv_fds(spare_sock, 16, FDS_PER_FORK)
            spare_sock.close()
            if not msg or len(fds) != FDS_PER_FORK:  # the server closed it (dropped, or gone): never used
                os._exit(0)
            forked_at = time.monotonic()
        stdin_fd, output_fd, control_fd, lease_fd = fds
        os.dup2(stdin_fd, 0)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        for fd in (stdin_fd, output_fd):
            if fd > 2:
                os.close(fd)
        os.set_inheritable(control_fd, False)  # an agent's own subprocesses must not keep these open
        os.set_inheritable(lease_fd, False)
        request = child.read_all(0)
        extra = {"warm": True, "forkserver_pid": server.pid, "preloaded": PRELOADED,
                 "read_request_s": round(time.monotonic() - forked_at, 4)}
        code = child.run(request, control_fd, lease_fd, ready_extra=extra)
        child.finish(code)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code or 1)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [fork server pid %(process)d] %(name)s: %(message)s")
    parent = int(os.environ.get(PARENT_PID_ENV) or 0) or None
    if not set_parent_death_signal(parent):
        return 1
    # Ctrl-C is the host's to handle: it drains, then closes us. SIGTERM keeps its default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(os.environ[FORKSERVER_FD_ENV]))
    sock.set_inheritable(False)

    began = time.monotonic()
    extra = [m.strip() for m in os.environ.get(PRELOAD_ENV, "").split(",") if m.strip()]
    PRELOADED.extend(preload(extra))
    preload_s = time.monotonic() - began
    # Everything imported so far lives as long as the server: move it out of the collector's
    # sight, so a child's collections do not write to (and so un-share) those pages.
    gc.collect()
    gc.freeze()
    threads = os_thread_count()
    if threads != 1:
        log.error("fork server: %d threads are running after the preload; forking is unsafe "
                  "(a module in RUSTIC_AGENT_HOST_PRELOAD probably starts one)", threads)
    log.info("fork server ready: %d modules preloaded in %.2f s", len(PRELOADED), preload_s)
    hello = {"event": "hello", "pid": os.getpid(), "preloaded": PRELOADED, "threads": threads,
             "preload_s": round(preload_s, 3), "modules": len(sys.modules)}
    return ForkServer(sock).serve(hello)


if __name__ == "__main__":
    sys.exit(main())
