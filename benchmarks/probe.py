"""The probe: a local rusticai agent that says hello and timestamps the agents' answers.

It joins a guild the way tests/support/probe.py does (rusticai-core's Guild with the
SyncExecutionEngine, on the Redis messaging backend) and publishes
``{"content": "Hello Responder!"}`` on ``default_topic``; rusticai-testing's
ResponderProbeAgent answers ``"Acknowledged: <id of the hello>"``. Each answer is
timestamped (``time.perf_counter()``) in the messaging thread that delivers it, before
anything else is done with it, so how the caller waits does not change the number.

Every launch gets a fresh guild (and so a fresh probe): rusticai-redis replays a topic's
whole history to a client that subscribes for the first time, so a new agent in a
long-lived guild would also answer every earlier hello, and its first answer would not
say anything about the message sent after *this* launch.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from rustic_ai.core.agents.testutils.probe_agent import PublishMixin
from rustic_ai.core.guild import agent
from rustic_ai.core.guild.agent import Agent
from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.core.guild.guild import Guild
from rustic_ai.core.messaging import MessagingConfig
from rustic_ai.core.messaging.core import JsonDict

from .common import HELLO, REPUBLISH_S

SYNC_ENGINE = "rustic_ai.core.guild.execution.sync.sync_exec_engine.SyncExecutionEngine"
ACK = "Acknowledged: "


@dataclass(frozen=True)
class Ack:
    at: float  # perf_counter() when it was delivered to the probe
    sender: str
    hello_id: int  # which hello it answers


class AckRecorder(Agent, PublishMixin):
    """Records every "Acknowledged: <id>" it sees, with its arrival time."""

    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self.cond = threading.Condition()

    @agent.processor(JsonDict)
    def on_message(self, ctx: agent.ProcessContext[JsonDict]) -> None:
        at = time.perf_counter()
        content = ctx.payload.get("content") if isinstance(ctx.payload, dict) else None
        if not (isinstance(content, str) and content.startswith(ACK)):
            return
        try:
            hello_id = int(content[len(ACK):])
        except ValueError:
            return
        with self.cond:
            self.acks.append(Ack(at, ctx.message.sender.id, hello_id))
            self.cond.notify_all()


class Probe:
    def __init__(self, guild_id: str, messaging: MessagingConfig) -> None:
        self.guild = Guild(
            id=guild_id,
            name="bench probe",
            description="benchmark probe",
            messaging_config=messaging,
            execution_engine_clz=SYNC_ENGINE,
            organization_id="bench-org",
        )
        spec = (
            AgentBuilder(AckRecorder)
            .set_id(f"probe-{uuid.uuid4().hex[:6]}")
            .set_name("Bench probe")
            .set_description("timestamps answers")
            .build_spec()
        )
        self.agent: AckRecorder = self.guild._add_local_agent(spec)  # type: ignore[assignment]
        self.hellos: list[tuple[float, int]] = []  # (perf_counter at publish, message id)

    def hello(self) -> int:
        t = time.perf_counter()
        msg_id = self.agent.publish_dict("default_topic", HELLO).to_int()
        self.hellos.append((t, msg_id))
        return msg_id

    def _answers(self, agent_ids: set[str]) -> dict[str, Ack]:
        """First answer of each agent to one of *our* hellos (caller holds the condition)."""
        ours = {h for _, h in self.hellos}
        first: dict[str, Ack] = {}
        for ack in self.agent.acks:
            if ack.sender in agent_ids and ack.hello_id in ours and ack.sender not in first:
                first[ack.sender] = ack
        return first

    def wait_answers(self, agent_ids: set[str], timeout_s: float, republish_s: float | None = REPUBLISH_S,
                     ) -> dict[str, Ack]:
        """Waits until every agent answered one of our hellos; re-publishes every ``republish_s``.

        The first hello must already have been sent (``hello()``) by the caller. Returns the
        first answer per agent (those that answered before the timeout).
        """
        deadline = time.perf_counter() + timeout_s
        with self.agent.cond:
            while True:
                got = self._answers(agent_ids)
                now = time.perf_counter()
                if len(got) == len(agent_ids) or now >= deadline:
                    return got
                last = self.hellos[-1][0] if self.hellos else now
                if republish_s is not None and now - last >= republish_s:
                    self.agent.cond.release()
                    try:
                        self.hello()
                    finally:
                        self.agent.cond.acquire()
                    continue
                wait = deadline - now
                if republish_s is not None:
                    wait = min(wait, max(0.0, last + republish_s - now))
                self.agent.cond.wait(max(wait, 0.0005))

    def publish_index(self, hello_id: int) -> int:
        """1 for the first hello sent, 2 for the first re-publish, ..."""
        for i, (_, h) in enumerate(self.hellos, 1):
            if h == hello_id:
                return i
        return 0

    def close(self) -> None:
        self.guild.shutdown()
