"""Fault injection with real parts: signals to real processes, a real Redis, a real TCP proxy.

Every fault is a context manager: the fault is in force inside the ``with`` block and is
healed in a ``finally``, whatever the block raises, so a failing test never leaves a
process stopped or a host cut off. The block's body is the fault's duration, usually an
``await asyncio.sleep(seconds)``.

* `paused(pid)` — SIGSTOP / SIGCONT of one process (a host frozen by the scheduler, a GC
  pause, a debugger). `paused_group(pid)` signals the process group the host leads
  (``os.killpg``; start the host with ``own_group=True``). Agent processes and the fork
  server put themselves in groups of their own, so today the host's group is the host
  alone; a design that kept agents in the host's group would freeze them with it.
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


@contextlib.contextmanager
def paused_group(pid: int) -> Iterator[None]:
    pgid = os.getpgid(pid)
    if pgid == os.getpgrp():
        raise RuntimeError(f"process {pid} shares the test's process group; start it with own_group=True")
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)


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
