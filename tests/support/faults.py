"""Fault injection with real parts: signals to real processes, a real Redis, a real TCP proxy.

Every fault is a context manager: the fault is in force inside the ``with`` block and is
healed in a ``finally``, whatever the block raises, so a failing test never leaves a
process stopped or a host cut off. The block's body is the fault's duration, usually an
``await asyncio.sleep(seconds)``.

* `paused(pid)` — SIGSTOP / SIGCONT of one process (a host frozen by the scheduler, a GC
  pause, a debugger): the host alone; its agents run on.
* `paused_tree(pid)` — the host and every process under it (fork server, agents, their
  helpers) stopped, as a pod frozen whole is (a cgroup freeze, a paused VM). Found from
  /proc parent links, not from process groups: agents and the fork server lead groups of
  their own, so the host's group is the host alone.
* `redis_paused(server)` — SIGSTOP of redis-server: connections stay open, nothing answers,
  data is kept.
* `redis_down(server, keep_data=...)` — redis-server stopped for the block's duration and
  started again on the same port, with its data (SHUTDOWN SAVE, then its RDB file) or empty.
* `cut_off(proxy, mode)` — one host (the one whose RUSTIC_K8S_REDIS_URL is the proxy) loses
  Redis while every other process keeps it: ``stall`` (silent drop), ``cut`` (reset, new
  connections hang) or ``refuse`` (reset, new connections refused).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

from .proxy import CuttableProxy
from .redis_server import RedisServer

log = logging.getLogger(__name__)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    _signal(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal(pid, signal.SIGCONT)


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        ppid = _ppid(int(entry))
        if ppid is not None:
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # it exited while we looked


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@contextlib.contextmanager
def paused_tree(pid: int) -> Iterator[None]:
    """The host first (it can then start nothing new), then everything under it; again until a
    listing finds nothing not yet stopped (a process forked while we were stopping the others).
    Resumed in the reverse order: agents, then the host.

    Each process is held by a pidfd from before its SIGSTOP to after its SIGCONT, and its parent
    is checked again once the pidfd is open: a pid that exited and was reused between the listing
    and the signal (or during the pause) is never stopped or resumed by mistake."""
    held: dict[int, int] = {}  # pid -> pidfd, in the order stopped
    looked: set[int] = set()  # held, or found not to be ours: each pid is decided once
    try:
        _hold_and_stop(pid, None, held)
        looked.add(pid)
        while fresh := [p for p in _descendants(pid) if p not in looked]:
            for p in fresh:  # parents come before their children in a listing
                _hold_and_stop(p, set(held), held)
                looked.add(p)
        yield
    finally:
        errors = []
        for p, fd in reversed(list(held.items())):
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGCONT)
            except OSError as exc:  # resume the others whatever one of them does
                errors.append(exc)
            finally:
                os.close(fd)
        if errors:
            raise errors[0]


def _hold_and_stop(pid: int, parents: set[int] | None, held: dict[int, int]) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone already
    if parents is not None and _ppid(pid) not in parents:  # reused, or reparented away: not ours
        os.close(fd)
        return
    held[pid] = fd  # before the signal: whatever happens next, the finally resumes it
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, signal.SIGSTOP)


@contextlib.contextmanager
def redis_paused(server: RedisServer) -> Iterator[None]:
    server.pause()
    try:
        yield
    finally:
        server.resume()


@contextlib.contextmanager
def redis_down(server: RedisServer, *, keep_data: bool) -> Iterator[None]:
    """Down for the block's duration; back on the same port afterwards, with or without its data."""
    server.shutdown(keep_data=keep_data)
    try:
        yield
    finally:
        server.start()


@contextlib.contextmanager
def cut_off(proxy: CuttableProxy, mode: str = "stall") -> Iterator[None]:
    {"stall": proxy.stall, "cut": proxy.cut, "refuse": proxy.refuse}[mode]()
    try:
        yield
    finally:
        proxy.heal()
