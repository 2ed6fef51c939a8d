"""Agents with process-level behaviour, for the process manager's tests.

Agent processes import these by name (``support.agents.X``): the tests put ``tests/`` on
the children's PYTHONPATH.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rustic_ai.core.guild.agent import Agent

CHATTY_LINES = 300
LONG_LINE_BYTES = 100_000


class FailsOnInit(Agent):
    def __init__(self):
        raise RuntimeError("boom from FailsOnInit.__init__")


class IgnoresSigterm(Agent):
    """Stands for an agent stuck in a shutdown it never finishes: only SIGKILL ends it.

    Only against SIGTERM: the lease fence asks the main thread to stop without a signal
    (process/fence.py), so for the fence use HangsInShutdown.
    """

    def __init__(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NeverReady(Agent):
    """Blocks its own construction, so it never reports ready."""

    def __init__(self):
        print(f"never-ready pid={os.getpid()}", flush=True)
        threading.Event().wait()


HELPER_PID = "helper pid="


class StartsHelper(Agent):
    """Starts a long-running helper process (in its own process group) and prints its pid."""

    def __init__(self):
        helper = subprocess.Popen(["sleep", "300"])  # noqa: S607 - coreutils, on any test machine
        print(f"{HELPER_PID}{helper.pid}", flush=True)


class Chatty(Agent):
    """Prints many numbered lines and one very long line while it starts."""

    def __init__(self):
        for i in range(CHATTY_LINES):
            print(f"chatty line {i}", flush=True)
        sys.stdout.write("x" * LONG_LINE_BYTES + "\n")
        sys.stdout.flush()
        logging.getLogger("chatty").info("chatty agent logging to stderr")


HANGING_IN_SHUTDOWN = "hanging in shutdown"


class _HangsOnSecondPass(list):
    """A topic list whose second iteration never returns.

    rusticai-core iterates an agent's topics twice: to subscribe them while building it
    (execution/utils.py) and to unsubscribe them in ``AgentWrapper.shutdown()``.
    """

    def __init__(self, items) -> None:
        super().__init__(items)
        self._passes = 0

    def __iter__(self):
        self._passes += 1
        if self._passes > 1:
            print(HANGING_IN_SHUTDOWN, flush=True)
            threading.Event().wait()
        return super().__iter__()


class HangsInShutdown(Agent):
    """Its shutdown never finishes, however it was asked to stop (SIGTERM or the lease fence)."""

    def __init__(self):
        self.subscribed_topics = _HangsOnSecondPass(self.subscribed_topics)


TICK_DIR_ENV = "RK8S_TEST_TICK_DIR"
TICK_INTERVAL_S = 0.02


def tick_file(directory: str | Path, pid: int) -> Path:
    return Path(directory) / f"{pid}.ticks"


class Ticks(Agent):
    """Appends time.monotonic() to ``$RK8S_TEST_TICK_DIR/<pid>.ticks`` every 20 ms, from a thread.

    Shows whether any of the process's code ran after a given instant.
    """

    def __init__(self):
        path = tick_file(os.environ[TICK_DIR_ENV], os.getpid())
        threading.Thread(target=self._tick, args=(path,), name="ticks", daemon=True).start()

    @staticmethod
    def _tick(path: Path) -> None:
        with path.open("a", buffering=1) as f:  # line-buffered: one write() per tick
            while True:
                f.write(f"{time.monotonic():.6f}\n")
                time.sleep(TICK_INTERVAL_S)
