"""A relay ring: each agent passes a baton to the next and stamps where it ran.

Started across several agent hosts, the baton's path shows the messages crossing
process and host boundaries over the guild's messaging backend.
"""

from __future__ import annotations

import os
from typing import Any

from rustic_ai.core.agents.testutils.probe_agent import PublishMixin
from rustic_ai.core.guild import agent
from rustic_ai.core.guild.agent import Agent, ProcessContext
from rustic_ai.core.guild.dsl import BaseAgentProps
from rustic_ai.core.messaging.core import JsonDict

DEMO_TOPIC = "default_topic"


class RelayProps(BaseAgentProps):
    index: int = 0
    ring_size: int = 1


class RelayAgent(Agent[RelayProps]):
    """Takes the baton when it is addressed to its index, stamps it, passes it on."""

    @agent.processor(JsonDict)
    def relay(self, ctx: ProcessContext[JsonDict]) -> None:
        baton = ctx.payload
        if baton.get("kind") != "baton" or baton.get("next") != self.config.index:
            return
        stamp = {"agent": self.id, "pid": os.getpid(), "host": os.environ.get("RUSTIC_AGENT_HOST_ADDRESS", "?")}
        path: list[Any] = [*baton.get("path", []), stamp]
        if len(path) >= int(baton.get("hops", 0)):
            ctx.send_dict({"kind": "baton-done", "path": path})
        else:
            ctx.send_dict(
                {"kind": "baton", "next": (self.config.index + 1) % self.config.ring_size,
                 "hops": baton["hops"], "path": path}
            )


class ObserverAgent(Agent, PublishMixin):
    """Runs locally in the demo process: starts the baton and collects finished paths."""

    def __init__(self) -> None:
        self.finished: list[list[dict[str, Any]]] = []

    @agent.processor(JsonDict)
    def collect(self, ctx: ProcessContext[JsonDict]) -> None:
        if ctx.payload.get("kind") == "baton-done":
            self.finished.append(list(ctx.payload["path"]))

    def start_baton(self, hops: int) -> None:
        self.publish_dict(DEMO_TOPIC, {"kind": "baton", "next": 0, "hops": hops, "path": []})


