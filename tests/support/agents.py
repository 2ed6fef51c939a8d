"""Agents with process-level behaviour, for the process manager's tests.

Agent processes import these by name (``support.agents.X``): the tests put ``tests/`` on
the children's PYTHONPATH.
"""

import logging
import os
import signal
import sys
import threading

from rustic_ai.core.guild.agent import Agent

CHATTY_LINES = 300
LONG_LINE_BYTES = 100_000


class FailsOnInit(Agent):
    def __init__(self):
        raise RuntimeError("boom from FailsOnInit.__init__")


class IgnoresSigterm(Agent):
    """Stands for an agent stuck in a shutdown it never finishes: only SIGKILL ends it."""

    def __init__(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NeverReady(Agent):
    """Blocks its own construction, so it never reports ready."""

    def __init__(self):
        print(f"never-ready pid={os.getpid()}", flush=True)
        threading.Event().wait()


class Chatty(Agent):
    """Prints many numbered lines and one very long line while it starts."""

    def __init__(self):
        for i in range(CHATTY_LINES):
            print(f"chatty line {i}", flush=True)
        sys.stdout.write("x" * LONG_LINE_BYTES + "\n")
        sys.stdout.flush()
        logging.getLogger("chatty").info("chatty agent logging to stderr")
