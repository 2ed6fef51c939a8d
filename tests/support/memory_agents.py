"""An agent that outgrows any sensible memory limit, for the memory watchdog's tests."""

import os
import threading

from rustic_ai.core.guild.agent import Agent

HOG_MB = int(os.environ.get("RK8S_TEST_HOG_MB", "600"))
_held: list[bytes] = []


class GrowsPastItsLimit(Agent):
    """Reports ready, then a moment later fills HOG_MB of memory and holds it."""

    def __init__(self):
        # Later, not here: the agent must be running (ready) when it crosses the limit.
        threading.Timer(0.3, self._grow).start()

    @staticmethod
    def _grow() -> None:
        for _ in range(HOG_MB // 50):
            _held.append(b"\x01" * (50 * 1024 * 1024))  # written, so resident (not lazily zero-mapped)
