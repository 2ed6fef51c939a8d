"""Restart policy for crashed agents: exponential backoff bounded by an intensity limit.

Like an Erlang/OTP supervisor: at most ``max_restarts`` restarts within ``window_s``
seconds, else the agent is marked failed and left alone. Between restarts the delay
starts at ``backoff_initial_s`` and doubles up to ``backoff_max_s``; a run that lasted a
whole window resets the backoff. Pure logic with an injectable clock, so it is tested
without waiting.
"""

from __future__ import annotations

import collections
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RestartPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_restarts: int = Field(5, ge=0, description="Restarts allowed within window_s; 0 = never restart.")
    window_s: float = Field(60.0, gt=0, description="Seconds over which restarts are counted.")
    backoff_initial_s: float = Field(1.0, ge=0, description="Delay before the first restart.")
    backoff_max_s: float = Field(60.0, ge=0, description="Upper bound of the doubling delay.")
    multiplier: float = Field(2.0, ge=1.0)

    @classmethod
    def for_request(cls, request_restart: dict[str, Any] | None, agent_spec: dict[str, Any],
                    default: RestartPolicy) -> RestartPolicy:
        """The launch request's policy if it has one, else ``AgentSpec.qos.retry_count`` as
        max_restarts, else the host's default."""
        if request_restart:
            return cls.model_validate(request_restart)
        retry_count = (agent_spec.get("qos") or {}).get("retry_count")
        if isinstance(retry_count, int) and retry_count >= 0:
            return default.model_copy(update={"max_restarts": retry_count})
        return default


class RestartTracker:
    """Counts one agent's restarts and says how long to wait before the next, or None."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._restarts: collections.deque[float] = collections.deque()
        self._next_delay = policy.backoff_initial_s
        self.total = 0

    def on_exit(self, now: float, ran_for_s: float) -> float | None:
        """Called when the agent died; returns the delay before restarting, or None to give up."""
        p = self.policy
        while self._restarts and now - self._restarts[0] > p.window_s:
            self._restarts.popleft()
        if ran_for_s >= p.window_s:
            self._next_delay = p.backoff_initial_s  # it had been healthy: start over
        if len(self._restarts) >= p.max_restarts:
            return None
        delay = min(self._next_delay, p.backoff_max_s)
        self._next_delay = min(max(self._next_delay, 1e-3) * p.multiplier, p.backoff_max_s)
        self._restarts.append(now)
        self.total += 1
        return delay
