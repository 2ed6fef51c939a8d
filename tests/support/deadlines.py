"""Lease deadlines for agent processes (process/fence.py): (stop_at, kill_at) CLOCK_MONOTONIC instants.

Every launch carries one; an agent process stops itself at stop_at and is killed at kill_at
unless its host extends the deadline. Tests that are not about fencing pass ``far()``.
"""

from __future__ import annotations

import time

FAR_S = 3600.0  # further than any test runs


def far() -> tuple[float, float]:
    """A deadline no test reaches. Computed per call: the instants are absolute."""
    at = time.monotonic() + FAR_S
    return at, at


def from_now(stop_s: float, kill_s: float) -> tuple[float, float]:
    """A deadline ``stop_s`` and ``kill_s`` seconds from now."""
    now = time.monotonic()
    return now + stop_s, now + kill_s
